"""Operator algebra and the operator protocol, against dense float64 products."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import assert_close
from torch import Tensor, nn

import hesse
from hesse._distributed import Shard
from hesse._protocol import Operator

F64 = torch.float64


def _problem() -> tuple[hesse.HessianOperator, hesse.GGNOperator, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x = torch.randn(12, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (12,), generator=g)
    data = [(x[:8], y[:8]), (x[8:], y[8:])]
    h = hesse.HessianOperator(model, nn.CrossEntropyLoss(), data)
    gg = hesse.GGNOperator(model, nn.CrossEntropyLoss(), data)
    return h, gg, h.to_dense(), gg.to_dense()


def test_sums_differences_and_multiples_match_dense_algebra() -> None:
    h, g, hd, gd = _problem()
    n = h.shape[0]
    eye = torch.eye(n, dtype=F64)
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    cases = {
        "H + G": (h + g, hd + gd),
        "H - G": (h - g, hd - gd),
        "2 * H": (2 * h, 2 * hd),
        "H * 2": (h * 2, 2 * hd),
        "tensor * H": (torch.tensor(0.5, dtype=F64) * h, 0.5 * hd),
        "-H": (-h, -hd),
        "H / 4": (h / 4, hd / 4),
        "G + 0.1 I": (g + 0.1 * hesse.IdentityOperator.like(g), gd + 0.1 * eye),
        "sum([H, G, H])": (sum([h, g, h]), 2 * hd + gd),
        "nested": (2 * (h - 0.5 * (g + h)), hd - gd),
    }
    for name, (op, dense) in cases.items():
        assert op.shape == (n, n) and op.dtype == F64 and op.device == h.device, name
        assert_close(op @ v, dense @ v)
        assert_close(op @ v[:, 0], dense @ v[:, 0])
        assert_close(op.to_dense(), dense)
        assert_close(op.diagonal(), dense.diagonal())
        out = op @ h.layout.unflatten(v[:, 0])
        assert_close(h.layout.flatten(out), dense @ v[:, 0])
    combo = g + 0.1 * hesse.IdentityOperator.like(g)
    assert isinstance(combo, hesse.LinearCombination) and len(combo.terms) == 2
    scipy = pytest.importorskip("scipy")
    del scipy
    assert_close(torch.as_tensor(combo.to_scipy() @ v[:, 0].numpy()), (gd + 0.1 * eye) @ v[:, 0])


def test_combinations_work_in_every_spectral_tool() -> None:
    h, g, hd, gd = _problem()
    damped = g + 1e-2 * hesse.IdentityOperator.like(g)
    exact = torch.linalg.eigvalsh(gd + 1e-2 * torch.eye(g.shape[0], dtype=F64))
    values, _ = hesse.eigsh(damped, k=2, which="LA")
    assert_close(values, exact[-2:], rtol=1e-9)
    assert math.isclose(
        float(hesse.sharpness(h - g)),
        float(torch.linalg.eigvalsh(hd - gd).abs().max()),
        rel_tol=1e-9,
    )
    tr = hesse.trace(damped, num_matvecs=30, seed=0)
    assert abs(float(tr.estimate) - float(exact.sum())) < 4 * float(tr.stderr) + 1e-9
    assert_close(hesse.diagonal(damped, method="exact"), gd.diagonal() + 1e-2)
    density = hesse.spectral_density(damped, num_probes=2, lanczos_steps=10, seed=0)
    assert torch.isfinite(density.density).all()


def test_algebra_refuses_what_does_not_add_up() -> None:
    h, g, _, _ = _problem()
    small = hesse.IdentityOperator(3, dtype=F64)
    with pytest.raises(ValueError, match="operators: shapes differ"):
        h + small
    with pytest.raises(ValueError, match=r"cannot be added.*IdentityOperator\.like"):
        h + hesse.IdentityOperator(h.shape[0], dtype=torch.float32)
    with pytest.raises(TypeError, match="unsupported operand"):
        h + torch.eye(h.shape[0], dtype=F64)
    with pytest.raises(TypeError, match="unsupported operand"):
        h * h
    with pytest.raises(ValueError, match="n: expected a positive int"):
        hesse.IdentityOperator(0)
    with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
        hesse.IdentityOperator(3, dtype="float64")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
        hesse.IdentityOperator(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="device: expected a torch.device"):
        hesse.IdentityOperator(3, device="bogus")
    with pytest.raises(ZeroDivisionError, match="coefficient: an operator divided by 0"):
        h / 0
    with pytest.raises(ValueError, match="coefficient: expected a finite number"):
        h * float("nan")
    # Same names and size, other shapes: dict products would take the wrong shapes.
    one = nn.Sequential(nn.Linear(4, 3)).to(F64)
    other = nn.Sequential(nn.Linear(2, 5)).to(F64)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    ggn_one = hesse.GGNOperator(one, nn.MSELoss(), (x, torch.zeros(6, 3, dtype=F64)))
    ggn_other = hesse.GGNOperator(other, nn.MSELoss(), (x[:, :2], torch.zeros(6, 5, dtype=F64)))
    assert ggn_one.shape == ggn_other.shape and ggn_one.param_names == ggn_other.param_names
    with pytest.raises(ValueError, match=r"operators: built on different parameters .*\(3, 4\)"):
        ggn_one + ggn_other
    with pytest.raises(ValueError, match=r"vector: expected shape \(3,\) or \(3, K\)"):
        small @ torch.ones(4, dtype=F64)

    class NoDiagonal(Operator):  # an operator of products only
        shape, dtype, device, shard = (3, 3), F64, torch.device("cpu"), Shard()

        def __matmul__(self, v: Tensor) -> Tensor:
            return 2 * v

    combo = NoDiagonal() + small
    with pytest.raises(NotImplementedError, match="NoDiagonal has no exact diagonal"):
        combo.diagonal()
    assert_close(combo.to_dense(), 3 * torch.eye(3, dtype=F64))
    # The spectral tools fall back to the dense diagonal for budgets that reach N.
    assert_close(hesse.diagonal(combo, num_matvecs=3), torch.full((3,), 3.0, dtype=F64))


def test_every_kind_of_operator_in_the_protocol() -> None:
    """A dense symmetric tensor, hesse's operators and sums, a user's own class, and
    curvlinops' operators (when installed) are accepted by every spectral tool alike."""
    h, _, hd, _ = _problem()
    exact = torch.linalg.eigvalsh(hd)

    class Mine:
        shape, dtype, device = hd.shape, hd.dtype, hd.device

        def __matmul__(self, v: Tensor) -> Tensor:
            return hd @ v

    kinds: dict[str, object] = {"tensor": hd, "hesse": h, "sum": 0.5 * (h + h), "user": Mine()}
    try:
        with warnings.catch_warnings():  # torch 2.13 warns about torch.jit.script on import
            warnings.simplefilter("ignore", DeprecationWarning)
            import curvlinops

        params = [p for p in h.model.parameters()]
        kinds["curvlinops"] = curvlinops.HessianLinearOperator(
            h.model, h.criterion, params, [(b.inputs[0], b.target) for b in h.data]
        )
    except ImportError:
        pass
    for name, a in kinds.items():
        check(name, a, hd, exact)


def check(name: str, a: object, hd: Tensor, exact: Tensor) -> None:
    # curvlinops' first jvp loads torch's forward-AD decompositions, which warns in torch 2.13
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert isinstance(a, (hesse.SymmetricOperator, Tensor)), name
        values, vectors = hesse.eigsh(a, k=2, which="LA")
        assert_close(values, exact[-2:], rtol=1e-8)
        assert vectors.shape == (hd.shape[0], 2)
        assert math.isclose(float(hesse.sharpness(a)), float(exact.abs().max()), rel_tol=1e-8)
        assert_close(hesse.trace(a, num_matvecs=60).estimate, exact.sum(), rtol=1e-8)
        assert_close(hesse.diagonal(a, num_matvecs=60), hd.diagonal(), rtol=1e-8)
        density = hesse.spectral_density(a, num_probes=8, lanczos_steps=8)
        assert_close(density.nodes[0], exact, rtol=1e-8)


def test_params_accepts_parameter_objects_like_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    model[2].bias.requires_grad_(False)  # frozen, but passed as an object: asked for
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    by_name = hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, params=["2.weight", "2.bias"])
    by_object = hesse.loss_hessian_matrix(
        model, nn.MSELoss(), x, y, params=list(model[2].parameters())
    )
    assert_close(by_object, by_name)
    mixed = hesse.HessianOperator(model, nn.MSELoss(), (x, y), params=[model[0].weight, "2.*"])
    assert mixed.param_names == ("0.weight", "2.weight")  # a pattern skips the frozen bias


def test_loss_sharpness_is_matrix_free_beyond_256_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64)  # N = 387
    x, y = torch.randn(40, 20, dtype=F64), torch.randint(0, 3, (40,))
    crit = nn.CrossEntropyLoss()
    dense = hesse.HessianOperator(model, crit, (x, y)).to_dense()
    exact = float(torch.linalg.eigvalsh(dense).abs().max())
    state = torch.get_rng_state()
    value = hesse.loss_sharpness(model, crit, x, y)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    # A residual of eps^0.625 puts the eigenvalue within about eps (1.3e-9 at eigsh's default).
    assert math.isclose(float(value), exact, rel_tol=1e-12)
    assert value.dtype == F64 and value.shape == ()

    # The target goes to the criterion as it is, on both sides of the limit: a dict here.
    def keyed(out: Tensor, t: dict[str, Tensor]) -> Tensor:
        return crit(out, t["y"])

    assert math.isclose(
        float(hesse.loss_sharpness(model, keyed, x, {"y": y})), exact, rel_tol=1e-12
    )
    v = torch.randn(dense.shape[0], dtype=F64)
    assert_close(hesse.hvp(model, keyed, x, {"y": y}, v), dense @ v)
    with pytest.raises(
        ValueError, match=r"fail on the batch \(inputs \[torch.float32 .*target dict"
    ):
        hesse.loss_sharpness(model, keyed, x.float(), {"y": y})


def test_model_sharpness_of_one_evaluation_is_dense_and_sharpness_keeps_half_dtypes() -> None:
    # is_batch=False with N > 256 had gone to Lanczos on the formed matrix (the global
    # generator advanced, two calls differed by 5e-10) where the docstring says eigvalsh.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)  # N = 353
    x = torch.randn(1, 20, generator=g, dtype=F64)
    h = hesse.model_hessian_matrix(model, x, is_batch=False).reshape(353, 353)
    state = torch.get_rng_state()
    value = hesse.model_sharpness(model, x, is_batch=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(value.reshape(()), torch.linalg.eigvalsh(h).abs().max(), rtol=1e-13)
    half = nn.Sequential(nn.Linear(3, 2)).to(torch.float16)
    xh, yh = torch.randn(4, 3, generator=g).half(), torch.randn(4, 2, generator=g).half()
    assert hesse.loss_sharpness(half, nn.MSELoss(), xh, yh).dtype == torch.float16
    assert hesse.model_sharpness(half, xh).dtype == torch.float16


def test_block_products_choose_a_path_and_both_paths_agree() -> None:
    h, g, hd, gd = _problem()
    v = torch.randn(h.shape[0], 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    for op, dense in ((h, hd), (g, gd)):
        for _ in range(3):
            assert_close(op @ v, dense @ v)
        assert op._block_path in ("block", "singles")  # measured on the first two blocks
        for path in ("block", "singles"):
            op._block_path = path
            assert_close(op @ v, dense @ v)

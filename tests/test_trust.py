"""Regression tests of issue 10 (a trustworthy core): each test is built from the repro of one
row, named after it (A1 … A10, B2 … B7, C for the clearer messages). Oracles are independent of
hesse: `torch.autograd.functional.hessian`, finite differences, dense `eigvalsh`."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import oracle_hessian
from conftest import assert_close, state_preserved
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

import hesse

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    batches: list[tuple[Any, Any]],
    *,
    training: bool = False,
) -> Tensor:
    """Hessian of the mean loss over ``batches`` (weights B_b / N), by autograd on a copy."""
    model = copy.deepcopy(model).train(training)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    values = tuple(p.detach().clone() for _, p in named)
    total = sum(x.shape[0] for x, _ in batches)

    def loss(*ps: Tensor) -> Tensor:
        out = 0
        for x, y in batches:
            z = torch.func.functional_call(model, dict(zip(names, ps)), (x,))
            out = out + criterion(z, y) * x.shape[0] / total
        return out  # type: ignore[return-value]

    blocks = torch.autograd.functional.hessian(loss, values)
    sizes = [v.numel() for v in values]
    return torch.cat(
        [
            torch.cat([blocks[i][j].reshape(si, sj) for j, sj in enumerate(sizes)], 1)
            for i, si in enumerate(sizes)
        ]
    )


class Net(nn.Module):
    """An MLP with BatchNorm (eval: running statistics) and a Python attribute read in forward;
    N = 419 > 256, so `eigsh` runs Lanczos on single products."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)
        self.scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x)))) * self.scale


def _net() -> tuple[Net, Tensor, Tensor]:
    g = _gen(0)
    torch.manual_seed(0)
    model = Net().to(F64)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(16, generator=g, dtype=F64) * 0.1)
        model.bn.running_var.copy_(1 + torch.rand(16, generator=g, dtype=F64))
    x = torch.randn(24, 20, generator=g, dtype=F64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def _sharpness(h: Tensor) -> float:
    return float(torch.linalg.eigvalsh(h).abs().max())


# ------------------------------------------------------------------------- A1, A2: no stale answers


def _sgd_step(model: nn.Module, crit: nn.Module, x: Tensor, y: Tensor) -> None:
    crit(model(x), y).backward()
    for p in model.parameters():
        p.data -= 0.5 * p.grad  # hand-written SGD: invisible to version counters
        p.grad = None


CHANGES: dict[str, Callable[[Net, nn.CrossEntropyLoss, Tensor, Tensor], None]] = {
    "data_mul_": lambda m, c, x, y: m.fc1.weight.data.mul_(1.7),
    "data_assign": lambda m, c, x, y: setattr(m.fc2.weight, "data", m.fc2.weight.data * 2),
    "sgd_through_data": _sgd_step,
    "vector_to_parameters": lambda m, c, x, y: vector_to_parameters(
        parameters_to_vector(m.parameters()).detach() * 1.3, m.parameters()
    ),
    "buffer_through_data": lambda m, c, x, y: setattr(
        m.bn.running_var, "data", m.bn.running_var.data * 3
    ),
    "input_through_data": lambda m, c, x, y: x.data.mul_(0.5),
    "python_attribute": lambda m, c, x, y: setattr(m, "scale", 2.5),
    "criterion_attribute": lambda m, c, x, y: setattr(c, "label_smoothing", 0.3),
    # A2: a replaced Parameter object
    "replaced_parameter": lambda m, c, x, y: setattr(
        m.fc1, "weight", nn.Parameter(m.fc1.weight.detach() * 1.5)
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a1_a2_products_follow_every_change_of_model_data_and_criterion(change: str) -> None:
    model, x, y = _net()
    crit = nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, crit, (x, y))
    v = torch.randn(op.shape[0], generator=_gen(1), dtype=F64)
    before = oracle(model, crit, [(x, y)])
    assert_close(op @ v, before @ v)
    assert math.isclose(float(hesse.sharpness(op, seed=0)), _sharpness(before), rel_tol=1e-6)
    CHANGES[change](model, crit, x, y)
    after = oracle(model, crit, [(x, y)])
    assert (after - before).abs().max() > 1e-3  # the change matters
    assert_close(op @ v, after @ v)  # one product (the single-product path)
    assert_close(op @ torch.stack([v, -v], 1), after @ torch.stack([v, -v], 1))
    top = hesse.eigsh(op, k=1, which="LM", seed=0)  # Lanczos: a session of single products
    assert math.isclose(float(top.eigenvalues.abs()[0]), _sharpness(after), rel_tol=1e-6)


def test_a1_a_criterion_whose_reduction_changes_is_followed() -> None:
    # Unequal batches: the weights are B_b / N for a mean and 1 for a sum.
    model, x, y = _net()
    crit = nn.CrossEntropyLoss()
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    op = hesse.GGNOperator(model, crit, data)
    v = torch.randn(op.shape[0], generator=_gen(1), dtype=F64)
    mean = op @ v
    crit.reduction = "sum"
    assert op.reduction == "sum"
    summed = hesse.GGNOperator(model, nn.CrossEntropyLoss(reduction="sum"), data)
    assert (mean - summed @ v).abs().max() > 1e-3  # the change matters
    assert_close(op @ v, summed @ v)


def test_a2_a_changed_shape_is_refused() -> None:
    model, x, y = _net()
    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    model.fc2 = nn.Linear(16, 4).to(F64)
    with pytest.raises(ValueError, match=r"'fc2.weight' is now \(4, 16\).*build a new operator"):
        op @ torch.ones(op.shape[0], dtype=F64)


def test_a3_a_growing_data_list_is_weighted_by_what_it_holds() -> None:
    model, x, y = _net()
    crit = nn.CrossEntropyLoss()
    data = [(x[:10], y[:10])]
    op = hesse.HessianOperator(model, crit, data)
    assert op.num_samples == 10
    data.append((x[10:], y[10:]))
    v = torch.randn(op.shape[0], generator=_gen(2), dtype=F64)
    expected = oracle(model, crit, [(x[:10], y[:10]), (x[10:], y[10:])])
    assert_close(op @ v, expected @ v)
    assert op.num_samples == 24
    assert_close(op.diagonal(), expected.diagonal())
    data.clear()
    with pytest.raises(ValueError, match="data: no samples in this pass"):
        op @ v


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_a4_parameter_hooks_do_not_change_products(kind: str) -> None:
    model, x, y = _net()
    crit = nn.CrossEntropyLoss()
    cls = {
        "hessian": hesse.HessianOperator,
        "ggn": hesse.GGNOperator,
        "fisher": hesse.EmpiricalFisherOperator,
    }[kind]
    data = [(x[:14], y[:14]), (x[14:], y[14:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=_gen(3), dtype=F64)
    expected = cls(model, crit, data) @ v
    handles = [p.register_hook(lambda g: g * 0) for p in model.parameters()]  # a gradient mask
    try:
        op = cls(model, crit, data)
        assert_close(op @ v, expected)
        assert_close((op @ v[:, None])[:, 0], expected)
        if kind == "hessian":
            assert_close(expected, oracle(model, crit, data) @ v)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------ A5: weight norm


def _weight_norm_model(api: str) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(3, 4).to(F64)
    if api == "parametrizations":
        lin = nn.utils.parametrizations.weight_norm(lin)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated
            lin = nn.utils.weight_norm(lin)
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 2)).to(F64)


def _finite_difference_hessian(
    model: nn.Module, loss: Callable[[Tensor], Tensor], x: Tensor, h: float = 1e-5
) -> Tensor:
    """Central differences of the (correct) first derivative, column by column."""
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def gradient(t: Tensor) -> Tensor:
        t = t.detach().requires_grad_()
        parts = dict(
            zip(names, (p.view(s) for p, s in zip(t.split([s.numel() for s in shapes]), shapes)))
        )
        out = loss(torch.func.functional_call(model, parts, (x,)))
        return torch.autograd.grad(out, t)[0]

    eye = torch.eye(theta.numel(), dtype=F64)
    return torch.stack(
        [(gradient(theta + h * e) - gradient(theta - h * e)) / (2 * h) for e in eye], 1
    )


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
def test_a5_weight_norm_hessian_is_right_and_symmetric(api: str) -> None:
    model = _weight_norm_model(api)
    x = torch.randn(5, 3, generator=_gen(4), dtype=F64)

    def loss(out: Tensor, _: Any = None) -> Tensor:
        return out.pow(2).sum()

    expected = _finite_difference_hessian(model, loss, x)
    with state_preserved(model):
        h = hesse.loss_hessian_matrix(model, loss, x, None)
    assert_close(h, h.T, rtol=1e-12)
    assert_close(h, expected, rtol=1e-7)
    op = hesse.HessianOperator(model, loss, (x, torch.zeros(5)))
    v = torch.randn(h.shape[0], generator=_gen(5), dtype=F64)
    assert_close(op @ v, expected @ v, rtol=1e-7)  # plain autograd (single product)
    assert_close(op.to_dense(), expected, rtol=1e-7)
    assert_close(hesse.loss_hessian_diagonal(model, loss, x, None), expected.diagonal(), 1e-7)


# ------------------------------------------------------------------- A6: models that mix samples


class Centered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return h - h.mean(0, keepdim=True)  # every sample's output depends on the batch


@pytest.mark.parametrize("kind", ["centered", "batchnorm_without_running_stats"])
def test_a6_per_sample_results_refuse_models_that_mix_samples(kind: str) -> None:
    torch.manual_seed(0)
    model = (
        Centered()
        if kind == "centered"
        else nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    ).to(F64)
    x = torch.randn(6, 3, generator=_gen(6), dtype=F64)
    target = torch.randn(6, model(x).shape[1], generator=_gen(7), dtype=F64)
    with state_preserved(model):
        for call in (
            lambda: hesse.model_hessian_matrix(model, x),
            lambda: hesse.model_hessian_diagonal(model, x),
            lambda: hesse.model_sharpness(model, x),
            lambda: hesse.per_sample_loss_hessian(model, nn.MSELoss(), x, target),
            lambda: hesse.EmpiricalFisherOperator(model, nn.MSELoss(), (x, target)),
        ):
            with pytest.raises(ValueError, match="couples the samples of a batch"):
                call()
        # Differentiating the batched output as one evaluation stays available.
        assert hesse.model_hessian_matrix(model, x, is_batch=False).shape[:2] == (
            6,
            target.shape[1],
        )


# ------------------------------------------------------------- A7: parameters written in forward


def test_a7_embedding_max_norm_leaves_the_weight_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 2)).to(F64)
    with torch.no_grad():
        model[0].weight.mul_(4)  # rows longer than max_norm: forward renormalises in place
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]])
    target = torch.randn(3, 2, dtype=F64)
    # Derivatives as torch's in-place renormalisation gives them: at the renormalised rows.
    twin = copy.deepcopy(model)
    twin[0].max_norm = None
    with torch.no_grad():
        rows = twin[0].weight[:5]
        rows.mul_(0.5 / (torch.linalg.vector_norm(rows, dim=1, keepdim=True) + 1e-7))
    with state_preserved(model):
        h = hesse.loss_hessian_matrix(model, nn.MSELoss(), ids, target)
    assert_close(h, oracle(twin, nn.MSELoss(), [(ids, target)]))
    with state_preserved(model):
        op = hesse.HessianOperator(model, nn.MSELoss(), (ids, target))
        op @ torch.ones(op.shape[0], dtype=F64)

    def failing(out: Tensor, t: Tensor) -> Tensor:
        raise RuntimeError("criterion failed after the forward")

    # The criterion's own error, named with the batch it failed on.
    with state_preserved(model), pytest.raises(ValueError, match="fail .*after the forward"):
        hesse.loss_hessian_matrix(model, failing, ids, target)


# ------------------------------------------------------------------- A8: matplotlib's backend


def test_a8_plot_to_a_file_keeps_the_users_backend(tmp_path: Any) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    a = torch.diag(torch.arange(1.0, 301.0, dtype=F64))
    density = hesse.spectral_density(a, num_probes=2, lanczos_steps=20, seed=0)
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend
    try:
        figures = plt.get_fignums()
        density.plot(tmp_path / "density.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures  # no pyplot figure left behind
        assert (tmp_path / "density.png").stat().st_size > 1000
    finally:
        matplotlib.use(before)


# -------------------------------------------------------------------- A9, A10, B4, B6: arguments


def test_a9_non_symmetric_matrices_are_refused() -> None:
    p = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    big = torch.randn(300, 300, generator=_gen(8), dtype=F64)
    for call in (
        lambda: hesse.sharpness(p),
        lambda: hesse.sharpness(p.T),
        lambda: hesse.sharpness(torch.stack([p, p])),
        lambda: hesse.eigsh(big),
        lambda: hesse.trace(big),
        lambda: hesse.spectral_density(big),
        lambda: hesse.diagonal(big),
    ):
        with pytest.raises(ValueError, match="symmetric"):
            call()
    # Rounding-level asymmetry is accepted.
    s = big + big.T
    s[0, 1] += 1e-13
    assert hesse.eigsh(s, k=1, seed=0).converged.all()


def test_a10_b6_spectral_density_arguments() -> None:
    a = torch.diag(torch.arange(1.0, 11.0, dtype=F64))
    for sigma in (-0.1, 0.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma: expected a finite number > 0"):
            hesse.spectral_density(a, sigma=sigma, seed=0)
    with pytest.raises(ValueError, match=r"grid: holds almost none of the spectrum.*\[1, 10\]"):
        hesse.spectral_density(a, grid=torch.linspace(100, 200, 50, dtype=F64), seed=0)
    with pytest.raises(ValueError, match="grid: expected an increasing 1-D tensor"):
        hesse.spectral_density(a, grid=torch.linspace(10, 1, 50, dtype=F64), seed=0)
    density = hesse.spectral_density(a, grid=torch.linspace(0, 11, 500, dtype=F64), seed=0)
    assert torch.isfinite(density.density).all()
    assert math.isclose(float(torch.trapezoid(density.density, density.grid)), 1.0, rel_tol=1e-9)


def test_b4_eigsh_arguments() -> None:
    a = torch.diag(torch.arange(1.0, 301.0, dtype=F64))
    with pytest.raises(ValueError, match="max_iter: expected an int >= 0, got -1"):
        hesse.eigsh(a, max_iter=-1)
    with pytest.raises(TypeError, match="max_iter: expected an int >= 0, got str '5'"):
        hesse.eigsh(a, max_iter="5")  # type: ignore[arg-type]
    for tol in (-1e-3, 0.0, math.nan):
        with pytest.raises(ValueError, match="tol: expected a finite number > 0"):
            hesse.eigsh(a, tol=tol)
    with pytest.raises(TypeError, match="tol: expected a positive number"):
        hesse.eigsh(a, tol="1e-3")  # type: ignore[arg-type]
    result = hesse.eigsh(a, k=1, max_iter=0, seed=0)  # no restart: one basis, reported as is
    assert result.num_matvecs > 0


# ------------------------------------------------------------------------- B2: checkpointing


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        if self.reentrant is None:  # the twin without checkpointing
            return self.b(torch.tanh(self.a(x)))
        h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=self.reentrant)
        return self.b(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_b2_checkpointed_models_on_every_path(reentrant: bool) -> None:
    torch.manual_seed(0)
    plain = Checkpointed(None).to(F64)
    model = Checkpointed(reentrant).to(F64)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, generator=_gen(9), dtype=F64)
    y = torch.randint(0, 3, (6,), generator=_gen(10))
    crit = nn.CrossEntropyLoss()
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    v = torch.randn(31, 3, generator=_gen(11), dtype=F64)
    assert_close(hesse.loss_hessian_matrix(model, crit, x, y), oracle(plain, crit, [(x, y)]))
    for cls in (hesse.HessianOperator, hesse.GGNOperator, hesse.EmpiricalFisherOperator):
        with state_preserved(model):
            op, twin = cls(model, crit, data), cls(plain, crit, data)
            assert_close(op @ v, twin @ v)
            assert_close(op @ v[:, 0], twin @ v[:, 0])
            assert_close(op.diagonal(), twin.diagonal())


class ModelOutput(dict):  # type: ignore[type-arg]
    """What a HuggingFace model returns: a dict with attributes."""

    __getattr__ = dict.__getitem__


class HuggingFaceLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> ModelOutput:
        return ModelOutput(logits=self.lin(x))


def test_b2_ggn_names_the_fix_for_a_model_output_object() -> None:
    model = HuggingFaceLike().to(F64)
    x, y = torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 1, 0])

    def crit(out: ModelOutput, t: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out.logits, t)

    with pytest.raises(TypeError, match=r"GGN needs the model to return one tensor.*\.logits"):
        hesse.GGNOperator(model, crit, (x, y))
    h = hesse.HessianOperator(model, crit, (x, y))  # the loss sees the object: fine
    assert_close(h.to_dense(), oracle(model, crit, [(x, y)]))


# --------------------------------------------------------------------------- B3, B5, B7


def test_b3_empty_batch() -> None:
    model = nn.Linear(3, 2).to(F64)
    x, y = torch.zeros(0, 3, dtype=F64), torch.zeros(0, 2, dtype=F64)
    for call in (
        hesse.loss_hessian_matrix,
        hesse.loss_hessian_dict,
        hesse.loss_hessian_diagonal,
        hesse.loss_sharpness,
    ):
        with pytest.raises(ValueError, match="inputs: the batch is empty"):
            call(model, nn.MSELoss(), x, y)  # type: ignore[operator]
    # An empty batch inside a dataset adds nothing.
    x1, y1 = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    op = hesse.HessianOperator(model, nn.MSELoss(), [(x1, y1), (x, y)])
    assert_close(op.to_dense(), oracle(model, nn.MSELoss(), [(x1, y1)]))


def test_b5_products_with_no_columns() -> None:
    model = nn.Linear(3, 2).to(F64)
    op = hesse.GGNOperator(model, nn.MSELoss(), (torch.randn(4, 3, dtype=F64), torch.zeros(4, 2)))
    out = op @ torch.zeros(8, 0, dtype=F64)
    assert out.shape == (8, 0) and out.dtype == F64


def test_b7_products_inside_inference_mode() -> None:
    model, x, y = _net()
    crit = nn.CrossEntropyLoss()
    v = torch.randn(419, generator=_gen(12), dtype=F64)
    expected = oracle(model, crit, [(x, y)])
    with torch.inference_mode():
        xi, yi, vi = x.clone(), y.clone(), v.clone()  # inference tensors
        for cls in (hesse.HessianOperator, hesse.GGNOperator, hesse.EmpiricalFisherOperator):
            op = cls(model, crit, (xi, yi))
            assert (op @ vi).shape == (419,)
        h = hesse.HessianOperator(model, crit, (xi, yi))
        hv = h @ vi
        dense = hesse.loss_hessian_matrix(model, crit, xi, yi)
        product = hesse.hvp(model, crit, xi, yi, vi)
    assert_close(hv.clone(), expected @ v)
    assert_close(dense.clone(), expected)
    assert_close(product.clone(), expected @ v)


# ----------------------------------------------------------------------- C: clearer messages


def test_c_nan_parameters_are_named() -> None:
    model, x, y = _net()
    with torch.no_grad():
        model.fc2.bias[0] = math.nan
    with pytest.raises(ValueError, match=r"fc2\.bias contain NaN or infinite values"):
        hesse.loss_hessian_matrix(model, nn.CrossEntropyLoss(), x, y)
    with pytest.raises(ValueError, match=r"fc2\.bias contain NaN"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(), (x, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_c_half_precision_operators_in_the_spectral_tools(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    exact = torch.linalg.eigvalsh(oracle(model.to(F64), nn.CrossEntropyLoss(), [(x.double(), y)]))
    op = hesse.HessianOperator(model.to(dtype), nn.CrossEntropyLoss(), (x.to(dtype), y))
    top = hesse.eigsh(op, k=1, seed=0)
    assert top.eigenvalues.dtype == torch.float32
    assert math.isclose(float(top.eigenvalues[0]), float(exact[-1]), rel_tol=0.05)
    tr = hesse.trace(op, num_matvecs=9, seed=0)
    assert tr.estimate.dtype == torch.float32 and torch.isfinite(tr.estimate)
    density = hesse.spectral_density(op, num_probes=2, lanczos_steps=10, seed=0)
    assert torch.isfinite(density.density).all()
    # A half-precision dense matrix large enough for Lanczos (N = 300).
    a = torch.diag(torch.linspace(1, 3, 300)).to(dtype)
    assert math.isclose(float(hesse.sharpness(a, seed=0)), 3.0, rel_tol=1e-2)


def test_c_kl_divergence_batchmean_weights_like_a_mean() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(dim=1)).to(F64)
    x = torch.randn(7, 3, generator=_gen(13), dtype=F64)
    p = torch.softmax(torch.randn(7, 4, generator=_gen(14), dtype=F64), 1)
    crit = nn.KLDivLoss(reduction="batchmean")
    op = hesse.HessianOperator(model, crit, [(x[:5], p[:5]), (x[5:], p[5:])])
    assert_close(op.to_dense(), oracle(model, crit, [(x, p)]))


def test_c_hvp_takes_target_none_and_numpy_seeds() -> None:
    np = pytest.importorskip("numpy")
    model = nn.Linear(2, 1, bias=False).to(F64)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    out = hesse.hvp(
        model, lambda z, _: z.pow(2).sum(), x, None, torch.tensor([1.0, 0.0], dtype=F64)
    )
    assert_close(out, torch.tensor([20.0, 28.0], dtype=F64))  # 2 XᵀX e_1
    a = torch.diag(torch.arange(1.0, 301.0, dtype=F64))
    assert_close(hesse.trace(a, seed=np.int64(3)).estimate, hesse.trace(a, seed=3).estimate, rtol=0)
    with pytest.raises(TypeError, match="seed: expected an int"):
        hesse.trace(a, seed=3.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------- training-mode curvature


def _bn_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)
    ).to(F64)
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    x = torch.randn(10, 3, generator=_gen(15), dtype=F64)
    return model, x, torch.randn(10, 2, generator=_gen(16), dtype=F64)


def test_training_mode_uses_batch_statistics_and_leaves_running_statistics() -> None:
    model, x, y = _bn_problem()
    crit = nn.MSELoss()
    train = oracle(model, crit, [(x, y)], training=True)
    evaluation = oracle(model, crit, [(x, y)])
    assert (train - evaluation).abs().max() > 1e-2  # the two losses differ
    with state_preserved(model):
        assert_close(hesse.loss_hessian_matrix(model, crit, x, y, training=True), train)
        assert_close(hesse.loss_hessian_matrix(model, crit, x, y), evaluation)
        assert_close(
            hesse.loss_hessian_diagonal(model, crit, x, y, training=True), train.diagonal()
        )
        v = torch.randn(train.shape[0], 3, generator=_gen(17), dtype=F64)
        batches = [(x[:6], y[:6]), (x[6:], y[6:])]
        per_batch = oracle(model, crit, batches, training=True)  # batch statistics per batch
        for cls in (hesse.HessianOperator, hesse.GGNOperator):
            op = cls(model, crit, batches, training=True)
            assert_close(op @ v[:, 0], (op @ v)[:, 0])
            if cls is hesse.HessianOperator:
                assert_close(op @ v, per_batch @ v)
                assert_close(op.to_dense(), per_batch)


def test_training_mode_keeps_dropout_off_and_is_refused_per_sample() -> None:
    model, x, y = _bn_problem()
    del model[1]  # dropout only: training=True must equal eval mode
    crit = nn.MSELoss()
    h = hesse.loss_hessian_matrix(model, crit, x, y, training=True)
    assert_close(h, hesse.loss_hessian_matrix(model, crit, x, y, training=True), rtol=0)
    assert_close(h, oracle(model, crit, [(x, y)]))
    with pytest.raises(ValueError, match="training: per_sample_loss_hessian evaluates each"):
        hesse.per_sample_loss_hessian(model, crit, x, y, training=True)
    with pytest.raises(ValueError, match="training: model_hessian_matrix with is_batch=True"):
        hesse.model_hessian_matrix(model, x, training=True)
    with pytest.raises(ValueError, match="training: the empirical Fisher"):
        hesse.EmpiricalFisherOperator(model, crit, (x, y), training=True)
    with pytest.raises(TypeError, match="training: expected True"):
        hesse.loss_hessian_matrix(model, crit, x, y, training="yes")  # type: ignore[arg-type]


def test_functional_dropout_is_off() -> None:
    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return nn.functional.dropout(torch.tanh(self.lin(x)), 0.5, training=True)

    model = FunctionalDropout().to(F64)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    first = hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y)
    assert_close(hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y), first, rtol=0)


class _AttentionAndRNN(nn.Module):
    """Dropout inside kernels: MultiheadAttention without weights (SDPA), LSTM between
    layers, and scaled_dot_product_attention called directly as HuggingFace models do."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
        self.rnn = nn.LSTM(4, 4, num_layers=2, dropout=0.5, batch_first=True)
        self.q = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.p = 0.5

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attention(x, x, x, need_weights=False)
        h, _ = self.rnn(h)
        p = self.p if self.training else 0.0
        h = nn.functional.scaled_dot_product_attention(self.q(h), h, h, dropout_p=p)
        return self.head(h.mean(1))


def test_training_mode_keeps_dropout_inside_attention_and_recurrent_kernels_off() -> None:
    torch.manual_seed(0)
    model = _AttentionAndRNN().to(F64)
    x, y = torch.randn(3, 5, 4, dtype=F64), torch.randn(3, 2, dtype=F64)
    crit = nn.MSELoss()
    # The oracle: the same model with every dropout rate at zero, in training mode.
    twin = copy.deepcopy(model)
    twin.attention.dropout, twin.rnn.dropout, twin.p = 0.0, 0.0, 0.0
    # Plain autograd differentiates attention twice only through its math kernel.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = oracle(twin, crit, [(x, y)], training=True)
    with state_preserved(model):
        got = hesse.loss_hessian_matrix(model, crit, x, y, training=True)
    assert_close(got, expected)
    assert model.attention.dropout == 0.5 and model.rnn.dropout == 0.5
    op = hesse.HessianOperator(model, crit, (x, y), training=True)
    v = torch.randn(op.shape[0], generator=_gen(21), dtype=F64)
    assert_close(op @ v, expected @ v)


@pytest.mark.parametrize("kwargs", [{"padding_idx": 0}, {"max_norm": 1.0}], ids=str)
def test_embedding_forward_mode_paths_agree_with_reverse_mode(kwargs: dict[str, Any]) -> None:
    # Forward mode carried the padding row's tangent (reverse mode zeroes its gradient) and the
    # max_norm rescaling's: the model Hessian (forward over reverse) and a GGN product were
    # not symmetric / not the matrix's.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, **kwargs), nn.Flatten(), nn.Linear(6, 2)).to(F64)
    with torch.no_grad():
        model[0].weight.mul_(2)
    ids = torch.tensor([[0, 1], [2, 0], [3, 4]])
    h = hesse.model_hessian_matrix(model, ids)
    assert_close(h, h.transpose(-1, -2))
    summed = hesse.loss_hessian_matrix(model, lambda out, t: out.sum(), ids, None)
    assert_close(h.sum((0, 1)), summed)
    ggn = hesse.GGNOperator(model, nn.MSELoss(), (ids, torch.randn(3, 2, dtype=F64)))
    v = torch.randn(ggn.shape[0], generator=_gen(22), dtype=F64)
    assert_close(ggn @ v, ggn.to_dense() @ v)


def test_dataloader_products_follow_the_data() -> None:
    """A DataLoader is read anew for each product (documented: it advances torch's RNG)."""
    model, x, y = _net()
    crit = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    op = hesse.HessianOperator(model, crit, loader)
    v = torch.randn(op.shape[0], generator=_gen(18), dtype=F64)
    assert_close(op @ v, oracle(model, crit, [(x, y)]) @ v)


# ------------------------------------------------------------- structure: protocol, fallbacks


def test_operator_protocol_accepts_a_users_class_and_wrappers_must_say_where_data_live() -> None:
    from hesse._protocol import Operator

    a = torch.diag(torch.arange(1.0, 301.0, dtype=F64))

    class Mine:  # the protocol: shape, dtype, device and @
        shape, dtype, device = a.shape, a.dtype, a.device

        def __matmul__(self, v: Tensor) -> Tensor:
            return a @ v

    top = hesse.eigsh(Mine(), k=2, seed=0)
    assert_close(top.eigenvalues, torch.tensor([299.0, 300.0], dtype=F64), rtol=1e-9)
    tr = hesse.trace(Mine(), num_matvecs=60, seed=0)
    assert abs(float(tr.estimate) - 45150.0) < 4 * float(tr.stderr)

    class Forgetful(Operator):  # a wrapper that does not say where its data live
        shape, dtype, device = a.shape, a.dtype, a.device

        def __matmul__(self, v: Tensor) -> Tensor:
            return a @ v

    with pytest.raises(TypeError, match="abstract"):
        Forgetful()  # type: ignore[abstract]
    with pytest.raises(TypeError, match=r"A: expected a symmetric \(N, N\) tensor or an operator"):
        hesse.eigsh(object())


def test_out_of_memory_is_never_a_reason_to_fall_back() -> None:
    from hesse._transforms import Fallbacks, Strategy

    def oom(_: Tensor) -> Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fine(t: Tensor) -> Tensor:
        return t

    policy = Fallbacks()
    columns = policy([Strategy("vectorised", oom, False), Strategy("loop", fine, True)])
    with pytest.raises(torch.OutOfMemoryError):
        columns(torch.ones(2))
    # Any other failure of the first chunk falls back, once, and the choice settles.
    flaky = Fallbacks()

    def fails(_: Tensor) -> Tensor:
        raise RuntimeError("vmap: batching rule not implemented")

    # Nor is it data that do not fit the model: the first batch's check lets it through.
    from hesse._data import Batch, model_fits

    batch = Batch((torch.ones(2, 1),), torch.ones(2))
    with pytest.raises(torch.OutOfMemoryError), model_fits("data", batch, F64):
        oom(torch.ones(1))
    cpu = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes."
    with pytest.raises(RuntimeError, match="can't allocate"), model_fits("data", batch, F64):
        raise RuntimeError(cpu)  # the CPU's allocation failure is a plain RuntimeError
    columns = flaky([Strategy("vectorised", fails, False), Strategy("loop", fine, True)])
    with pytest.warns(hesse.PerformanceWarning, match="batching rule not implemented"):
        assert_close(columns(torch.ones(2, dtype=F64)), torch.ones(2, dtype=F64))
    assert_close(columns(torch.zeros(2, dtype=F64)), torch.zeros(2, dtype=F64))


class _Tempered(nn.Module):
    """Logits divided by a learnable scalar temperature (a 0-dim parameter, like CLIP's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.temperature = nn.Parameter(torch.tensor(1.3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) / self.temperature


def _tempered_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor]:
    """`_Tempered` in float64 on 6 samples of 4 classes, and its loss Hessian by the oracle."""
    g = torch.Generator().manual_seed(0)
    model = _Tempered().to(F64)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 4, (6,), generator=g)
    crit = nn.CrossEntropyLoss()
    expected = oracle(model, crit, [(x, y)])
    return model, crit, x, y, expected


def test_a_zero_dim_parameter_and_uint8_class_targets() -> None:
    # A 0-dim parameter made every call fail in ParamLayout.unflatten (view() of no sizes);
    # uint8 class indices, which cross-entropy takes, failed in the GGN's one_hot.
    model, crit, x, y, expected = _tempered_problem()
    with state_preserved(model):
        h = hesse.HessianOperator(model, crit, (x, y))
        assert_close(h.to_dense(), expected)
        assert_close(h.diagonal(), expected.diagonal())
        assert_close(hesse.loss_hessian_matrix(model, crit, x, y), expected)
        g8 = hesse.GGNOperator(model, crit, (x, y.to(torch.uint8)))
        g64 = hesse.GGNOperator(model, crit, (x, y))
        assert_close(g8.to_dense(), g64.to_dense())
        assert_close(g8.diagonal(), g64.diagonal())


def test_the_dict_forms_of_a_zero_dim_parameter() -> None:
    # The dict forms reshaped with reshape(*sizes): no sizes at all for a 0-dim parameter.
    model, crit, x, y, expected = _tempered_problem()
    t = hesse.ParamLayout.from_module(model).slice("temperature")
    with state_preserved(model):
        full = hesse.loss_hessian_dict(model, crit, x, y)
        diag = hesse.loss_hessian_dict(model, crit, x, y, diagonal_only=True)
    assert full["temperature"]["temperature"].shape == ()
    assert_close(full["temperature"]["temperature"], expected[t, t][0, 0])
    assert_close(diag["temperature"]["temperature"], expected[t, t][0, 0])
    assert full["fc.weight"]["temperature"].shape == (4, 3)
    # The model's own Hessian at one unbatched input, its outputs summed to a scalar.
    summed = _Summed(model)
    out = hesse.model_hessian_dict(summed, x[0], is_batch=False)
    t2 = hesse.ParamLayout.from_module(summed).slice("inner.temperature")
    own = oracle_hessian(summed, lambda ps: torch.func.functional_call(summed, ps, (x[0],)))
    assert out["inner.temperature"]["inner.temperature"].shape == ()
    assert_close(out["inner.temperature"]["inner.temperature"], own[t2, t2][0, 0])


class _Summed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).sum()

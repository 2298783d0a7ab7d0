"""KFAC and EKFAC: against curvlinops, closed forms, dense algebra and statistics (float64)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import assert_close, state_preserved
from torch import Tensor, nn

import hesse
from hesse._kfac import EKFACOperator, KFACOperator

F64 = torch.float64


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = model.to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p[0].numel()))
    return model


def _mlp() -> nn.Module:
    return _init(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)), 0)


class _Tokens(nn.Module):
    """Linear layers over (B, T, d), then a mean over positions: a 2-D output."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x))).mean(1)


def _cnn(inplace: bool = False) -> nn.Module:
    return _init(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(inplace=inplace),
            nn.Conv2d(3, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        ),
        2,
    )


def _data(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(sizes), y.split(sizes)))


def _problem(name: str, loss: str = "ce", reduction: str = "mean") -> tuple[nn.Module, Any, Any]:
    """Models and data where the factors are of full rank (EKFAC's basis is then unique)."""
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model, x, classes, sizes = (
            _mlp(),
            torch.randn(40, 5, generator=g, dtype=F64),
            4,
            [16, 5, 19],
        )
    elif name == "tokens":
        model = _init(_Tokens(), 1)
        x, classes, sizes = torch.randn(30, 4, 5, generator=g, dtype=F64), 3, [18, 12]
    else:
        model, x, classes, sizes = (
            _cnn(),
            torch.randn(48, 2, 8, 8, generator=g, dtype=F64),
            3,
            [30, 18],
        )
    if loss == "ce":
        y = torch.randint(0, classes, (x.shape[0],), generator=g)
        return model, nn.CrossEntropyLoss(reduction=reduction), _data(x, y, sizes)
    y = torch.randn(x.shape[0], classes, generator=g, dtype=F64)
    return model, nn.MSELoss(reduction=reduction), _data(x, y, sizes)


def _curvlinops_dense(cls_name: str, model: nn.Module, crit: Any, data: Any, **kw: Any) -> Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    cls = getattr(curvlinops, cls_name)
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, crit, params, data, check_deterministic=False, **kw)
    n = sum(p.numel() for p in params)
    return op @ torch.eye(n, dtype=F64)


KFAC_CASES = [
    ("mlp", "ce", "mean", "type-2", "expand", True),
    ("mlp", "ce", "mean", "type-2", "expand", False),
    ("mlp", "ce", "sum", "type-2", "expand", True),
    ("mlp", "ce", "mean", "empirical", "expand", False),
    ("mlp", "ce", "sum", "empirical", "expand", True),
    ("mlp", "ce", "mean", "forward-only", "expand", False),
    ("mlp", "mse", "mean", "type-2", "expand", False),
    ("mlp", "mse", "sum", "type-2", "expand", True),
    ("mlp", "mse", "mean", "empirical", "expand", True),
    ("mlp", "mse", "sum", "empirical", "expand", False),
    ("tokens", "ce", "mean", "type-2", "expand", True),
    ("tokens", "ce", "mean", "type-2", "reduce", True),
    ("tokens", "ce", "mean", "type-2", "expand", False),
    ("tokens", "ce", "mean", "type-2", "reduce", False),
    ("tokens", "ce", "sum", "empirical", "reduce", False),
    ("tokens", "ce", "mean", "empirical", "expand", True),
    ("cnn", "ce", "mean", "type-2", "expand", False),
    ("cnn", "ce", "mean", "type-2", "reduce", True),
    ("cnn", "ce", "sum", "empirical", "reduce", False),
    ("cnn", "ce", "mean", "empirical", "expand", True),
]


def _id(case: tuple[Any, ...]) -> str:
    name, loss, red, ft, approx, sep = case
    return f"{name}-{loss}-{red}-{ft}-{approx}-{'sep' if sep else 'joint'}"


@pytest.mark.parametrize("case", KFAC_CASES, ids=_id)
def test_kfac_matches_curvlinops(case: tuple[Any, ...]) -> None:
    name, loss, red, ft, approx, sep = case
    model, crit, data = _problem(name, loss, red)
    kw = dict(fisher_type=ft, kfac_approx=approx, separate_weight_and_bias=sep)
    expected = _curvlinops_dense("KFACLinearOperator", model, crit, data, **kw)
    with state_preserved(model):
        op = KFACOperator(model, crit, data, **kw)
    assert_close(op.to_dense(), expected, rtol=1e-8)


EKFAC_CASES = [c for c in KFAC_CASES if c[3] != "forward-only" and c[1] == "ce"]


@pytest.mark.parametrize("case", EKFAC_CASES, ids=_id)
def test_ekfac_matches_curvlinops(case: tuple[Any, ...]) -> None:
    name, loss, red, ft, approx, sep = case
    model, crit, data = _problem(name, loss, red)
    kw = dict(fisher_type=ft, kfac_approx=approx, separate_weight_and_bias=sep)
    expected = _curvlinops_dense("EKFACLinearOperator", model, crit, data, **kw)
    with state_preserved(model):
        op = EKFACOperator(model, crit, data, **kw)
    assert_close(op.to_dense(), expected, rtol=1e-8)


class _Positions(nn.Module):
    """(B, T, D) -> outputs with one loss term per position; ``mix`` couples the positions."""

    def __init__(self, ce: bool, mix: bool) -> None:
        super().__init__()
        self.ce = ce
        self.inner = nn.Linear(2, 4)
        self.across = nn.Linear(3, 3) if mix else None  # over the T = 3 positions
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inner(x))
        if self.across is not None:
            h = self.across(h.transpose(1, 2)).transpose(1, 2)
        f = self.out(h)  # (B, T, C)
        return f.transpose(1, 2) if self.ce else f  # (B, C, T) for cross-entropy


def _ggn_by_hand(model: nn.Module, x: Tensor, hessian: Callable[[Tensor], Tensor]) -> Tensor:
    """Jᵀ H J from ``torch.func.jacrev``; ``hessian`` maps the outputs to ``H`` (flat)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda q: torch.func.functional_call(model, q, (x,)).reshape(-1))(
        params
    )
    j = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in params], 1)
    return j.T @ hessian(model(x).detach()) @ j


@pytest.mark.parametrize("mix", [False, True], ids=["per-position", "mixing"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ekfac_with_a_loss_term_per_position_keeps_the_ggn_trace(loss: str, mix: bool) -> None:
    # Type-2 columns span every position at once; EKFAC's per-sample gradients must take one
    # (class, position) at a time, or their squares add products of different positions.
    model = _init(_Positions(loss == "ce", mix), 3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 2, generator=g, dtype=F64)
    if loss == "ce":
        crit: nn.Module = nn.CrossEntropyLoss()
        y = torch.randint(0, 3, (5, 3), generator=g)

        def hessian(f: Tensor) -> Tensor:
            p = torch.softmax(f, 1).transpose(1, 2).reshape(-1, 3)  # (B T, C)
            blocks = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            h = torch.block_diag(*blocks) / p.shape[0]  # rows (b, t, c)
            # to the outputs' order (b, c, t)
            order = torch.arange(5 * 3 * 3).reshape(5, 3, 3).transpose(1, 2).reshape(-1)
            inverse = torch.argsort(order)
            return h[inverse][:, inverse]
    else:
        crit = nn.MSELoss(reduction="sum")
        y = torch.randn(5, 3, 3, generator=g, dtype=F64)

        def hessian(f: Tensor) -> Tensor:
            return 2 * torch.eye(f.numel(), dtype=F64)

    ggn = _ggn_by_hand(model, x, hessian)
    ekfac = EKFACOperator(model, crit, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert_close(torch.tensor(ekfac.trace(), dtype=F64), ggn.trace(), rtol=1e-10)
    dense = ekfac.to_dense()
    assert_close(dense.trace(), ggn.trace(), rtol=1e-10)
    # Within each block, the refit never moves further from the GGN than KFAC.
    kfac = KFACOperator(model, crit, [(x[:2], y[:2]), (x[2:], y[2:])]).to_dense()
    for block in ekfac._blocks:
        rows = ekfac._indices(block)
        exact = ggn[rows][:, rows]
        assert_close(dense[rows][:, rows].trace(), exact.trace(), rtol=1e-10)
        error = (dense[rows][:, rows] - exact).norm()
        assert error <= (kfac[rows][:, rows] - exact).norm() * (1 + 1e-10) + 1e-12


@pytest.mark.parametrize("heuristic", [False, True])
def test_inverse_matches_curvlinops(heuristic: bool) -> None:
    curvlinops = pytest.importorskip("curvlinops")
    model, crit, data = _problem("mlp")
    params = list(model.parameters())
    ref = curvlinops.KFACLinearOperator(
        model, crit, params, data, check_deterministic=False, fisher_type="type-2"
    )
    inv = curvlinops.KFACInverseLinearOperator(
        ref, damping=1e-2, use_exact_damping=not heuristic, use_heuristic_damping=heuristic
    )
    expected = inv @ torch.eye(ref.shape[0], dtype=F64)
    op = KFACOperator(model, crit, data)
    assert_close(op.inverse(1e-2, heuristic=heuristic).to_dense(), expected, rtol=1e-8)


# -- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("positions", [None, 3])
def test_kfac_is_the_ggn_of_one_linear_layer_with_mse(
    reduction: str, positions: int | None
) -> None:
    g = torch.Generator().manual_seed(4)
    model = _init(nn.Linear(4, 3), 5)
    shape = (20, 4) if positions is None else (20, positions, 4)
    x = torch.randn(*shape, generator=g, dtype=F64)
    y = torch.randn(*shape[:-1], 3, generator=g, dtype=F64)
    data = _data(x, y, [7, 13])
    crit = nn.MSELoss(reduction=reduction)
    op = KFACOperator(model, crit, data, separate_weight_and_bias=False)
    ggn = hesse.GGNOperator(model, crit, data).to_dense()
    assert_close(op.to_dense(), ggn, rtol=1e-10)


# -- algebra on the factors ----------------------------------------------------------------


@pytest.fixture(params=["kfac", "kfac-joint", "ekfac", "ekfac-cnn"])
def operator(request: pytest.FixtureRequest) -> KFACOperator:
    kind = request.param
    model, crit, data = _problem("cnn" if kind.endswith("cnn") else "mlp")
    cls = EKFACOperator if kind.startswith("ekfac") else KFACOperator
    return cls(model, crit, data, separate_weight_and_bias=kind != "kfac-joint")


def test_products_trace_diagonal(operator: KFACOperator) -> None:
    dense = operator.to_dense()
    assert dense.dtype == F64 and operator.shape == dense.shape
    assert_close(dense, dense.T, rtol=1e-12)
    v = torch.randn(operator.shape[0], 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert_close(operator @ v, dense @ v)
    assert_close(operator @ v[:, 0], dense @ v[:, 0])
    as_dict = operator.layout.unflatten(v[:, 1])
    out = operator @ as_dict
    assert set(out) == set(operator.param_names)
    assert_close(operator.layout.flatten(out), dense @ v[:, 1])
    assert_close(operator.diagonal(), dense.diagonal())
    assert operator.trace() == pytest.approx(float(dense.trace()), rel=1e-10)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_inverse_and_logdet(operator: KFACOperator, damping: float) -> None:
    dense = operator.to_dense()
    damped = dense + damping * torch.eye(dense.shape[0], dtype=F64)
    inverse = operator.inverse(damping=damping)
    assert_close(inverse.to_dense(), torch.linalg.inv(damped), rtol=1e-8)
    v = torch.randn(dense.shape[0], 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert_close(inverse @ v, torch.linalg.solve(damped, v), rtol=1e-8)
    assert_close(inverse.diagonal(), torch.linalg.inv(damped).diagonal(), rtol=1e-8)
    assert operator.logdet(damping) == pytest.approx(float(torch.logdet(damped)), rel=1e-9)


def test_heuristic_damping_is_pi_damping_of_the_factors() -> None:
    model = _init(nn.Linear(3, 2), 6)
    g = torch.Generator().manual_seed(7)
    data = (torch.randn(10, 3, generator=g, dtype=F64), torch.randint(0, 2, (10,), generator=g))
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, params=["weight"])
    a, gg = op.factors[""]
    assert a is not None
    lam = 0.1
    pi = math.sqrt((a.trace() / 3) / (gg.trace() / 2))
    expected = torch.kron(
        torch.linalg.inv(gg + lam**0.5 / pi * torch.eye(2, dtype=F64)),
        torch.linalg.inv(a + pi * lam**0.5 * torch.eye(3, dtype=F64)),
    )
    assert_close(op.inverse(lam, heuristic=True).to_dense(), expected, rtol=1e-10)


def test_logdet_of_a_singular_block_without_damping_is_minus_infinity() -> None:
    model = _init(nn.Linear(3, 2), 6)
    g = torch.Generator().manual_seed(3)
    data = (torch.randn(1, 3, generator=g, dtype=F64), torch.tensor([0]))  # A has rank 1
    op = KFACOperator(model, nn.CrossEntropyLoss(), data)
    assert op.logdet() == -math.inf
    assert math.isfinite(op.logdet(1e-3))


def test_spectral_tools_and_solve_accept_the_operators() -> None:
    model, crit, data = _problem("mlp")
    op = KFACOperator(model, crit, data)
    top = hesse.eigsh(op, k=2, seed=0)
    expected = torch.linalg.eigvalsh(op.to_dense())[-2:]
    assert_close(top.eigenvalues, expected, rtol=1e-6)
    ggn = hesse.GGNOperator(model, crit, data)
    b = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(3))
    plain = hesse.solve(ggn, b, damping=1e-2, tol=1e-8)
    preconditioned = hesse.solve(ggn, b, damping=1e-2, tol=1e-8, preconditioner=op.inverse(1e-2))
    assert_close(preconditioned.solution, plain.solution, rtol=1e-6)
    damped = (ggn + 1e-2 * hesse.IdentityOperator.like(ggn)).to_dense()
    assert_close(preconditioned.solution, torch.linalg.solve(damped, b), rtol=1e-6)


# -- Monte Carlo -------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_mc_fisher_is_unbiased_for_type2(loss: str) -> None:
    model, crit, data = _problem("mlp", loss)
    exact = KFACOperator(model, crit, data).factors
    draws = [
        KFACOperator(model, crit, data, fisher_type="mc", mc_samples=4, seed=s).factors
        for s in range(40)
    ]
    for path, (a, g) in exact.items():
        samples = torch.stack([d[path][1] for d in draws])
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(draws))
        assert a is not None and torch.equal(draws[0][path][0], a)  # A is not sampled
        excess = (mean - g).abs() - 4 * se - 1e-12
        assert float(excess.max()) <= 0, (path, float(excess.max()))
    # the same seed draws the same labels; another seed others
    again = KFACOperator(model, crit, data, fisher_type="mc", mc_samples=4, seed=0).factors
    assert torch.equal(again["2"][1], draws[0]["2"][1])
    assert not torch.equal(draws[1]["2"][1], draws[0]["2"][1])


def test_ekfac_mc_runs_both_passes_with_the_same_draws() -> None:
    model, crit, data = _problem("mlp")
    op = EKFACOperator(model, crit, data, fisher_type="mc", seed=3)
    # one draw per sample, weights 1/N: the corrections sum to the trace of the MC KFAC's
    # basis-projected gradients, which equals the MC KFAC trace's gradient covariance part
    kfac = KFACOperator(model, crit, data, fisher_type="mc", seed=3)
    for path, (_, g) in kfac.factors.items():
        assert torch.equal(op.factors[path][1], g)
    assert op.trace() > 0 and math.isfinite(op.logdet(1e-3))


# -- precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_float32_factors(dtype: torch.dtype) -> None:
    model, crit, data = _problem("mlp")
    reference = KFACOperator(model, crit, data)
    half = _mlp().to(dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    half_data = [(x.to(dtype), y) for x, y in data]
    op = KFACOperator(half, crit, half_data)
    assert op.dtype == dtype
    for path, (a, g) in op.factors.items():
        assert a is not None and a.dtype == torch.float32 and g.dtype == torch.float32
        assert bool(torch.isfinite(a).all() and torch.isfinite(g).all())
        ra, rg = reference.factors[path]
        assert ra is not None
        torch.testing.assert_close(a.double(), ra, rtol=0.05, atol=0.05 * float(ra.abs().max()))
        torch.testing.assert_close(g.double(), rg, rtol=0.05, atol=0.05 * float(rg.abs().max()))
    v = torch.randn(op.shape[0], 2).to(dtype)
    out = op @ v
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert math.isfinite(op.logdet(1e-3))


# -- snapshots, state, selection ---------------------------------------------------------------


CHANGES: dict[str, Callable[[nn.Module, nn.Module], None]] = {
    "in_place": lambda m, c: m[0].weight.data.mul_(2.0),
    "data_assign": lambda m, c: setattr(m[0].weight, "data", m[0].weight.data * 2),
    "replaced_parameter": lambda m, c: setattr(m[0], "weight", nn.Parameter(m[0].weight * 2)),
    "criterion_reduction": lambda m, c: setattr(c, "reduction", "sum"),
    # Not parameters or buffers, yet another function (DESIGN.md: attributes read in forward).
    "swapped_activation": lambda m, c: m.__setitem__(1, nn.Sigmoid()),
    "forward_hook": lambda m, c: m[0].register_forward_hook(lambda mod, a, out: 2 * out),
}


class _Caching(nn.Module):
    """Writes attributes of its own on every forward pass, as many models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()
        self.calls = 0
        self.last: Tensor | None = None
        self.mask = torch.tensor([float("nan")])  # a plain tensor attribute, never equal to itself
        self.register_buffer("calibration", torch.full((2,), float("nan")))  # unused, NaN
        self.adjacency = torch.eye(3).to_sparse()

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out = self.net(x)
        self.last = out.detach()
        return out


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_attributes_a_forward_writes_are_no_change(cls: type[KFACOperator]) -> None:
    _, crit, data = _problem("mlp")
    model = _Caching()
    op = cls(model, crit, data)
    before = op.to_dense()
    model(data[0][0])  # the user's own forward between products (a prediction)
    hesse.loss_hessian_diagonal(model, crit, *data[0])  # and another hesse call
    assert_close(op.to_dense(), before)
    g = torch.Generator().manual_seed(0)
    test = [(torch.randn(2, 5, generator=g, dtype=F64), torch.tensor([0, 3]))]
    scores = hesse.influence_scores(
        model, crit, data, test, damping=1e-2, curvature="kfac" if cls is KFACOperator else "ekfac"
    )
    assert scores.shape == (2, sum(x.shape[0] for x, _ in data))


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_class_weights_or_label_smoothing_set_later_are_refused(cls: type[KFACOperator]) -> None:
    model, crit, data = _problem("mlp")
    op = cls(model, crit, data)
    crit.label_smoothing = 0.5
    with pytest.raises(ValueError, match=r"model: the criterion was given class weights or label"):
        op.trace()
    with pytest.raises(ValueError, match=r"criterion: KFAC needs the likelihood"):
        op.refresh()
    crit.label_smoothing = 0.0
    crit.weight = torch.ones(4, dtype=F64)  # class weights (a buffer of the loss)
    with pytest.raises(ValueError, match=r"model: the criterion was given class weights or label"):
        op.diagonal()
    with pytest.raises(ValueError, match=r"criterion: KFAC needs the likelihood"):
        op.refresh()
    crit.weight = None
    op.refresh()
    assert_close(op.to_dense(), cls(model, crit, data).to_dense())


class _TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())  # the decoder: enc.weight


class _Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


def test_a_weight_also_used_in_functional_code_is_refused_and_hooks_are_followed() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
    model = _init(_TiedAutoencoder(), 1)
    with (
        state_preserved(model),
        pytest.raises(ValueError, match=r"params: enc.weight enters the model other"),
    ):
        KFACOperator(model, nn.MSELoss(), (x, y))

    # The same check refuses a layer that is not W a + b in its parameters as they are, and a
    # tie under autocast (one cast of the weight serves both uses: one read in the graph).
    class Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x, 3 * self.weight, self.bias)

    scaled = _init(nn.Sequential(Scaled(5, 4), nn.Tanh(), nn.Linear(4, 5)), 3)
    with pytest.raises(
        ValueError, match=r"params: 0.weight enters the model other than as W a \+ b of its layer 0"
    ):
        KFACOperator(scaled, nn.MSELoss(), (x, y))

    class Autocast(_TiedAutoencoder):
        def forward(self, x: Tensor) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.tanh(self.enc(x)) @ self.enc.weight

    tied = _init(Autocast(), 1).float()
    with pytest.raises(ValueError, match=r"params: enc.weight enters the model other than"):
        KFACOperator(tied, nn.MSELoss(), (x.float(), y.float()))
    # The bias is used by its layer only.
    assert KFACOperator(model, nn.MSELoss(), (x, y), params=["enc.bias"]).shape == (3, 3)
    # A hook that changes a layer's output is part of the model after the layer, like a module.
    base = _init(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 5)), 2)
    plain = nn.Sequential(copy.deepcopy(base[0]), _Double(), *copy.deepcopy(base[1:]))
    hooked = copy.deepcopy(base)
    hooked[0].register_forward_hook(lambda module, args, out: 2 * out)
    expected = KFACOperator(plain, nn.MSELoss(), (x, y)).to_dense()
    assert_close(KFACOperator(hooked, nn.MSELoss(), (x, y)).to_dense(), expected)


class _Attention(nn.Module):
    """Separate q, k, v projections with biases: softmax ignores the key's bias entirely."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 6**0.5, -1)
        return self.out((weights @ self.v(x)).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_bias_the_model_ignores_is_no_second_use(dtype: torch.dtype) -> None:
    # k.bias's gradient is rounding noise in both sums the layer-use check compares.
    model = _Attention().to(dtype)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 5, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    op = KFACOperator(model, nn.CrossEntropyLoss(), (x, y))  # refused as a "second use" before
    assert bool(torch.isfinite(op.to_dense()).all())


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "forward-only"])
def test_only_mc_draws_from_the_global_generator(fisher_type: str) -> None:
    model, crit, data = _problem("mlp")
    state = torch.get_rng_state()
    KFACOperator(model, crit, data, fisher_type=fisher_type)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_a_changed_model_is_refused_until_refresh(change: str, cls: type[KFACOperator]) -> None:
    model, crit, data = _problem("mlp")
    op = cls(model, crit, data)
    before = op.to_dense()
    inverse = op.inverse(1e-2)
    v = torch.ones(op.shape[0], dtype=F64)
    CHANGES[change](model, crit)
    for call in (
        lambda: op @ v,
        op.to_dense,
        op.diagonal,
        op.trace,
        op.logdet,
        lambda: op.inverse(1e-2),
        lambda: inverse @ v,
    ):
        with pytest.raises(ValueError, match=r"model: .* since the factors were computed"):
            call()
    op.refresh()
    assert_close(op.to_dense(), cls(model, crit, data).to_dense())
    assert not torch.allclose(op.to_dense(), before)
    with pytest.raises(ValueError, match=r"KFACInverse: made before .*refresh\(\)"):
        inverse @ v  # an inverse of the old factors
    fresh = op.inverse(1e-2)
    assert_close(fresh @ (op @ v + 1e-2 * v), v, rtol=1e-8)


class _Failing(nn.Module):
    """Raises in the forward pass of a batch of 3 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 3:
            raise RuntimeError("model failed")
        return self.net(x)


def test_state_preserved_and_hooks_removed_on_error() -> None:
    _, crit, data = _problem("mlp")
    model = _Failing()
    model.train()
    model.net[0].weight.grad = torch.ones_like(model.net[0].weight)
    bad = [*data, (data[0][0][:3], data[0][1][:3])]
    # The model's own error, with the batch it failed on.
    with state_preserved(model), pytest.raises(ValueError, match="batch 3 .*model failed"):
        KFACOperator(model, crit, bad)
    assert all(not m._forward_hooks for m in model.modules())
    with state_preserved(model):
        op = KFACOperator(model, crit, data)
    assert all(not m._forward_hooks for m in model.modules())
    assert op.param_names[0] == "net.0.weight"


def test_inplace_activation_after_a_layer() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 2, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    crit = nn.CrossEntropyLoss()
    plain = KFACOperator(_cnn(inplace=False), crit, (x, y)).to_dense()
    inplace = KFACOperator(_cnn(inplace=True), crit, (x, y)).to_dense()
    assert_close(inplace, plain, rtol=1e-12)


def test_parameter_subsets_are_sub_blocks() -> None:
    model, crit, data = _problem("mlp")
    full = KFACOperator(model, crit, data).to_dense()
    names = ["0.bias", "2.weight"]
    sub = KFACOperator(model, crit, data, params=names)
    layout = KFACOperator(model, crit, data).layout
    rows = torch.cat([torch.arange(layout.numel)[layout.slice(n)] for n in names])
    assert sub.param_names == tuple(names)
    assert_close(sub.to_dense(), full[rows][:, rows])


def test_model_in_train_mode_with_frozen_layers() -> None:
    model, crit, data = _problem("mlp")
    model[0].requires_grad_(False)
    op = KFACOperator(model, crit, data)
    assert op.param_names == ("2.weight", "2.bias")
    assert all(p.grad is None for p in model.parameters())


# -- errors ------------------------------------------------------------------------------------


def test_unsupported_parameters_are_named() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(F64)
    data = (torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 0, 1, 1]))
    with (
        state_preserved(model),
        pytest.raises(ValueError, match=r"1\.weight \(LayerNorm\).*params="),
    ):
        KFACOperator(model, nn.CrossEntropyLoss(), data)
    op = KFACOperator(model, nn.CrossEntropyLoss(), data, params=["0.*", "2.*"])
    assert op.shape == (26, 26)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_tied_and_repeated_layers_are_refused() -> None:
    data = (torch.randn(4, 3, dtype=F64), torch.tensor([0, 1, 2, 0]))
    model = _Twice().to(F64)
    with state_preserved(model), pytest.raises(ValueError, match="ran 2 times"):
        KFACOperator(model, nn.CrossEntropyLoss(), data)
    shared = nn.Linear(3, 3).to(F64)
    with pytest.raises(ValueError, match="tied"):
        KFACOperator(nn.Sequential(shared, nn.Tanh(), shared), nn.CrossEntropyLoss(), data)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).to(F64)
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        KFACOperator(tied, nn.CrossEntropyLoss(), data)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fisher_type": "exact"}, ValueError, "fisher_type"),
        ({"kfac_approx": "both"}, ValueError, "kfac_approx"),
        ({"mc_samples": 3}, ValueError, "mc_samples"),
        ({"mc_samples": 0, "fisher_type": "mc"}, ValueError, "mc_samples"),
        ({"separate_weight_and_bias": 1}, TypeError, "separate_weight_and_bias"),
        ({"seed": 1.5, "fisher_type": "mc"}, TypeError, "seed"),
        ({"reduction": "sum"}, ValueError, "contradicts"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    model, crit, data = _problem("mlp")
    with pytest.raises(error, match=match):
        KFACOperator(model, crit, data, **kwargs)


@pytest.mark.parametrize(
    ("crit", "match"),
    [
        (nn.L1Loss(), "criterion"),
        (nn.CrossEntropyLoss(weight=torch.ones(4, dtype=F64)), "criterion"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "criterion"),
        (nn.CrossEntropyLoss(reduction="none"), "reduction"),
    ],
)
def test_unsupported_criteria(crit: nn.Module, match: str) -> None:
    model, _, data = _problem("mlp")
    with pytest.raises(ValueError, match=match):
        KFACOperator(model, crit, data)


def test_bad_targets_and_layers() -> None:
    model, crit, data = _problem("mlp")
    x = data[0][0]
    with pytest.raises(ValueError, match="ignore_index"):
        KFACOperator(model, crit, (x, torch.full((x.shape[0],), -100)))
    with pytest.raises(ValueError, match="same shape"):
        KFACOperator(model, nn.MSELoss(), (x, torch.zeros(x.shape[0], 5, dtype=F64)))
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).to(F64)
    with pytest.raises(ValueError, match="groups=1"):
        KFACOperator(grouped, nn.MSELoss(), (torch.randn(2, 2, 3, 3, dtype=F64), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="forward-only"):
        EKFACOperator(model, crit, data, fisher_type="forward-only")


def test_bad_operands_and_damping() -> None:
    model, crit, data = _problem("mlp")
    op = EKFACOperator(model, crit, data)
    n = op.shape[0]
    with pytest.raises(ValueError, match="shape"):
        op @ torch.zeros(n + 1, dtype=F64)
    with pytest.raises(TypeError, match="dtype"):
        op @ torch.zeros(n)
    with pytest.raises(TypeError, match="tensor"):
        op @ [0.0] * n
    with pytest.raises(ValueError, match="keys"):
        op @ {"0.weight": torch.zeros(7, 5, dtype=F64)}
    with pytest.raises(ValueError, match="damping"):
        op.inverse(-1.0)
    with pytest.raises(ValueError, match="damping"):
        op.logdet(float("nan"))
    with pytest.raises(ValueError, match="KFAC only"):
        op.inverse(1e-3, heuristic=True)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_inverse_without_damping_of_a_singular_block_is_refused(cls: type[KFACOperator]) -> None:
    # Cross-entropy's G is singular (the softmax's Hessian has rank C - 1): 0 * inf before.
    model, crit, data = _problem("mlp")
    op = cls(model, crit, data)
    with pytest.raises(ValueError, match="damping: 0 inverts K itself, but the .* is singular"):
        op.inverse(0.0)
    v = torch.ones(op.shape[0], dtype=F64)
    assert bool(torch.isfinite(op.inverse(1e-3) @ v).all())


def test_an_ekfac_refresh_that_fails_keeps_the_operator_as_it_was() -> None:
    model, crit, data = _problem("mlp")

    class FailsOnSixthPass(list[Any]):
        # Read 4 times at construction (checked, counted, factors, correction), then by the
        # refresh: its factors' pass succeeds (on other data: other factors) and its
        # correction's fails.
        passes = 0

        def __iter__(self) -> Any:
            FailsOnSixthPass.passes += 1
            if FailsOnSixthPass.passes == 5:
                return iter([(2 * x, y) for x, y in list.__iter__(self)])
            if FailsOnSixthPass.passes == 6:
                raise RuntimeError("the data went away")
            return super().__iter__()

    op = EKFACOperator(model, crit, FailsOnSixthPass(data))
    before = op.to_dense()
    with pytest.raises(RuntimeError, match="the data went away"):
        op.refresh()  # the factors' pass succeeded, the correction's failed
    assert torch.equal(op.to_dense(), before)


def test_built_and_refreshed_inside_inference_mode() -> None:
    model, crit, data = _problem("mlp")
    expected = KFACOperator(model, crit, data).to_dense()
    with torch.inference_mode():
        op = KFACOperator(model, crit, data)
        op.refresh()
    assert_close(op.to_dense(), expected)


def test_data_that_does_not_fit_is_named_with_its_batch() -> None:
    model, crit, data = _problem("mlp")
    x, y = data[0]
    with pytest.raises(
        ValueError, match=r"data: the model and criterion fail on batch 0 .*float32"
    ):
        KFACOperator(model, crit, (x.float(), y))
    with pytest.raises(ValueError, match=r"data: .* fail on batch 1 .*IndexError"):
        KFACOperator(model, crit, [(x, y), (x, y + 10)], fisher_type="empirical")
    # Type-2 never reads the labels, but a wrong one is still refused, with its batch.
    with pytest.raises(ValueError, match=r"fail on batch 1 .*class index 1[0-3] is out of range"):
        KFACOperator(model, crit, [(x, y), (x, y + 10)])


def test_a_replaced_layer_and_numpy_damping() -> None:
    model, crit, data = _problem("mlp")
    op = KFACOperator(model, crit, data)
    assert math.isfinite(op.logdet(np.float32(0.1)))  # a NumPy float is a number too
    model[2] = nn.Linear(model[2].in_features, model[2].out_features).to(F64)
    with pytest.raises(ValueError, match=r"model: the layer\(s\) \['2'\] .* no longer part"):
        op.refresh()

"""The chain route (hesse._chain): hand-written Hessian and GGN products of an MLP.

Every product the route gives must equal the independent oracles (torch.autograd.functional
on the loss as a function of the flat selected parameters) to 1e-10 in float64, and the
route's coverage is asserted both ways: taken for the plain ``nn.Sequential`` MLPs it is built
for, left (``chain_products`` returns None) for every model it cannot read exactly, whose
products must then still be the oracle's by the general path.
"""

from __future__ import annotations

import copy
import itertools
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import assert_close, state_preserved
from torch import Tensor, nn
from torch.func import functional_call

import hesse
import hesse._chain
import hesse._operators
import hesse._scratch
import hesse._spectral
from hesse._chain import ChainProducts, chain_products
from hesse._layers import KnownLoss
from hesse._layout import ParamLayout

F64 = torch.float64
Criterion = Callable[..., Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _labels(batch: int, classes: int, seed: int = 1) -> Tensor:
    return torch.randint(0, classes, (batch,), generator=_gen(seed))


M = TypeVar("M", bound=nn.Module)


def _init(model: M, seed: int, scale: float = 0.6) -> M:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def mlp(
    widths: list[int],
    act: Callable[[], nn.Module] = nn.Tanh,
    *,
    bias: bool = True,
    seed: int = 0,
) -> nn.Sequential:
    """Linear layers at even positions (0, 2, 4, ...), a fresh activation between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b, bias=bias, dtype=F64))
    model = nn.Sequential(*layers)
    _init(model, seed)
    return model


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was


# -- oracles ---------------------------------------------------------------------------------


def _selected(model: nn.Module, params: list[str] | None) -> list[str]:
    named = list(model.named_parameters())
    if params is None:
        return [n for n, p in named if p.requires_grad]
    return [n for n, _ in named if n in params]


def _outputs_of(model: nn.Module, names: list[str], x: Tensor) -> tuple[Tensor, Callable]:
    """The flat selected parameters and ``theta ↦ model(x)`` with them substituted.

    On a copy: torch.func.functional_call leaves a module registered under two names holding
    the substituted tensors (torch 2.13), which must not reach the model under test.
    """
    model = copy.deepcopy(model)
    values = dict(model.named_parameters())
    shapes = [values[n].shape for n in names]
    theta = torch.cat([values[n].detach().reshape(-1) for n in names])

    def outputs(t: Tensor) -> Tensor:
        ps, start = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = t[start : start + s.numel()].view(s)
            start += s.numel()
        return functional_call(model, ps, (x,))

    return theta, outputs


def oracle_hessian(
    model: nn.Module, criterion: Criterion, x: Tensor, y: Any, params: list[str] | None = None
) -> Tensor:
    """``∇²_θ criterion(model(x), y)`` over the flat selected parameters, eval mode."""
    with eval_mode(model):
        theta, outputs = _outputs_of(model, _selected(model, params), x)
        return torch.autograd.functional.hessian(lambda t: criterion(outputs(t), y), theta)


def oracle_ggn(
    model: nn.Module, criterion: Criterion, x: Tensor, y: Any, params: list[str] | None = None
) -> Tensor:
    """``Jᵀ H_z J`` from torch.autograd.functional.jacobian and hessian, eval mode."""
    with eval_mode(model):
        theta, outputs = _outputs_of(model, _selected(model, params), x)
        with torch.no_grad():
            z = outputs(theta)
        j = torch.autograd.functional.jacobian(outputs, theta).reshape(z.numel(), -1)
        h = torch.autograd.functional.hessian(lambda out: criterion(out, y), z)
        h = h.reshape(z.numel(), z.numel())
    return j.T @ h @ j


def check_products(op: Any, dense: Tensor, seed: int = 5, rtol: float = 1e-10) -> None:
    """``op @ V`` (three columns) and ``op @ v`` against the dense oracle."""
    v = _randn(op.shape[0], 3, seed=seed, dtype=dense.dtype)
    assert_close(op @ v, dense @ v, rtol=rtol)
    assert_close(op @ v[:, 1], dense @ v[:, 1], rtol=rtol)


def check_operators(
    model: nn.Module,
    criterion: Criterion,
    x: Tensor,
    y: Any,
    params: list[str] | None = None,
    **kwargs: Any,
) -> None:
    """Hessian and GGN products, one and three columns, against both oracles."""
    hess = hesse.HessianOperator(model, criterion, (x, y), params=params, **kwargs)
    assert hess.param_names == tuple(_selected(model, params))
    check_products(hess, oracle_hessian(model, criterion, x, y, params))
    ggn = hesse.GGNOperator(model, criterion, (x, y), params=params, **kwargs)
    check_products(ggn, oracle_ggn(model, criterion, x, y, params))


def direct(
    model: nn.Module,
    criterion: Criterion,
    inputs: tuple[Any, ...],
    y: Any,
    params: list[str] | None = None,
) -> ChainProducts | None:
    """``chain_products`` called as the operators call it, the model in eval mode."""
    layout = ParamLayout.from_module(model, params)
    values = {n: p.detach() for n, p in model.named_parameters() if n in layout.names}
    with eval_mode(model), torch.no_grad():
        return chain_products(model, layout, values, inputs, y, criterion)


@pytest.fixture
def routes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each ``chain_products`` call of the operators took the route."""
    taken: list[bool] = []
    original = hesse._operators.chain_products

    def spy(*args: Any, **kwargs: Any) -> ChainProducts | None:
        out = original(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(hesse._operators, "chain_products", spy)
    return taken


# -- what the route is built for: oracle agreement and coverage -----------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def _custom(out: Tensor, t: Tensor) -> Tensor:
    """A loss whose Hessian in the outputs couples the classes and is not PSD."""
    return (out.sin() * t).sum() + 0.1 * (out.sum(dim=1) ** 4).mean()


# name: (widths, bias, criterion, params)
STRUCTURES: dict[str, tuple[list[int], bool, str, list[str] | None]] = {
    "2-layers-ce-mean-all": ([4, 6, 3], True, "ce", None),
    "2-layers-nobias-ce-sum-last-weight": ([4, 6, 3], False, "ce_sum", ["2.weight"]),
    "3-layers-mse-subset": ([4, 5, 4, 3], True, "mse", ["0.bias", "4.weight"]),
    "3-layers-nobias-custom-all": ([4, 5, 4, 3], False, "custom", None),
    "3-layers-ce-mean-middle-weight": ([4, 5, 4, 3], True, "ce", ["2.weight"]),
}


def _criterion(kind: str, batch: int, classes: int) -> tuple[Criterion, Tensor]:
    if kind == "ce":
        return nn.CrossEntropyLoss(), _labels(batch, classes)
    if kind == "ce_sum":
        return nn.CrossEntropyLoss(reduction="sum"), _labels(batch, classes)
    if kind == "mse":
        return nn.MSELoss(), _randn(batch, classes, seed=2)
    return (lambda out, t: _custom(out, t)), _randn(batch, classes, seed=2)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_products_equal_the_oracle_and_take_the_route(
    act: str, structure: str, routes: list[bool]
) -> None:
    widths, bias, kind, params = STRUCTURES[structure]
    model = mlp(widths, ACTIVATIONS[act], bias=bias, seed=3)
    x = _randn(7, widths[0], seed=4)
    criterion, y = _criterion(kind, 7, widths[-1])
    assert direct(model, criterion, (x,), y, params) is not None
    check_operators(model, criterion, x, y, params)
    assert routes and all(routes)


@pytest.mark.parametrize(
    "params",
    [
        ["4.weight", "4.bias"],  # the last layer only
        ["4.bias"],
        ["0.bias", "2.bias", "4.bias"],  # biases only
        ["0.weight"],  # the first layer's weight only
        ["2.bias", "4.weight"],
    ],
    ids=str,
)
def test_partial_selections_take_the_route(params: list[str], routes: list[bool]) -> None:
    model = mlp([4, 5, 4, 3], nn.SiLU, seed=6)
    x, y = _randn(9, 4, seed=7), _labels(9, 3)
    criterion = nn.CrossEntropyLoss()
    assert direct(model, criterion, (x,), y, params) is not None
    check_operators(model, criterion, x, y, params)
    assert routes and all(routes)


def _lin(a: int, b: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(a, b, bias=bias, dtype=F64)


# name: (layers, criterion kind, params)
SHAPES: dict[str, tuple[Callable[[], list[nn.Module]], str, list[str] | None]] = {
    "leading-activation": (lambda: [nn.Tanh(), _lin(4, 5), nn.Sigmoid(), _lin(5, 3)], "ce", None),
    "trailing-activation": (lambda: [_lin(4, 5), nn.Tanh(), _lin(5, 3), nn.Sigmoid()], "mse", None),
    "consecutive-activations": (
        lambda: [_lin(4, 5), nn.Tanh(), nn.ReLU(), _lin(5, 4), nn.SiLU(), nn.GELU(), _lin(4, 3)],
        "ce",
        None,
    ),
    "relu-then-tanh": (lambda: [_lin(4, 5), nn.ReLU(), nn.Tanh(), _lin(5, 3)], "custom", None),
    "relu-then-tanh-last-layer": (
        lambda: [_lin(4, 5), nn.ReLU(), nn.Tanh(), _lin(5, 3)],
        "custom",
        ["3.weight"],
    ),
    "one-linear": (lambda: [_lin(4, 3)], "ce", None),
    "linear-after-linear": (
        lambda: [_lin(4, 5, bias=False), _lin(5, 4), nn.Tanh(), _lin(4, 3)],
        "ce",
        None,
    ),
    "mixed-bias": (lambda: [_lin(4, 5, bias=False), nn.SiLU(), _lin(5, 3)], "ce_sum", None),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_chains_of_other_shapes_take_the_route(name: str, routes: list[bool]) -> None:
    layers, kind, params = SHAPES[name]
    model = _init(nn.Sequential(*layers()), 27)
    x = _randn(8, 4, seed=28)
    criterion, y = _criterion(kind, 8, 3)
    assert direct(model, criterion, (x,), y, params) is not None
    check_operators(model, criterion, x, y, params)
    assert routes and all(routes)


def test_frozen_layers_are_constants_of_the_route(routes: list[bool]) -> None:
    # params=None selects requires_grad parameters only: the frozen first layer is a constant.
    model = mlp([4, 5, 4, 3], nn.Tanh, seed=8)
    model[0].requires_grad_(False)
    x, y = _randn(6, 4, seed=9), _labels(6, 3)
    assert direct(model, nn.CrossEntropyLoss(), (x,), y) is not None
    check_operators(model, nn.CrossEntropyLoss(), x, y)
    assert routes and all(routes)


def test_a_repeated_activation_instance_keeps_the_route(routes: list[bool]) -> None:
    act = nn.Tanh()
    model = nn.Sequential(
        nn.Linear(4, 5, dtype=F64), act, nn.Linear(5, 4, dtype=F64), act, nn.Linear(4, 3, dtype=F64)
    )
    _init(model, 10)
    x, y = _randn(7, 4, seed=11), _labels(7, 3)
    assert direct(model, nn.CrossEntropyLoss(), (x,), y) is not None
    check_operators(model, nn.CrossEntropyLoss(), x, y)
    assert routes and all(routes)


def test_an_in_place_activation_keeps_the_route(routes: list[bool]) -> None:
    model = mlp([4, 5, 4, 3], lambda: nn.ReLU(inplace=True), seed=12)
    x, y = _randn(7, 4, seed=13), _randn(7, 3, seed=14)
    assert direct(model, nn.MSELoss(), (x,), y) is not None
    check_operators(model, nn.MSELoss(), x, y)
    assert routes and all(routes)


def test_token_inputs_take_the_route(routes: list[bool]) -> None:
    model = mlp([4, 5, 3], nn.GELU, seed=15)
    x = _randn(5, 3, 4, seed=16)  # (B, T, d)
    y = torch.randint(0, 3, (5, 3), generator=_gen(17))

    def criterion(out: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(out.flatten(0, 1), t.flatten())

    assert direct(model, criterion, (x,), y) is not None
    check_operators(model, criterion, x, y)
    assert routes and all(routes)


def test_a_leading_flatten_takes_the_route(routes: list[bool]) -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5, dtype=F64), nn.Sigmoid(), nn.Linear(5, 3, dtype=F64)
    )
    _init(model, 18)
    x, y = _randn(8, 2, 3, seed=19), _labels(8, 3)
    assert direct(model, nn.CrossEntropyLoss(), (x,), y) is not None
    check_operators(model, nn.CrossEntropyLoss(), x, y)
    assert routes and all(routes)


def test_identity_and_dropout_are_skipped_with_training_true(routes: list[bool]) -> None:
    model = nn.Sequential(
        nn.Linear(4, 5, dtype=F64),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Identity(),
        nn.Linear(5, 4, dtype=F64),
        nn.LeakyReLU(0.1),
        nn.Dropout(0.3),
        nn.Linear(4, 3, dtype=F64),
    )
    _init(model, 20)
    model.train()
    x, y = _randn(9, 4, seed=21), _labels(9, 3)
    criterion = nn.CrossEntropyLoss()
    with state_preserved(model):
        # The oracle in eval mode: dropout off, as hesse keeps it with training=True.
        check_operators(model, criterion, x, y, training=True)
    assert routes and all(routes)
    assert direct(model, criterion, (x,), y) is not None


def test_several_batches_are_weighted_as_the_dataset_loss(routes: list[bool]) -> None:
    model = mlp([4, 5, 3], nn.Tanh, seed=22)
    x, y = _randn(11, 4, seed=23), _labels(11, 3)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batches
    criterion = nn.CrossEntropyLoss()
    check_products(
        hesse.HessianOperator(model, criterion, data), oracle_hessian(model, criterion, x, y)
    )
    check_products(hesse.GGNOperator(model, criterion, data), oracle_ggn(model, criterion, x, y))
    assert routes and all(routes)


def test_float32_takes_the_route_and_agrees_with_float64(routes: list[bool]) -> None:
    model = mlp([4, 5, 4, 3], nn.Tanh, seed=24)
    x, y = _randn(7, 4, seed=25), _labels(7, 3)
    v = _randn(model_numel(model), 3, seed=26)
    criterion = nn.CrossEntropyLoss()
    exact = hesse.HessianOperator(model, criterion, (x, y)) @ v
    model32 = model.float()
    got = hesse.HessianOperator(model32, criterion, (x.float(), y)) @ v.float()
    assert routes and all(routes)
    assert got.dtype == torch.float32
    assert_close(got.double(), exact, rtol=1e-5)


def model_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- what the route must leave to the general path -------------------------------------------


class _Scaled(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 1.5 * super().forward(x)


class _PlainSubclass(nn.Linear):
    pass


class _PlainSeq(nn.Sequential):
    pass


class _Seq(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).sin()


Build = tuple[nn.Sequential, Criterion, Tensor, Any, list[str] | None]


def _base() -> list[nn.Module]:
    return [
        nn.Linear(4, 4, dtype=F64),
        nn.Tanh(),
        nn.Linear(4, 4, dtype=F64),
        nn.Tanh(),
        nn.Linear(4, 3, dtype=F64),
    ]


def _built(layers: list[nn.Module], seed: int = 30, sequential: type = nn.Sequential) -> Build:
    model = _init(sequential(*layers), seed)
    return model, nn.CrossEntropyLoss(), _randn(7, 4, seed=seed + 1), _labels(7, 3), None


def _linear_subclass() -> Build:
    layers = _base()
    layers[2] = _Scaled(4, 4, dtype=F64)
    return _built(layers)


def _plain_linear_subclass() -> Build:
    layers = _base()
    layers[0] = _PlainSubclass(4, 4, dtype=F64)
    return _built(layers)


def _sequential_subclass() -> Build:
    return _built(_base(), sequential=_Seq)


def _plain_sequential_subclass() -> Build:
    return _built(_base(), sequential=_PlainSeq)


def _unused_parameter() -> Build:
    # A selected parameter outside the linear layers (its rows of the Hessian are zero).
    model, criterion, x, y, _ = _built(_base())
    model.register_parameter("scale", nn.Parameter(_randn(2, seed=48)))
    model[2].register_parameter("extra", nn.Parameter(_randn(3, seed=49)))
    return model, criterion, x, y, None


def _child_forward_hook() -> Build:
    built = _built(_base())
    built[0][1].register_forward_hook(lambda m, args, out: out * 0.5)
    return built


def _child_noop_forward_hook() -> Build:
    # Leaves the outputs alone: only the structural check can catch it.
    built = _built(_base())
    built[0][2].register_forward_hook(lambda m, args, out: None)
    return built


def _sequential_pre_hook() -> Build:
    built = _built(_base())
    built[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    return built


def _sequential_noop_pre_hook() -> Build:
    built = _built(_base())
    built[0].register_forward_pre_hook(lambda m, args: None)
    return built


def _child_backward_hook() -> Build:
    built = _built(_base())
    built[0][2].register_full_backward_hook(lambda m, gin, gout: None)
    return built


def _instance_forward() -> Build:
    built = _built(_base())
    first = built[0][0]

    def forward(self: nn.Linear, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + 0.25

    first.forward = types.MethodType(forward, first)
    return built


def _instance_forward_same_outputs() -> Build:
    # The class's own forward, set on the instance: only the structural check can catch it.
    built = _built(_base())
    middle = built[0][2]
    middle.forward = types.MethodType(nn.Linear.forward, middle)
    return built


def _parametrised_unselected_layer() -> Build:
    # The parametrised layer unselected: only the plain layers are selected.
    model, criterion, x, y, _ = _built(_base())
    torch.nn.utils.parametrize.register_parametrization(model[2], "weight", _Double())
    return model, criterion, x, y, ["0.weight", "0.bias", "4.weight"]


class _Double(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 2 * w


def _tied_weight() -> Build:
    built = _built(_base())
    model = built[0]
    model[2].weight = model[0].weight
    return built


def _tied_bias() -> Build:
    built = _built(_base())
    model = built[0]
    model[2].bias = model[0].bias
    return built


def _activation(module: nn.Module) -> Callable[[], Build]:
    def build() -> Build:
        layers = _base()
        layers[3] = module
        return _built(layers)

    return build


def _batchnorm() -> Build:
    layers = _base()
    norm = nn.BatchNorm1d(4, dtype=F64)
    layers.insert(2, norm)
    built = _built(layers)
    with torch.no_grad():
        norm.running_mean.copy_(_randn(4, seed=40))  # type: ignore[union-attr]
        norm.running_var.copy_(_randn(4, seed=41).abs() + 0.5)  # type: ignore[union-attr]
    return built


def _late_flatten() -> Build:
    layers = _base()
    layers.insert(1, nn.Flatten())
    return _built(layers)


def _flatten_from_dim_2() -> Build:
    layers = [nn.Flatten(2), nn.Linear(6, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 3, dtype=F64)]
    model = _init(nn.Sequential(*layers), 42)
    x = _randn(5, 2, 3, 2, seed=43)
    return model, nn.MSELoss(), x, _randn(5, 2, 3, seed=44), None


def _nested_sequential() -> Build:
    layers = _base()
    inner = nn.Sequential(layers[2], layers[3])
    return _built([layers[0], layers[1], inner, layers[4]])


def _plain() -> Build:
    return _built(_base())


REFUSED: dict[str, Callable[[], Build]] = {
    "linear-subclass": _linear_subclass,
    "plain-linear-subclass": _plain_linear_subclass,
    "sequential-subclass": _sequential_subclass,
    "plain-sequential-subclass": _plain_sequential_subclass,
    "unused-parameters": _unused_parameter,
    "child-forward-hook": _child_forward_hook,
    "child-noop-forward-hook": _child_noop_forward_hook,
    "sequential-forward-pre-hook": _sequential_pre_hook,
    "sequential-noop-forward-pre-hook": _sequential_noop_pre_hook,
    "child-backward-hook": _child_backward_hook,
    "instance-forward": _instance_forward,
    "instance-forward-same-outputs": _instance_forward_same_outputs,
    "parametrised-unselected-layer": _parametrised_unselected_layer,
    "tied-weight": _tied_weight,
    "tied-bias": _tied_bias,
    "softplus": _activation(nn.Softplus()),
    "elu": _activation(nn.ELU()),
    "gelu-tanh": _activation(nn.GELU(approximate="tanh")),
    "batchnorm": _batchnorm,
    "late-flatten": _late_flatten,
    "flatten-from-dim-2": _flatten_from_dim_2,
    "nested-sequential": _nested_sequential,
}


# The general path warns that torch.func cannot batch these and loops instead.
SLOW = {"child-backward-hook"}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_the_route_cannot_read_take_the_general_path(name: str, routes: list[bool]) -> None:
    model, criterion, x, y, params = REFUSED[name]()
    assert direct(model, criterion, (x,), y, params) is None
    with state_preserved(model):
        if name in SLOW:
            with pytest.warns(hesse.PerformanceWarning):
                check_operators(model, criterion, x, y, params)
        else:
            check_operators(model, criterion, x, y, params)
    assert routes and not any(routes)


def _weight_norm_by_formula(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    assert dim == 0 and v.ndim == 2
    return v * (g / v.norm(dim=1, keepdim=True))


def test_weight_norm_takes_the_general_path(
    routes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, criterion, x, y, _ = _built(_base())
    torch.nn.utils.parametrizations.weight_norm(model[2])
    assert direct(model, criterion, (x,), y) is None
    hess = hesse.HessianOperator(model, criterion, (x, y))
    ggn = hesse.GGNOperator(model, criterion, (x, y))
    # torch's fused weight norm has a wrong second derivative (hesse decomposes it): the
    # oracles differentiate the formula instead.
    with monkeypatch.context() as patched:
        patched.setattr(torch, "_weight_norm", _weight_norm_by_formula)
        dense_h = oracle_hessian(model, criterion, x, y)
        dense_g = oracle_ggn(model, criterion, x, y)
    with state_preserved(model):
        check_products(hess, dense_h)
        check_products(ggn, dense_g)
    assert routes and not any(routes)


def test_the_same_linear_twice_is_refused() -> None:
    layers = _base()
    layers[2] = layers[0]
    model, criterion, x, y, _ = _built(layers)
    assert direct(model, criterion, (x,), y) is None


def test_the_plain_model_of_the_refusal_registry_takes_the_route(routes: list[bool]) -> None:
    # The control for the registry above: its base model, unchanged, is a chain.
    model, criterion, x, y, params = _plain()
    assert direct(model, criterion, (x,), y, params) is not None
    check_operators(model, criterion, x, y, params)
    assert routes and all(routes)


def test_a_global_forward_hook_takes_the_general_path(routes: list[bool]) -> None:
    model, criterion, x, y, _ = _built(_base())
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: calls.append(type(m).__name__)
    )
    try:
        assert direct(model, criterion, (x,), y) is None
        check_operators(model, criterion, x, y)
    finally:
        handle.remove()
    assert calls
    assert routes and not any(routes)
    assert direct(model, criterion, (x,), y) is not None  # removed: the route is back


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused(dtype: torch.dtype) -> None:
    model, criterion, x, y, _ = _built(_base())
    model.to(dtype)
    assert direct(model, criterion, (x.to(dtype),), y) is None


def test_inputs_the_route_cannot_take_are_refused() -> None:
    model, criterion, x, y, _ = _built(_base())
    assert direct(model, criterion, (x, x), y) is None  # two inputs
    assert direct(model, criterion, (_randn(7, 5, seed=50),), y) is None  # the wrong width
    assert direct(model, criterion, (x.float(),), y) is None  # another dtype than the layout's
    assert direct(model, criterion, ([x],), y) is None  # not a tensor
    assert direct(model, nn.MSELoss(), (x[0],), _randn(3, seed=51)) is None  # unbatched
    assert direct(model, criterion, (x,), y) is not None  # the control


def test_a_forward_that_disagrees_with_the_chain_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A patched class passes the structural checks; the forward comparison catches it.
    model, criterion, x, y, _ = _built(_base())
    original = nn.Tanh.forward
    monkeypatch.setattr(nn.Tanh, "forward", lambda self, s: original(self, s) * 0.9)
    assert direct(model, criterion, (x,), y) is None
    check_operators(model, criterion, x, y)


# -- the criterion's Hessian in the outputs ----------------------------------------------------


def _known_case(kind: str) -> tuple[Criterion, Tensor, bool]:
    """A criterion, its target for 8 samples of 3 classes, and whether it has a closed form."""
    labels = _labels(8, 3)
    if kind == "ce":
        return nn.CrossEntropyLoss(), labels, True
    if kind == "ce_sum":
        return nn.CrossEntropyLoss(reduction="sum"), labels, True
    if kind == "mse_sum":
        return nn.MSELoss(reduction="sum"), _randn(8, 3, seed=2), True
    if kind == "ce_weighted":
        return nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=F64)), labels, False
    if kind == "ce_smoothing":
        return nn.CrossEntropyLoss(label_smoothing=0.1), labels, False
    if kind == "ce_ignored":  # sample 0's class is ignored: the mean is over the other 7
        return nn.CrossEntropyLoss(ignore_index=int(labels[0])), labels, False
    if kind == "ce_soft":
        return nn.CrossEntropyLoss(), torch.softmax(_randn(8, 3, seed=2), dim=1), False
    assert kind == "subclass"

    class Scaled(nn.CrossEntropyLoss):
        def forward(self, out: Tensor, t: Tensor) -> Tensor:
            return 3.0 * super().forward(out, t)

    return Scaled(), labels, False


@pytest.mark.parametrize(
    "kind",
    ["ce", "ce_sum", "mse_sum", "ce_weighted", "ce_smoothing", "ce_ignored", "ce_soft", "subclass"],
)
def test_cross_entropy_and_mse_take_their_closed_form(kind: str, routes: list[bool]) -> None:
    # Cross-entropy and MSE skip torch.func for their outputs' Hessian; every variant the
    # closed form does not cover (class weights, smoothing, ignored or soft targets, a
    # subclass) goes through torch.func, and all agree with the oracle.
    model = mlp([4, 5, 3], nn.Tanh, seed=66)
    x = _randn(8, 4, seed=67)
    criterion, y, closed = _known_case(kind)
    chain = direct(model, criterion, (x,), y)
    assert chain is not None
    assert isinstance(getattr(chain.hz, "__self__", None), KnownLoss) == closed
    rows = _randn(3, model_numel(model), seed=68)
    assert_close(chain.hessian(rows), rows @ oracle_hessian(model, criterion, x, y))
    assert_close(chain.ggn(rows), rows @ oracle_ggn(model, criterion, x, y))
    check_operators(model, criterion, x, y)


def test_a_patched_cross_entropy_fails_the_gradient_check() -> None:
    # The class is nn.CrossEntropyLoss, but the instance's forward was replaced: the
    # closed-form gradient disagrees with autograd's, and torch.func gives the patched loss's
    # Hessian (which couples the samples).
    criterion = nn.CrossEntropyLoss()
    criterion.forward = types.MethodType(  # type: ignore[method-assign]
        lambda self, out, t: 2.0 * F.cross_entropy(out, t) ** 2, criterion
    )
    model = mlp([4, 5, 3], nn.Tanh, seed=69)
    x, y = _randn(8, 4, seed=70), _labels(8, 3)
    chain = direct(model, criterion, (x,), y)
    assert chain is not None
    assert not isinstance(getattr(chain.hz, "__self__", None), KnownLoss)
    check_operators(model, criterion, x, y)


# -- column chunks, state, sessions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "cpu_bytes", "sizes"),
    [
        (1, 1 << 21, [1] * 5),  # one column per chunk
        (2 * 9 * 6, 1 << 21, [2, 2, 1]),  # two per chunk
        (1 << 24, 4 * 9 * 6 * 8, [3, 2]),  # four fit the CPU's budget: equal chunks instead
    ],
)
def test_column_chunks_give_the_same_products(
    entries: int, cpu_bytes: int, sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mlp([4, 5, 4, 3], nn.SiLU, seed=60)
    x, y = _randn(9, 4, seed=61), _labels(9, 3)
    criterion = nn.CrossEntropyLoss()
    chain = direct(model, criterion, (x,), y)
    assert chain is not None
    rows = _randn(5, model_numel(model), seed=62)
    whole_h, whole_g = chain.hessian(rows), chain.ggn(rows)

    calls: list[int] = []
    product = ChainProducts._product

    def counted(self: ChainProducts, tangents: Tensor, second_order: bool, out: Tensor) -> None:
        calls.append(tangents.shape[0])
        product(self, tangents, second_order, out)

    monkeypatch.setattr(hesse._chain, "_CHUNK_ENTRIES", entries)
    monkeypatch.setattr(hesse._scratch, "CPU_CHUNK_BYTES", cpu_bytes)
    monkeypatch.setattr(ChainProducts, "_product", counted)
    assert_close(chain.hessian(rows), whole_h)
    assert_close(chain.ggn(rows), whole_g)
    assert calls == sizes * 2
    assert_close(whole_h, rows @ oracle_hessian(model, criterion, x, y))
    assert_close(whole_g, rows @ oracle_ggn(model, criterion, x, y))
    # Through the operators, chunked.
    check_operators(model, criterion, x, y)


def test_products_leave_the_model_as_they_found_it(routes: list[bool]) -> None:
    model = mlp([4, 5, 4, 3], nn.Tanh, seed=63)
    model.train()
    first, middle = model[0], model[2]
    assert isinstance(first, nn.Linear) and isinstance(middle, nn.Linear)
    first.weight.grad = torch.ones_like(first.weight)
    middle.bias.requires_grad_(False)
    x, y = _randn(7, 4, seed=64), _labels(7, 3)
    v = _randn(model_numel(model), 3, seed=65)
    params = ["0.weight", "2.bias", "4.weight"]
    with state_preserved(model):
        for op_class in (hesse.HessianOperator, hesse.GGNOperator):
            op = op_class(model, nn.CrossEntropyLoss(), (x, y), params=params)
            w = v[: op.shape[0]]
            op @ w
            op @ w[:, 0]
            with op.session():
                op @ w
                op @ w[:, 0]
    assert routes and all(routes)
    assert model.training


def test_a_session_keeps_the_chain(routes: list[bool]) -> None:
    model = mlp([4, 5, 4, 3], nn.GELU, seed=66)
    x, y = _randn(7, 4, seed=67), _labels(7, 3)
    criterion = nn.CrossEntropyLoss()
    v = _randn(model_numel(model), 3, seed=68)
    for op_class, oracle in (
        (hesse.HessianOperator, oracle_hessian),
        (hesse.GGNOperator, oracle_ggn),
    ):
        op = op_class(model, criterion, (x, y))
        dense = oracle(model, criterion, x, y)
        routes.clear()
        with op.session():
            first = op @ v
            second = op @ v
            single = op @ v[:, 2]
        assert routes == [True], routes  # built once, kept for the session's batch
        assert torch.equal(first, second)
        assert_close(first, dense @ v)
        assert_close(single, dense @ v[:, 2])


def test_products_outside_a_session_see_changed_weights(routes: list[bool]) -> None:
    model = mlp([4, 5, 4, 3], nn.Sigmoid, seed=69)
    x, y = _randn(7, 4, seed=70), _labels(7, 3)
    criterion = nn.CrossEntropyLoss()
    v = _randn(model_numel(model), 2, seed=71)
    hess = hesse.HessianOperator(model, criterion, (x, y))
    ggn = hesse.GGNOperator(model, criterion, (x, y))
    before_h, before_g = hess @ v, ggn @ v
    assert_close(before_h, oracle_hessian(model, criterion, x, y) @ v)
    with torch.no_grad():
        model[0].weight.data.mul_(1.7)  # type: ignore[operator]
        model[4].bias.data.add_(0.5)  # type: ignore[operator]
    after_h, after_g = hess @ v, ggn @ v
    assert not torch.allclose(after_h, before_h)
    assert not torch.allclose(after_g, before_g)
    assert_close(after_h, oracle_hessian(model, criterion, x, y) @ v)
    assert_close(after_g, oracle_ggn(model, criterion, x, y) @ v)
    assert_close(hess @ v[:, 0], oracle_hessian(model, criterion, x, y) @ v[:, 0])
    # A replaced Parameter (looked up by name) too.
    model[2].weight = nn.Parameter(_randn(4, 5, seed=72))
    assert_close(hess @ v, oracle_hessian(model, criterion, x, y) @ v)
    assert_close(ggn @ v[:, 1], oracle_ggn(model, criterion, x, y) @ v[:, 1])
    assert routes and all(routes)


# -- algorithms on the route -----------------------------------------------------------------


def test_eigsh_by_lanczos_on_a_chain(routes: list[bool]) -> None:
    # N = 12·20 + 20 + 20·3 + 3 = 323 > hesse's dense limit (256): Lanczos, single products.
    model = mlp([12, 20, 3], nn.Tanh, seed=73)
    x, y = _randn(11, 12, seed=74), _labels(11, 3)
    criterion = nn.CrossEntropyLoss()
    op = hesse.HessianOperator(model, criterion, (x, y))
    assert op.shape[0] > hesse._spectral.DENSE_LIMIT
    exact = torch.linalg.eigvalsh(oracle_hessian(model, criterion, x, y))
    values, vectors = hesse.eigsh(op, k=1, seed=0)
    # Lanczos asks for single products: the first through the gradient graph, the others
    # through the chain, built once for the call.
    assert routes == [True]
    torch.testing.assert_close(values, exact[-1:], rtol=1e-8, atol=0.0)
    routes.clear()
    op @ vectors[:, 0]  # a lone product does not build the chain
    assert not routes
    # A block of all N columns takes the route: the whole matrix, the same spectrum.
    block = op @ torch.eye(op.shape[0], dtype=F64)
    assert routes and all(routes)
    assert_close(torch.linalg.eigvalsh((block + block.T) / 2), exact, rtol=1e-9)


@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_eigsh_on_small_chains_by_lanczos(
    kind: str, which: str, routes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hesse._spectral, "DENSE_LIMIT", 0)  # Lanczos even for N = 47
    model = mlp([4, 5, 3, 3], nn.SiLU, seed=75)
    x, y = _randn(9, 4, seed=76), _labels(9, 3)
    criterion = nn.CrossEntropyLoss()
    if kind == "hessian":
        op: Any = hesse.HessianOperator(model, criterion, (x, y))
        exact = torch.linalg.eigvalsh(oracle_hessian(model, criterion, x, y))
    else:
        op = hesse.GGNOperator(model, criterion, (x, y))
        exact = torch.linalg.eigvalsh(oracle_ggn(model, criterion, x, y))
    values, _ = hesse.eigsh(op, k=1, which=which, seed=0)  # type: ignore[arg-type]
    expected = exact[-1:] if which == "LA" else exact[:1]
    scale = float(exact.abs().max())
    assert abs(float(values[0]) - float(expected[0])) <= 1e-8 * scale


# -- cases that once failed: a loss linear in the outputs, a criterion torch.func cannot
# transform, a module registered twice in one Sequential


def test_a_loss_linear_in_the_outputs_after_an_activation() -> None:
    model = mlp([3, 4, 2], nn.Tanh, seed=80)
    model.append(nn.Tanh())
    x, y = _randn(5, 3, seed=81), _randn(5, 2, seed=82)

    def criterion(out: Tensor, t: Tensor) -> Tensor:
        return (out * t).sum()

    check_operators(model, criterion, x, y)


class _Square(torch.autograd.Function):
    """``z²`` without ``setup_context``: autograd runs it, torch.func transforms cannot."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return 2 * z * g


def test_a_criterion_torch_func_cannot_transform_falls_back() -> None:
    model = mlp([3, 4, 2], nn.Tanh, seed=83)
    x, y = _randn(5, 3, seed=84), _randn(5, 2, seed=85)

    def criterion(out: Tensor, t: Tensor) -> Tensor:
        return _Square.apply(out - t).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hesse.PerformanceWarning)
        check_operators(model, criterion, x, y)


def test_the_same_linear_twice_gets_the_oracle_and_keeps_its_parameters() -> None:
    layers = _base()
    layers[2] = layers[0]
    model, criterion, x, y, _ = _built(layers)
    with state_preserved(model):
        check_operators(model, criterion, x, y)
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_single_products_keep_the_gradient_graph_and_blocks_take_the_route(
    routes: list[bool],
) -> None:
    # One column goes through the kept gradient graph (one backward pass a product); blocks
    # through the chain. Same numbers up to rounding, and each path repeats itself exactly.
    model = mlp([4, 5, 3], nn.Tanh, seed=90)
    x, y = _randn(7, 4, seed=91), _labels(7, 3, seed=92)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), batches)
    dense = oracle_hessian(model, nn.CrossEntropyLoss(), x, y, None)
    v = _randn(op.shape[0], seed=93)
    first = op @ v
    assert_close(first, dense @ v, rtol=1e-10)
    assert torch.equal(op @ v, first)
    assert not routes
    block = op @ torch.stack([v, 2 * v], dim=1)
    assert_close(block[:, 0], first, rtol=1e-12)
    assert routes and all(routes)


def test_reused_temporaries_never_leak_between_products(monkeypatch: pytest.MonkeyPatch) -> None:
    # One products' object serves blocks of changing widths in chunks (as a block solver
    # whose columns retire): its reused buffers never carry one product into the next, also
    # when a cap on kept bytes leaves some roles to new tensors.
    model = mlp([4, 5, 4, 3], nn.Tanh, seed=71)
    x, y, criterion = _randn(9, 4, seed=72), _labels(9, 3), nn.CrossEntropyLoss()
    hessian, ggn = oracle_hessian(model, criterion, x, y), oracle_ggn(model, criterion, x, y)
    for cap in (1 << 26, 2000):
        monkeypatch.setattr(hesse._scratch, "_SCRATCH_BYTES", cap)
        chain = direct(model, criterion, (x,), y)
        assert chain is not None
        # (columns, most columns a chunk)
        for width, per_chunk in [(5, 2), (3, 2), (5, 2), (3, 3), (1, 1)]:
            monkeypatch.setattr(hesse._scratch, "CPU_CHUNK_BYTES", per_chunk * 9 * 6 * 8)
            rows = _randn(width, model_numel(model), seed=width)
            assert_close(chain.hessian(rows), rows @ hessian)
            assert_close(chain.ggn(rows), rows @ ggn)
        assert 0 < chain.scratch.bytes <= cap
    assert hesse._scratch.Scratch(torch.device("meta"))(("a",), (2,), rows) is None

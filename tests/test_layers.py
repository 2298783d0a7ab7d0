"""The layer route for exact diagonals (hesse._layers): same answer as the general path, always.

Every registry case and every model built to defeat the shortcut (tied or shared weights, a
layer called twice, a hook that changes its output, samples mixed before the loss, a loss that
couples samples, a sequence layer) must give the Hessian and GGN diagonals of the independent
oracles to 1e-10 in float64. The route's coverage is asserted too, so that a test cannot pass
by the general path alone where the route should apply, nor by the route where it must not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from cases import CASES, Case, oracle_loss_hessian
from conftest import assert_close, state_preserved
from torch import Tensor, nn

import hesse
from hesse._layers import exact_factor, ggn_diagonal_blocks, hessian_diagonal_blocks
from hesse._layout import ParamLayout

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64)


def oracle_ggn(model: nn.Module, criterion: Callable[..., Tensor], x: Tensor, y: Any) -> Tensor:
    """``Jᵀ H_f J`` from torch.autograd.functional.jacobian and hessian, eval mode."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    values = tuple(p.detach().clone() for _, p in named)
    was = model.training
    model.eval()
    try:

        def outputs(*ps: Tensor) -> Tensor:
            return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

        with torch.no_grad():
            f = outputs(*values)
        jac = torch.autograd.functional.jacobian(outputs, values)
        j = torch.cat([block.reshape(f.numel(), -1) for block in jac], dim=1)
        h = torch.autograd.functional.hessian(lambda out: criterion(out, y), f)
        h = h.reshape(f.numel(), f.numel())
    finally:
        model.train(was)
    return j.T @ h @ j


def covered(model: nn.Module, criterion: Any, x: Tensor, y: Any, *, ggn: bool = False) -> set[str]:
    layout = ParamLayout.from_module(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in layout.names}
    was = model.training
    model.eval()
    try:
        if ggn:
            factor = exact_factor(criterion, y, x.shape[0])
            blocks = ggn_diagonal_blocks(model, layout, params, (x,), x.shape[0], factor)
        else:
            blocks = hessian_diagonal_blocks(
                model,
                layout,
                params,
                lambda leaves: criterion(torch.func.functional_call(model, leaves, (x,)), y),
                x.shape[0],
            )
    finally:
        model.train(was)
    return set(blocks)


# ------------------------------------------------------------------- the registry, every path


@pytest.mark.parametrize("name", sorted(CASES))
def test_hessian_diagonal_equals_the_oracle_on_every_case(name: str) -> None:
    case: Case = copy.deepcopy(CASES[name])
    expected = oracle_loss_hessian(case).diagonal()
    with state_preserved(case.model):
        got = hesse.loss_hessian_diagonal(case.model, case.criterion, case.inputs, case.target)
        op = hesse.HessianOperator(case.model, case.criterion, (case.inputs, case.target))
        from_op = op.diagonal()
    assert_close(got, expected)
    assert_close(from_op, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ggn_diagonal_equals_the_oracle_on_every_case(name: str) -> None:
    case: Case = copy.deepcopy(CASES[name])
    if len(case.inputs) != 1:
        pytest.skip("the oracle takes one input")
    x = case.inputs[0]
    expected = oracle_ggn(case.model, case.criterion, x, case.target).diagonal()
    with state_preserved(case.model):
        got = hesse.GGNOperator(case.model, case.criterion, (x, case.target)).diagonal()
    assert_close(got, expected)


def test_the_route_covers_every_linear_layer_of_a_plain_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    x, y = _randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    every = {n for n, _ in model.named_parameters()}
    assert covered(model, nn.CrossEntropyLoss(), x, y) == every
    assert covered(model, nn.CrossEntropyLoss(), x, y, ggn=True) == every
    assert covered(model, nn.MSELoss(), x, _randn(7, 3), ggn=True) == every


# ------------------------------------------------------------- models built to defeat it


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class SharedWeight(nn.Module):
    """The hidden layer's weight is also read by a second, functional use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        side = F.linear(x, self.lin.weight).pow(2).sum(1, keepdim=True)
        return self.head(torch.tanh(self.lin(x))) + side


class TiedLinear(nn.Module):
    """Two modules, one weight (the second module's name is not in named_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Mixer(nn.Module):
    """Samples are mixed after the hidden layer (its curvature couples samples), not the head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.head(h - h.mean(0, keepdim=True))


class Doubled(nn.Linear):
    """A subclass whose output is not x Wᵀ + b."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, 2 * torch.sin(self.weight), self.bias)


class Sequence(nn.Module):
    """A linear layer applied at every position: its weight enters T times per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x.reshape(x.shape[0], 2, 3))).mean(1))


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(input=x)


class ResidualNorm(nn.Module):
    """x + W2 tanh(W1 LayerNorm(x)), then a head: residual branches around linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 5)
        self.down = nn.Linear(5, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.down(torch.tanh(self.up(self.norm(x)))))


def _cnn_batchnorm() -> nn.Module:
    model = nn.Sequential(
        nn.Unflatten(1, (1, 2, 3)),
        nn.Conv2d(1, 2, 2, padding=1),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 2),
    )
    with torch.no_grad():  # statistics that are not the identity's
        model[2].running_mean.copy_(torch.tensor([0.3, -0.2]))
        model[2].running_var.copy_(torch.tensor([1.5, 0.7]))
    return model


def _hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda m, args, out: out * 1.5 + out.pow(2))
    return model


def _coupling_loss(out: Tensor, y: Tensor) -> Tensor:
    return (out.sum(0) - y.sum(0)).pow(2).sum() + (out - y).pow(2).sum()


DEFEATS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Tensor], set[str]]] = {
    # name: (model, criterion, the parameters the route covers); a layer that fails a check
    # leaves all its parameters to the general path, its bias too
    "called_twice": (CalledTwice, nn.MSELoss(), {"head.weight", "head.bias"}),
    "shared_weight": (SharedWeight, nn.MSELoss(), {"head.weight", "head.bias"}),
    # b's only selected parameter is its bias (its weight is a's): d_out probes cost as much
    # as the general path's d_out columns, so the Hessian leaves it there (the GGN does not)
    "tied": (TiedLinear, nn.MSELoss(), {"head.weight", "head.bias"}),
    "mixer": (Mixer, nn.MSELoss(), {"head.weight", "head.bias"}),
    "subclass": (
        lambda: nn.Sequential(Doubled(6, 4), nn.Tanh(), nn.Linear(4, 2)),
        nn.MSELoss(),
        {"2.weight", "2.bias"},
    ),
    # two positions per sample: 2 * d_out probes through the token blocks
    "sequence": (Sequence, nn.MSELoss(), {"lin.weight", "lin.bias", "head.weight", "head.bias"}),
    "keyword": (Keyword, nn.MSELoss(), set()),
    # hesse's recording hook runs first: layer 0's own output, the user's hook after it is
    # part of the rest of the model, differentiated as such
    "hooked": (_hooked, nn.MSELoss(), {"0.weight", "0.bias", "2.weight", "2.bias"}),
    # layers on residual branches are still entered once per sample: all linear layers route
    "residual_norm": (
        ResidualNorm,
        nn.MSELoss(),
        {"up.weight", "up.bias", "down.weight", "down.bias", "head.weight", "head.bias"},
    ),
    # BatchNorm in eval mode is per sample: the head routes, the convolution does not
    "cnn_batchnorm": (_cnn_batchnorm, nn.MSELoss(), {"5.weight", "5.bias"}),
    "coupling_loss": (
        lambda: nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)),
        _coupling_loss,
        set(),
    ),
}


def _defeat(name: str) -> tuple[nn.Module, Callable[..., Tensor], Tensor, Tensor, set[str]]:
    build, criterion, allowed = DEFEATS[name]
    torch.manual_seed(3)
    model = build().to(F64)
    x = _randn(6, 3 if name in ("called_twice", "shared_weight", "tied", "mixer") else 6)
    return model, criterion, x, _randn(6, 2, seed=1), allowed


@pytest.mark.parametrize("name", sorted(DEFEATS))
def test_models_built_to_defeat_the_route_get_the_exact_hessian_diagonal(name: str) -> None:
    model, criterion, x, y, allowed = _defeat(name)
    case = Case(name, model, (x,), y, criterion)
    expected = oracle_loss_hessian(case).diagonal()
    hooks = dict(model._forward_hooks)
    with state_preserved(model):
        got = hesse.loss_hessian_diagonal(model, criterion, x, y)
    assert dict(model._forward_hooks) == hooks  # hesse's recording hooks are gone
    assert_close(got, expected)
    assert covered(model, criterion, x, y) == allowed


@pytest.mark.parametrize("name", sorted(DEFEATS))
def test_models_built_to_defeat_the_route_get_the_exact_ggn_diagonal(name: str) -> None:
    model, criterion, x, y, allowed = _defeat(name)
    expected = oracle_ggn(model, criterion, x, y).diagonal()
    got = hesse.GGNOperator(model, criterion, (x, y)).diagonal()
    assert_close(got, expected)
    # The GGN's route has the same preconditions; a loss that couples samples is refused by
    # its own check (the outputs' Hessian is not per sample). Its cost does not grow with the
    # positions, so it also takes a layer whose only selected parameter is the bias.
    extra = {"b.bias"} if name == "tied" else set()
    assert covered(model, criterion, x, y, ggn=True) == allowed | extra


def test_batch_statistics_in_training_mode_take_the_general_path() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x, y = _randn(6, 3), _randn(6, 2, seed=1)
    crit = nn.MSELoss()

    def loss_of(ps: dict[str, Tensor]) -> Tensor:
        return crit(torch.func.functional_call(model, ps, (x,)), y)

    model.train()
    with torch.no_grad():
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    got = hesse.loss_hessian_diagonal(model, crit, x, y, training=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])  # running statistics untouched
    bn = model[1]
    bn.track_running_stats = False
    try:
        names = [n for n, _ in model.named_parameters()]
        values = tuple(p.detach().clone() for p in model.parameters())
        h = torch.autograd.functional.hessian(lambda *ps: loss_of(dict(zip(names, ps))), values)
    finally:
        bn.track_running_stats = True
    expected = torch.cat(
        [h[i][i].reshape(v.numel(), v.numel()).diagonal() for i, v in enumerate(values)]
    )
    assert_close(got, expected)


def test_closed_form_and_general_output_factors_agree() -> None:
    class MyCrossEntropy(nn.CrossEntropyLoss):  # a subclass: the general factor, by eigh
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(F64)
    x, y = _randn(9, 5), torch.randint(0, 4, (9,), generator=_gen(2))
    for reduction in ("mean", "sum"):
        closed = hesse.GGNOperator(model, nn.CrossEntropyLoss(reduction=reduction), (x, y))
        general = hesse.GGNOperator(model, MyCrossEntropy(reduction=reduction), (x, y))
        expected = oracle_ggn(model, nn.CrossEntropyLoss(reduction=reduction), x, y).diagonal()
        assert_close(closed.diagonal(), expected)
        assert_close(general.diagonal(), expected)
    # An instance whose forward was patched keeps its type: the gradient check catches it.
    patched = nn.CrossEntropyLoss()
    patched.forward = lambda out, t: 2 * F.cross_entropy(out, t) + out.pow(4).mean()  # type: ignore[method-assign]
    expected = oracle_ggn(model, patched, x, y).diagonal()
    assert_close(hesse.GGNOperator(model, patched, (x, y)).diagonal(), expected)


def test_unequal_batches_are_weighted_like_products() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = _randn(11, 4), torch.randint(0, 3, (11,), generator=_gen(1))
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    for cls in (hesse.HessianOperator, hesse.GGNOperator):
        op = cls(model, nn.CrossEntropyLoss(), data)
        assert_close(op.diagonal(), op.to_dense().diagonal())
        whole = cls(model, nn.CrossEntropyLoss(), (x, y))
        assert_close(op.diagonal(), whole.diagonal())


def test_a_subset_of_parameters_mixes_routes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = _randn(8, 4), torch.randint(0, 3, (8,), generator=_gen(1))
    crit = nn.CrossEntropyLoss()
    full = hesse.loss_hessian_matrix(model, crit, x, y).diagonal()
    layout = ParamLayout.from_module(model)
    for params in (["0.bias", "1.weight", "3.weight"], ["1.*"], ["3.bias"]):
        got = hesse.loss_hessian_diagonal(model, crit, x, y, params=params)
        sub = ParamLayout.from_module(model, params)
        expected = torch.cat([full[layout.slice(n)] for n in sub.names])
        assert_close(got, expected)


def test_float32_agrees_with_float64() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    crit = nn.CrossEntropyLoss()
    single = hesse.loss_hessian_diagonal(model, crit, x, y)
    double = hesse.loss_hessian_diagonal(model.double(), crit, x.double(), y)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ Monte-Carlo GGN diagonal


@pytest.mark.parametrize("criterion", ["ce", "mse"])
def test_mc_diagonal_is_unbiased_within_its_standard_error(criterion: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x = _randn(10, 4)
    if criterion == "ce":
        crit: nn.Module = nn.CrossEntropyLoss()
        y = torch.randint(0, 3, (10,), generator=_gen(1))
    else:
        crit, y = nn.MSELoss(reduction="sum"), _randn(10, 3, seed=1)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batches, weighted like the operators
    op = hesse.GGNOperator(model, crit, data)
    exact = op.diagonal()
    draws = torch.stack([op.mc_diagonal(mc_samples=2, seed=s) for s in range(200)])
    mean, stderr = draws.mean(0), draws.std(0) / 200**0.5
    z = (mean - exact).abs() / stderr.clamp_min(1e-12)
    assert float(z.max()) < 5.0, float(z.max())  # 5 stderr over 57 entries: a real bias fails
    assert not torch.allclose(draws[0], exact)  # it is an estimate, not the exact path
    assert torch.equal(op.mc_diagonal(mc_samples=2, seed=3), draws[3])  # seeded


def test_mc_diagonal_refuses_what_it_cannot_sample() -> None:
    model = nn.Linear(3, 2).to(F64)
    data = (_randn(4, 3), _randn(4, 2))
    op = hesse.GGNOperator(model, lambda out, t: (out - t).pow(4).sum(), data)
    with pytest.raises(ValueError, match="criterion: the Monte-Carlo GGN samples labels"):
        op.mc_diagonal()
    op = hesse.GGNOperator(model, nn.MSELoss(), data)
    with pytest.raises(ValueError, match="mc_samples"):
        op.mc_diagonal(mc_samples=0)
    with pytest.raises(TypeError, match="seed"):
        op.mc_diagonal(seed=1.5)  # type: ignore[arg-type]


class Tokens(nn.Module):
    """A token-wise MLP over (B, 2, 3, d) followed by pooling: 6 positions per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.up(x.reshape(x.shape[0], 2, 3, 8)))
        return self.head(h.mean((1, 2)))


def test_layers_applied_at_many_positions_take_the_token_route() -> None:
    torch.manual_seed(0)
    model = Tokens().to(F64)
    x, y = _randn(5, 48), torch.randint(0, 3, (5,), generator=_gen(1))
    crit = nn.CrossEntropyLoss()
    every = {n for n, _ in model.named_parameters()}
    assert covered(model, crit, x, y) == every  # 6 positions x 3 outputs < 27 columns
    assert covered(model, crit, x, y, ggn=True) == every
    case = Case("tokens", model, (x,), y, crit)
    assert_close(
        hesse.loss_hessian_diagonal(model, crit, x, y), oracle_loss_hessian(case).diagonal()
    )
    expected = oracle_ggn(model, crit, x, y).diagonal()
    assert_close(hesse.GGNOperator(model, crit, (x, y)).diagonal(), expected)


def test_model_hessian_diagonal_takes_the_route_per_sample_and_output() -> None:
    from cases import oracle_model_hessian

    from hesse._layers import model_diagonal_blocks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Unflatten(1, (2, 2)))
    model = model.to(F64)
    x = _randn(3, 6)
    layout = ParamLayout.from_module(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    blocks = model_diagonal_blocks(model, layout, params, (x,), 3, (2, 2))
    assert set(blocks) == {n for n, _ in model.named_parameters()}  # 4 x d_out probes per layer
    assert blocks["0.weight"].shape == (3, 2, 2, 5, 6)
    expected = oracle_model_hessian(Case("m", model, (x,), x, nn.MSELoss())).diagonal(
        dim1=-2, dim2=-1
    )
    assert_close(hesse.model_hessian_diagonal(model, x), expected)
    tokens = Tokens().to(F64)
    xt = _randn(4, 48)
    expected = oracle_model_hessian(Case("t", tokens, (xt,), xt, nn.MSELoss())).diagonal(
        dim1=-2, dim2=-1
    )
    assert_close(hesse.model_hessian_diagonal(tokens, xt), expected)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_an_empty_layer_is_no_trouble() -> None:
    model = nn.Sequential(nn.Linear(3, 0), nn.Flatten(), nn.Linear(0, 2)).to(F64)
    x, y = _randn(4, 3), _randn(4, 2, seed=1)
    for op in (
        hesse.HessianOperator(model, nn.MSELoss(), (x, y)),
        hesse.GGNOperator(model, nn.MSELoss(), (x, y)),
    ):
        assert_close(op.diagonal(), op.to_dense().diagonal())


# -------------------------------------------------------------- factored GGN products


@pytest.mark.parametrize("criterion", ["ce", "mse", "ce_sum", "ce_smoothed"])
def test_factored_ggn_products_equal_the_oracle(criterion: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)
    )
    model = model.to(F64)
    x = _randn(9, 12)
    if criterion == "mse":
        crit: nn.Module = nn.MSELoss()
        y: Tensor = _randn(9, 3, seed=1)
    elif criterion == "ce_smoothed":  # no closed form: the factors from C backward passes
        crit = nn.CrossEntropyLoss(label_smoothing=0.1)
        y = torch.randint(0, 3, (9,), generator=_gen(1))
    else:
        crit = nn.CrossEntropyLoss(reduction="sum" if criterion == "ce_sum" else "mean")
        y = torch.randint(0, 3, (9,), generator=_gen(1))
    closed = criterion != "ce_smoothed"
    op = hesse.GGNOperator(model, crit, [(x[:4], y[:4]), (x[4:], y[4:])])
    op._factored_wins = True  # the factored path, whatever the timing would choose
    dense = oracle_ggn(model, crit, x, y)
    v = torch.randn(op.shape[0], 5, generator=_gen(2), dtype=F64)
    with state_preserved(model):
        assert_close(op @ v, dense @ v)
        assert_close(op @ v[:, 0], dense @ v[:, 0])
        one = hesse.GGNOperator(model, crit, (x, y))
        with one.session():  # over one batch: a lone block through autograd, then factors
            assert_close(one @ v, dense @ v)
            # The factors' setup (C backward passes) waits for a second block; from an MLP's
            # kept passes with a closed-form loss, the first block already times both paths.
            assert (one._factored_wins is None) != closed
            assert_close(one @ v, dense @ v)  # both paths, one timed against the other
            assert one._factored_wins is not None
            assert_close(one @ v, dense @ v)
        one._factored_wins = True
        assert_close(one @ v, dense @ v)  # the factors alone, in a session of their own
    assert not op._factored_off  # the factored path served these products
    assert_close(
        hesse.eigsh(op, k=2, seed=0).eigenvalues, torch.linalg.eigvalsh(dense)[-2:], rtol=1e-7
    )


@pytest.mark.parametrize("kept_bytes", [1 << 26, 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_ggn_over_sample_chunks_with_signed_factors(
    dtype: torch.dtype, kept_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An output loss whose Hessian is indefinite (signs -1 and +1 in its factor), a layer
    # without a bias, and chunks of samples small enough that the batch takes several; in
    # float32 too, whose products take the other operand order (`_outer_sum`); and with no
    # temporaries reused (as on a GPU, or past the cap), every buffer a new tensor.
    monkeypatch.setattr(hesse._scratch, "_SCRATCH_BYTES", kept_bytes)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(F64)
    x, y = _randn(10, 6), _randn(10, 3, seed=1)

    def wavy(out: Tensor, t: Tensor) -> Tensor:
        return (torch.cos(out) * t).sum()

    seen: list[Any] = []
    factored = hesse._layers.FactoredGGN
    matmat = factored.matmat

    def spied(self: Any, tangents: Tensor) -> Tensor:
        seen.append(self.sign)
        return matmat(self, tangents)

    # Room for 3 samples' (Σ d_out = 12, K = 5) temporaries: 4 chunks of the 10 samples.
    monkeypatch.setattr(hesse._layers, "_FACTORED_CHUNK_BYTES", 3 * 12 * 5 * dtype.itemsize)
    monkeypatch.setattr(factored, "matmat", spied)
    dense = oracle_ggn(model, wavy, x, y)
    assert float(torch.linalg.eigvalsh(dense)[0]) < 0  # indefinite, as the loss
    low = copy.deepcopy(model).to(dtype)
    op = hesse.GGNOperator(low, wavy, (x.to(dtype), y.to(dtype)), reduction="sum")
    op._factored_wins = True
    v = torch.randn(op.shape[0], 5, generator=_gen(2), dtype=F64)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    with state_preserved(low), op.session():
        for _ in range(2):  # the first block builds the factors, the second reuses them
            assert_close((op @ v.to(dtype)).double(), dense @ v, rtol)
    assert not op._factored_off
    assert seen and seen[-1] is not None and bool((seen[-1] < 0).any())


class _Fresh:
    """Batches as new tensors on every pass (as a DataLoader's collation makes them)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter([(x.clone(), y.clone()) for x, y in self.batches])


def test_factored_ggn_over_several_batches_is_kept_for_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).to(F64)
    x, y = _randn(9, 12), torch.randint(0, 3, (9,), generator=_gen(1))
    crit = nn.CrossEntropyLoss()
    dense = oracle_ggn(model, crit, x, y)
    v = torch.randn(dense.shape[0], 5, generator=_gen(2), dtype=F64)
    built: list[int] = []
    chain_products = hesse._operators.chain_products

    def counted(*args: Any) -> Any:
        built.append(1)
        return chain_products(*args)

    monkeypatch.setattr(hesse._operators, "chain_products", counted)
    # Tensors of their own: a view's in-place change bumps the version its siblings share.
    batches = [(x[:4].clone(), y[:4]), (x[4:7].clone(), y[4:7]), (x[7:].clone(), y[7:])]
    op = hesse.GGNOperator(model, crit, batches)
    with state_preserved(model), op.session():
        assert_close(op @ v, dense @ v)  # builds each batch's chain and factors once
        first = len(built)
        assert_close(op @ v, dense @ v)
        assert_close(op @ v, dense @ v)
        assert len(built) == first == 3  # the next products reuse the kept factors
        assert len(op._state.factored) == 3
        # A batch changed in place is another batch: its factors are built anew.
        batches[1][0].mul_(2)
        dense = oracle_ggn(model, crit, torch.cat([b[0] for b in batches]), y)
        assert_close(op @ v, dense @ v)
        assert len(built) == 4 and len(op._state.factored) == 3
    assert op._active is None  # the session and what it kept are gone

    # New tensors on every pass: built on every product, never more kept than batches.
    fresh = hesse.GGNOperator(model, crit, _Fresh(batches))
    with state_preserved(model), fresh.session():
        for _ in range(3):
            assert_close(fresh @ v, dense @ v)
            assert len(fresh._state.factored) <= 3

    # Beyond the budget nothing is kept, and the products are the same.
    monkeypatch.setattr(hesse._operators, "_KEPT_FACTORED_BYTES", 1)
    tight = hesse.GGNOperator(model, crit, batches)
    built.clear()
    with state_preserved(model), tight.session():
        assert_close(tight @ v, dense @ v)
        assert_close(tight @ v, dense @ v)
        assert not tight._state.factored and len(built) == 6


def test_factored_ggn_steps_aside_where_a_parameter_is_off_the_route() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 3)).to(F64)
    x, y = _randn(9, 12), torch.randint(0, 3, (9,), generator=_gen(1))
    op = hesse.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.randn(op.shape[0], 5, generator=_gen(2), dtype=F64)  # 4+ columns try the factors
    dense = oracle_ggn(model, nn.CrossEntropyLoss(), x, y)
    with op.session():  # the second block of a one-batch session tries the factors
        assert_close(op @ v, dense @ v)
        assert_close(op @ v, dense @ v)
    assert op._factored_off


@pytest.mark.parametrize("name", sorted(CASES))
def test_empirical_fisher_diagonal_equals_squared_per_sample_gradients(name: str) -> None:
    case: Case = copy.deepcopy(CASES[name])
    if name == "lstm":
        pytest.skip("vmap cannot batch nn.LSTM over samples (covered by the loop's own tests)")
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    values = {n: p.detach() for n, p in case.model.named_parameters() if p.requires_grad}
    case.model.eval()
    rows = []
    for i in range(case.inputs[0].shape[0]):  # a loop over samples: the independent oracle
        sample = tuple(t[i : i + 1] for t in case.inputs)
        leaves = {n: v.clone().requires_grad_() for n, v in values.items()}
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            loss = case.criterion(
                torch.func.functional_call(case.model, leaves, sample), case.target[i : i + 1]
            )
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(leaves[n])).reshape(-1)
                    for g, n in zip(grads, names)
                ]
            )
        )
    g = torch.stack(rows)
    fisher = hesse.EmpiricalFisherOperator(case.model, case.criterion, (case.inputs, case.target))
    reduction = getattr(case.criterion, "reduction", "mean")
    expected = g.pow(2).mean(0) if reduction != "sum" else g.pow(2).sum(0)
    assert_close(fisher.diagonal(), expected)


def test_an_in_place_activation_after_a_layer_keeps_the_route() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(F64)
    x, y = _randn(8, 5), torch.randint(0, 3, (8,), generator=_gen(1))
    crit = nn.CrossEntropyLoss()
    assert covered(model, crit, x, y) == {n for n, _ in model.named_parameters()}
    case = Case("inplace", model, (x,), y, crit)
    assert_close(
        hesse.loss_hessian_diagonal(model, crit, x, y), oracle_loss_hessian(case).diagonal()
    )
    expected = oracle_ggn(model, crit, x, y).diagonal()
    assert_close(hesse.GGNOperator(model, crit, (x, y)).diagonal(), expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_ggn_products_in_forward_mode_and_through_the_kept_graph(name: str) -> None:
    case: Case = copy.deepcopy(CASES[name])
    if len(case.inputs) != 1:
        pytest.skip("the oracle takes one input")
    x = case.inputs[0]
    dense = oracle_ggn(case.model, case.criterion, x, case.target)
    v = torch.randn(dense.shape[0], generator=_gen(3), dtype=F64)
    # Several batches keep no graph: every single product runs in forward mode.
    halves = [(x[:2], case.target[:2]), (x[2:], case.target[2:])]
    # A plain function that sums over samples: batches weighted 1, as one batch would be.
    reduction = None if hasattr(case.criterion, "reduction") else "sum"
    op = hesse.GGNOperator(case.model, case.criterion, halves, reduction=reduction)
    with state_preserved(case.model):
        assert_close(op @ v, dense @ v)
        one = hesse.GGNOperator(case.model, case.criterion, (x, case.target))
        with one.session():  # the first in forward mode, the next through the kept graph
            assert_close(one @ v, dense @ v)
            assert_close(one @ (2 * v), dense @ (2 * v))
    assert not op._forward_off  # forward mode ran (nn.LSTM too, on torch 2.13)


def test_a_model_without_forward_mode_falls_back_to_autograd() -> None:
    class NoForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            (x,) = ctx.saved_tensors
            return grad * (1 - torch.tanh(x) ** 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(NoForward.apply(self.a(x)))

    torch.manual_seed(0)
    model = Net().to(F64)
    x, y = _randn(6, 4), _randn(6, 3, seed=1)
    op = hesse.GGNOperator(model, nn.MSELoss(), [(x[:3], y[:3]), (x[3:], y[3:])])
    v = torch.randn(op.shape[0], generator=_gen(3), dtype=F64)
    dense = oracle_ggn(model, nn.MSELoss(), x, y)
    assert_close(op @ v, dense @ v)
    assert op._forward_off  # no jvp for the custom Function: the autograd graph served
    # Blocks: torch.func cannot transform the Function either; the factors' timing must not
    # trip over it, and the autograd loop (with its one warning) gives the same numbers.
    block = torch.randn(op.shape[0], 8, generator=_gen(4), dtype=F64)
    with pytest.warns(hesse.PerformanceWarning, match="autograd loop"):
        assert_close(op @ block, dense @ block)
    assert_close(op @ block, dense @ block)


def test_mc_diagonal_leaves_ignored_targets_out() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x = _randn(12, 4)
    y = torch.randint(0, 3, (12,), generator=_gen(1))
    y[::2] = -100  # half the samples ignored by the loss (and its mean)
    op = hesse.GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    exact = op.diagonal()
    assert_close(exact, oracle_ggn(model, nn.CrossEntropyLoss(), x, y).diagonal())
    draws = torch.stack([op.mc_diagonal(mc_samples=4, seed=s) for s in range(150)])
    z = (draws.mean(0) - exact).abs() / (draws.std(0) / 150**0.5).clamp_min(1e-12)
    assert float(z.max()) < 5.0, float(z.max())


@pytest.mark.parametrize("batch", [2, 3, 4, 5])
def test_a_loss_comparing_samples_is_caught_in_small_batches(batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, y = _randn(batch, 4), _randn(batch, 3, seed=1)

    def compare(out: Tensor, t: Tensor) -> Tensor:
        return (out - out.mean(0)).pow(2).sum() + (out - t).pow(2).sum()

    assert covered(model, compare, x, y) == set()
    assert covered(model, compare, x, y, ggn=True) == set()
    for cls in (hesse.HessianOperator, hesse.GGNOperator):
        op = cls(model, compare, (x, y), reduction="sum")
        assert_close(op.diagonal(), op.to_dense().diagonal())


def test_half_precision_takes_the_general_path() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    x, y = torch.randn(6, 4, dtype=torch.bfloat16), torch.randint(0, 3, (6,))
    assert covered(model, nn.CrossEntropyLoss(), x, y) == set()
    assert covered(model, nn.CrossEntropyLoss(), x, y, ggn=True) == set()

"""Paths through the transforms: norm-layer workarounds, fallbacks, dtypes, odd model shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import oracle_hessian
from conftest import assert_close, state_preserved
from torch import nn

import hesse

F64 = torch.float64


def _loss_oracle(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    def scalar(ps: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, ps, (x,)).pow(2).sum()

    return oracle_hessian(model, scalar)


def _sq(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.pow(2).sum()


@pytest.mark.parametrize(
    "name",
    ["layernorm", "layernorm_no_affine", "instancenorm", "groupnorm", "rmsnorm", "bn_no_stats"],
)
def test_normalisation_layers_match_autograd(name: str) -> None:
    """torch.func's vmapped norm backward is wrong for some of these (functorch#534)."""
    torch.manual_seed(0)
    layers = {
        "layernorm": (nn.Linear(3, 4), nn.LayerNorm(4)),
        "layernorm_no_affine": (nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False)),
        "instancenorm": (nn.Conv1d(2, 4, 2), nn.InstanceNorm1d(4, affine=True), nn.Flatten()),
        "groupnorm": (nn.Conv1d(2, 4, 2), nn.GroupNorm(2, 4), nn.Flatten()),
        "rmsnorm": (nn.Linear(3, 4), nn.RMSNorm(4)),
        "bn_no_stats": (nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)),
    }[name]
    width = 8 if "norm" in name and name in ("instancenorm", "groupnorm") else 4
    model = nn.Sequential(*layers, nn.Tanh(), nn.LazyLinear(2)).to(F64)
    x = torch.randn(5, 2, 3, dtype=F64) if width == 8 else torch.randn(5, 3, dtype=F64)
    model(x)  # materialise the lazy layer
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # non-trivial affine weights
    h = hesse.loss_hessian_matrix(model, _sq, x, None)  # reverse-over-reverse
    assert_close(h, _loss_oracle(model, x))
    if name != "bn_no_stats":  # batch statistics couple the samples
        # forward-over-reverse, vmapped over samples
        each = hesse.per_sample_loss_hessian(model, _sq, x, torch.zeros(5))
        assert_close(each.sum(0), h)


def test_missing_forward_mode_falls_back_to_reverse_silently() -> None:
    """nn.LSTM has no forward-mode derivative on CPU: reverse-over-reverse, still vectorised."""
    from cases import CASES

    case = CASES["lstm"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = hesse.model_hessian_matrix(case.model, case.inputs, is_batch=False)
    x = case.inputs[0]
    for b, k in ((0, 0), (2, 1)):

        def scalar(ps: dict[str, torch.Tensor], b: int = b, k: int = k) -> torch.Tensor:
            return torch.func.functional_call(case.model, ps, (x,))[b, k]

        assert_close(h[b, k], oracle_hessian(case.model, scalar))


def test_vmap_unbatchable_model_falls_back_with_one_warning() -> None:
    class ItemScale(nn.Module):
        """Calls .item(), which vmap cannot batch."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).to(F64)
            # Off the layer route of exact diagonals, so the diagonal's general path runs too.
            self.gain = nn.Parameter(torch.tensor([1.5, 0.5], dtype=F64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # .item() of a sample-independent value: vmap still cannot batch it
            scale = 2.0 if x.abs().sum().item() >= 0 else 3.0
            return torch.tanh(self.lin(x) * self.gain) * scale

    torch.manual_seed(0)
    model = ItemScale()
    x = torch.randn(4, 3, dtype=F64)
    # The batch Hessian is vectorised over tangents only; x is not batched, so .item() works.
    assert_close(hesse.loss_hessian_matrix(model, _sq, x, None), _loss_oracle(model, x))
    # Per-sample functions vmap over x: .item() fails there, and hesse loops over samples.
    with state_preserved(model), pytest.warns(hesse.PerformanceWarning, match=r"\.item\(\)") as rec:
        diag = hesse.model_hessian_diagonal(model, x)
    assert len(rec) == 1  # one warning per call, not one per parameter block
    with pytest.warns(hesse.PerformanceWarning, match="loop over samples"):
        full = hesse.model_hessian_matrix(model, x)
    assert_close(diag, full.diagonal(dim1=-2, dim2=-1))
    for b in range(4):
        for k in range(2):

            def scalar(ps: dict[str, torch.Tensor], b: int = b, k: int = k) -> torch.Tensor:
                return torch.func.functional_call(model, ps, (x[b : b + 1],))[0, k]

            assert_close(full[b, k], oracle_hessian(model, scalar))


def test_a_failure_after_the_first_chunk_is_raised_not_fallen_back_from() -> None:
    """Only a first chunk may switch strategies; a later error (out of memory, a bug in the
    model) reaches the caller instead of silently re-running on a slower path."""

    class FailsLater(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 4:  # the second chunk of columns
                raise RuntimeError("simulated out of memory")
            return self.lin(x).tanh()

    model = FailsLater().to(F64)
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, chunk_size=2)


def test_no_warning_on_the_vectorised_path() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hesse.model_hessian_matrix(model, torch.randn(3, 3, dtype=F64))


def test_float32_results_on_parameter_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    h = hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y)
    assert h.dtype == torch.float32 and h.device == next(model.parameters()).device
    h64 = hesse.loss_hessian_matrix(model.double(), nn.MSELoss(), x.double(), y.double())
    torch.testing.assert_close(h, h64.float(), rtol=1e-4, atol=1e-5)
    assert hesse.model_hessian_diagonal(model.float(), x).dtype == torch.float32


class _FlattenAll(nn.Module):
    """Flattens the batch away: a batch of one gives (2,), a batch of B gives (2B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)).flatten(0)


class _Reshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 2).to(F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.reshape(-1, 6))).pow(2)


@pytest.mark.parametrize("model_cls", [_FlattenAll, _Reshape])
def test_samples_are_evaluated_as_batches_of_one(model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(3, 2, 3, dtype=F64) if model_cls is _Reshape else torch.randn(3, 3, dtype=F64)
    h = hesse.model_hessian_matrix(model, x)
    n = hesse.ParamLayout.from_module(model).numel
    assert h.shape == (3, 2, n, n)
    for b in range(3):
        for k in range(2):

            def scalar(ps: dict[str, torch.Tensor], b: int = b, k: int = k) -> torch.Tensor:
                return torch.func.functional_call(model, ps, (x[b : b + 1],)).reshape(-1)[k]

            assert_close(h[b, k], oracle_hessian(model, scalar))


def test_bare_tensor_is_one_input() -> None:
    """A bare tensor is never unpacked along dim 0."""
    x = torch.randn(2, 2, dtype=F64)
    model = nn.Linear(2, 1).to(F64)
    assert hesse.model_hessian_matrix(model, x).shape == (2, 1, 3, 3)
    assert hesse.model_hessian_matrix(model, x, is_batch=False).shape == (2, 1, 3, 3)


class _OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func cannot transform it at all."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)  # differentiable: double backward works


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(F64)
        # Off the layer route of exact diagonals, so the diagonal's general path runs too.
        self.gain = nn.Parameter(torch.tensor([1.5, 0.5], dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _OldStyleTanh.apply(self.lin(x) * self.gain)


def test_autograd_loop_fallback_for_functions_torch_func_cannot_transform() -> None:
    torch.manual_seed(0)
    model = _Custom()
    x = torch.randn(3, 3, dtype=F64)
    with state_preserved(model), pytest.warns(hesse.PerformanceWarning, match="autograd loop"):
        h = hesse.loss_hessian_matrix(model, _sq, x, None)
    assert_close(h, _loss_oracle(model, x))
    with pytest.warns(hesse.PerformanceWarning, match="autograd loop over samples") as rec:
        d = hesse.model_hessian_diagonal(model, x)
    assert len(rec) == 1
    with pytest.warns(hesse.PerformanceWarning):
        full = hesse.model_hessian_matrix(model, x)
    assert_close(d, full.diagonal(dim1=-2, dim2=-1))
    for b in range(3):

        def scalar(ps: dict[str, torch.Tensor], b: int = b) -> torch.Tensor:
            return torch.func.functional_call(model, ps, (x[b : b + 1],))[0, 1]

        assert_close(full[b, 1], oracle_hessian(model, scalar))

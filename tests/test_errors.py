"""Every bad input fails at once with a message that names the argument and the fix."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
import torch
from conftest import state_preserved
from torch import nn

import hesse


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)


def test_unknown_parameter_name_lists_valid_names() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match=r"params: 'fc\.weight' is not a parameter.*0\.weight"):
        hesse.model_hessian_matrix(model, x, params=["fc.weight"])


def test_empty_selection() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, params=["enc.*"])
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, params=[])


def test_params_of_wrong_type() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match=r"params\[0\]: expected a parameter name, a glob"):
        hesse.model_hessian_matrix(model, x, params=[0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="params: expected None, a parameter name"):
        hesse.model_hessian_matrix(model, x, params=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params: expected None, .* got bytes"):  # not its ints
        hesse.model_hessian_matrix(model, x, params=b"weight")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"params\[0\]: a tensor of shape \(2,\) that is not"):
        hesse.model_hessian_matrix(model, x, params=[torch.zeros(2)])


def test_model_without_trainable_parameters() -> None:
    model, x, y = _setup()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        hesse.model_hessian_matrix(model, x)
    assert not any(p.requires_grad for p in model.parameters())


def test_model_not_a_module() -> None:
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        hesse.model_hessian_matrix(lambda x: x, torch.ones(1))  # type: ignore[arg-type]


def test_inputs_not_tensors() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match=r"inputs: every input must be a torch.Tensor.*inputs\[1\]"):
        hesse.model_hessian_matrix(model, (x, [1, 2]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inputs: expected a tensor or a non-empty tuple"):
        hesse.model_hessian_matrix(model, x.numpy())  # type: ignore[arg-type]


def test_batch_sizes_disagree() -> None:
    model, x, y = _setup()

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.lin(a) + self.lin(b).sum()

    with pytest.raises(ValueError, match=r"inputs: with is_batch=True .*\(5, 3\).*\(4, 3\)"):
        hesse.model_hessian_matrix(Two(), (x, x[:4]))
    with pytest.raises(ValueError, match="is_batch=True needs a batch dimension"):
        hesse.model_hessian_matrix(model, torch.tensor(1.0))
    with pytest.raises(ValueError, match="the batch is empty"):
        hesse.model_hessian_matrix(model, x[:0])


def test_criterion_not_scalar() -> None:
    model, x, y = _setup()
    with state_preserved(model), pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(reduction="none"), x, y)
    with pytest.raises(TypeError, match="criterion: expected a callable"):
        hesse.loss_hessian_matrix(model, "mse", x, y)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3])
def test_chunk_size_not_positive(bad: int) -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match=f"chunk_size: expected a positive int.*got {bad}"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        hesse.model_hessian_diagonal(model, x, chunk_size=bad)


@pytest.mark.parametrize("bad", [1.5, True, "8"])
def test_chunk_size_wrong_type(bad: object) -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match="chunk_size: expected a positive int or None"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, chunk_size=bad)  # type: ignore[arg-type]


def test_flags_must_be_bool() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match="is_batch: expected True or False"):
        hesse.model_hessian_matrix(model, x, is_batch="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="diagonal_only: expected True or False"):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y, diagonal_only=1)  # type: ignore[arg-type]
    # "no" is truthy: read as a bool it would show a bar, or read the data twice.
    with pytest.raises(TypeError, match="progress: expected True or False, got str 'no'"):
        hesse.GGNOperator(model, nn.MSELoss(), (x, y), progress="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_deterministic: expected True or False"):
        hesse.HessianOperator(model, nn.MSELoss(), (x, y), check_deterministic="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="progress: expected True or False, got NoneType"):
        hesse.self_influence(model, nn.MSELoss(), (x, y), damping=1.0, progress=None)  # type: ignore[arg-type]


def test_hvp_names_its_empty_batch() -> None:
    model, x, y = _setup()
    v = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=x.dtype)
    with pytest.raises(ValueError, match=r"inputs: the batch is empty \(dim 0 of inputs\[0\]"):
        hesse.hvp(model, nn.MSELoss(), x[:0], y[:0], v)


def test_tuple_output_for_model_hessian() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), self.lin(x) ** 2

    model, x, y = _setup()
    with pytest.raises(TypeError, match="model Hessian needs the model to return one tensor"):
        hesse.model_hessian_matrix(Pair(), x)
    # The loss Hessian takes any output the criterion accepts.
    h = hesse.loss_hessian_matrix(Pair(), lambda out, t: (out[0] * out[1]).sum(), x, None)
    assert h.shape == (8, 8)


def test_model_mixing_samples_with_is_batch() -> None:
    class BatchMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).mean(0, keepdim=True)

    model, x, y = _setup()
    with pytest.raises(ValueError, match="must not depend on the other samples"):
        hesse.model_hessian_matrix(BatchMean(), x)


class _Coupled(nn.Module):
    """BatchNorm on batch statistics; its scale zero (ResNets' zero_init_residual) hides the
    coupling from the outputs' values, not from their derivatives."""

    def __init__(self, *, zero_scale: bool, wrap: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4, track_running_stats=False)
        self.out = nn.Linear(4, 2)
        self.wrap = wrap
        if zero_scale:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.out(torch.tanh(self.bn(self.lin(x))))
        return {"logits": out} if self.wrap else out


@pytest.mark.parametrize("zero_scale", [False, True])
@pytest.mark.parametrize("wrap", [False, True])
def test_coupling_is_refused_in_values_derivatives_and_any_output_form(
    zero_scale: bool, wrap: bool
) -> None:
    torch.manual_seed(0)
    model = _Coupled(zero_scale=zero_scale, wrap=wrap).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)

    def crit(out: Any, t: torch.Tensor) -> torch.Tensor:
        return ((out["logits"] if wrap else out) - t).pow(2).sum()

    couples = "couples the samples of a batch"
    with state_preserved(model), pytest.raises(ValueError, match=couples):
        hesse.per_sample_loss_hessian(model, crit, x, y)
    if not wrap:
        with state_preserved(model), pytest.raises(ValueError, match=couples):
            hesse.model_hessian_matrix(model, x)
    with state_preserved(model), pytest.raises(ValueError, match=couples):
        hesse.per_sample_gradients(model, crit, x, y)
    # Without the coupling (running statistics in eval mode) the same model passes.
    model.bn = nn.BatchNorm1d(4).double().eval()
    assert hesse.per_sample_loss_hessian(model, crit, x, y).shape == (6, 34, 34)


def test_coupling_behind_a_flattened_batch_is_refused_and_kinks_are_not_coupling() -> None:
    class MeanFree(nn.Module):  # couples the samples, then (B, T, C) -> (B*T, C) as LMs do
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return (h - h.mean(0, keepdim=True)).reshape(-1, 3)

    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="couples the samples of a batch"):
        hesse.model_hessian_diagonal(MeanFree().double(), x)
    # Independent samples whose GroupNorm outputs are rounding noise around ReLU's kink (blank
    # images): the batched and per-sample kernels land on either side of it. Not coupling.
    model = nn.Sequential(nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    images = torch.randn(16, 3, 8, 8)
    images[:8] = 0.37 + 0.01 * torch.arange(8.0)[:, None, None, None]
    labels = torch.randint(0, 3, (16,))
    grads = hesse.per_sample_gradients(model.eval(), nn.CrossEntropyLoss(), images, labels)
    assert grads.shape == (16, sum(p.numel() for p in model.parameters()))


def test_a_criterion_that_takes_one_argument_is_named() -> None:
    model, x, y = _setup()
    with pytest.raises(
        TypeError, match=r"criterion: hesse calls it as criterion\(output, target\)"
    ):
        hesse.loss_hessian_matrix(model, lambda out: out.square().sum(), x, y)

    class Penalty(nn.Module):
        def forward(self, out: torch.Tensor) -> torch.Tensor:
            return out.square().sum()

    with pytest.raises(TypeError, match=r"its signature is \(out\b.*\)"):
        hesse.GGNOperator(model, Penalty(), (x, y))

    # Extra defaults, *args, a module's own __call__ and a decorator's wrapper are fine.
    class Called(nn.Module):
        def forward(self, out: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
            return alpha * (out - target).square().sum()

        def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.forward(out, target, 0.5)

    def supplies_scale(f: Any) -> Any:
        @functools.wraps(f)
        def wrapper(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return f(out, target, 2.0)

        return wrapper

    @supplies_scale
    def scaled(out: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * (out - target).square().sum()

    hesse.loss_hessian_matrix(model, Called(), x, y)
    hesse.loss_hessian_matrix(model, scaled, x, y)
    hesse.loss_hessian_matrix(
        model, lambda out, target, scale=1.0: scale * (out - target).square().sum(), x, y
    )
    hesse.loss_hessian_matrix(model, lambda *args: (args[0] - args[1]).square().sum(), x, y)


def test_a_loss_class_and_a_numpy_target_are_named() -> None:
    model, x, y = _setup()
    with pytest.raises(TypeError, match=r"criterion: .* the class MSELoss itself; .* MSELoss\(\)"):
        hesse.loss_hessian_matrix(model, nn.MSELoss, x, y)
    np = pytest.importorskip("numpy")
    assert isinstance(y.numpy(), np.ndarray)
    for call in (
        lambda: hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y.numpy()),
        lambda: hesse.per_sample_loss_hessian(model, nn.MSELoss(), x, y.numpy()),
        lambda: hesse.hvp(model, nn.MSELoss(), x, y.numpy(), torch.zeros(26, dtype=x.dtype)),
    ):
        with pytest.raises(TypeError, match=r"target: .* numpy.ndarray; .* torch.as_tensor"):
            call()


def test_per_sample_target_must_be_batched() -> None:
    model, x, y = _setup()
    with pytest.raises(ValueError, match=r"target: per-sample loss Hessians need .*\(5\)"):
        hesse.per_sample_loss_hessian(model, nn.MSELoss(), x, y[:3])


def test_memory_guard_fires_before_allocating() -> None:
    """A 300,500-parameter loss Hessian is 361 GB in float32: refused within seconds."""
    model = nn.Linear(600, 500)
    x, y = torch.randn(8, 600), torch.randn(8, 500)
    start = time.perf_counter()
    with state_preserved(model), pytest.raises(hesse.MemoryBudgetError) as info:
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, y)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "loss_hessian_matrix: needs about 336.4 GiB" in message
    assert "300500 x 300500 torch.float32" in message
    for alternative in (
        "the exact diagonal (hesse.loss_hessian_diagonal) (1.1 MiB)",
        "params=",
        "Operator",
    ):
        assert alternative in message
    # Not named: the blocks of diagonal_only (335 GiB) and a smaller chunk (the result alone
    # does not fit) would not help.
    assert "diagonal_only" not in message and "chunk_size" not in message
    assert isinstance(info.value, MemoryError)
    # The diagonal of the same model fits and is exact: d²/dW² of mean squared error.
    diag = hesse.loss_hessian_diagonal(model, nn.MSELoss(), x[:2], y[:2], params=["bias"])
    torch.testing.assert_close(diag, torch.full((500,), 2 / 500))


def test_model_error_propagates_and_state_is_restored() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.lin(x)) @ torch.ones(3)  # shape error inside the user's model

    model = Broken().train()
    model.lin.weight.grad = torch.ones(2, 3)
    # torch's error, chained under one that names the inputs.
    with state_preserved(model), pytest.raises(ValueError, match="size mismatch") as info:
        hesse.model_hessian_matrix(model, torch.randn(4, 3))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert model.training and model.bn.training


@pytest.mark.parametrize("is_batch", [True, False])
def test_inputs_the_model_does_not_take_are_named(is_batch: bool) -> None:
    model, x, y = _setup()
    wide = torch.randn(x.shape[0], x.shape[1] + 1, dtype=x.dtype)
    shape = rf"\(B, {wide.shape[1]}\)" if is_batch else rf"\({wide.shape[0]}, {wide.shape[1]}\)"
    for call in (
        lambda: hesse.model_hessian_matrix(model, wide, is_batch=is_batch),
        lambda: hesse.model_hessian_dict(model, wide.double(), is_batch=is_batch),
        lambda: hesse.model_hessian_diagonal(model, wide, is_batch=is_batch),
        lambda: hesse.model_sharpness(model, wide, is_batch=is_batch),
    ):
        with (
            state_preserved(model),
            pytest.raises(
                ValueError, match=r"inputs: the model fails on them \((inputs \[)?torch.float"
            ) as info,
        ):
            call()
        assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match=shape):
        hesse.model_hessian_matrix(model, wide, is_batch=is_batch)
    with pytest.raises(ValueError, match=r"inputs, target: the model and criterion fail on"):
        hesse.per_sample_loss_hessian(model, nn.MSELoss(), wide, y)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_a_missing_second_derivative_is_named_as_the_models() -> None:
    # torch has no double backward for nn.EmbeddingBag: not a data problem, as it was named.
    model = nn.Sequential(nn.EmbeddingBag(5, 3, mode="sum"), nn.Linear(3, 2))
    ids, y = torch.tensor([[0, 1], [2, 3], [4, 0]]), torch.tensor([0, 1, 0])
    with (
        state_preserved(model),
        pytest.raises(ValueError, match=r"model: torch lacks a derivative"),
    ):
        hesse.GGNOperator(model, nn.CrossEntropyLoss(), (ids, y)).to_dense()
    with (
        state_preserved(model),
        pytest.raises(ValueError, match=r"model: torch lacks a derivative"),
    ):
        hesse.loss_hessian_matrix(model, nn.CrossEntropyLoss(), ids, y)

"""Boundary checks: each bad argument fails early with the argument's name and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = [
    "batch_size",
    "check_chunk_size",
    "check_criterion",
    "check_model",
    "check_model_output",
    "check_scalar_loss",
    "normalize_inputs",
]


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module, got {type(model).__name__}; wrap a plain "
            "function in an nn.Module whose parameters are nn.Parameter attributes."
        )
    return model


def check_criterion(criterion: Any) -> Callable[..., Tensor]:
    if not callable(criterion):
        raise TypeError(
            f"criterion: expected a callable loss such as torch.nn.MSELoss(), got "
            f"{type(criterion).__name__}."
        )
    return criterion


def normalize_inputs(inputs: Any) -> tuple[Tensor, ...]:
    """A bare tensor is one input; a tuple or list of tensors is passed positionally."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        bad = [i for i, x in enumerate(inputs) if not isinstance(x, Tensor)]
        if not bad:
            return tuple(inputs)
        given = ", ".join(f"inputs[{i}] is {type(inputs[i]).__name__}" for i in bad)
        raise TypeError(
            f"inputs: every input must be a torch.Tensor, but {given}; convert it with "
            "torch.as_tensor(...) or bind non-tensor arguments inside the model."
        )
    raise TypeError(
        "inputs: expected a tensor or a non-empty tuple of tensors passed positionally to the "
        f"model, got {type(inputs).__name__}; for one input pass the tensor itself, for several "
        "pass inputs=(x, y)."
    )


def batch_size(inputs: tuple[Tensor, ...]) -> int:
    """The common size of dim 0 of every input (``is_batch=True``)."""
    sizes = []
    for i, x in enumerate(inputs):
        if x.ndim == 0:
            raise ValueError(
                f"inputs[{i}]: is_batch=True needs a batch dimension (dim 0), got a 0-dim "
                "tensor; add one with x.unsqueeze(0) or pass is_batch=False."
            )
        sizes.append(x.shape[0])
    if len(set(sizes)) > 1:
        shapes = ", ".join(f"inputs[{i}]: {tuple(x.shape)}" for i, x in enumerate(inputs))
        raise ValueError(
            f"inputs: with is_batch=True every input's dim 0 is the batch, but the sizes differ "
            f"({shapes}); make them agree or pass is_batch=False for one unbatched evaluation."
        )
    if sizes[0] == 0:
        raise ValueError("inputs: the batch is empty (dim 0 has size 0); pass at least one sample.")
    return sizes[0]


def check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size: expected a positive int or None (automatic), got "
            f"{type(chunk_size).__name__} {chunk_size!r}."
        )
    if chunk_size < 1:
        raise ValueError(
            f"chunk_size: expected a positive int (the number of Hessian columns computed per "
            f"vectorised pass) or None for automatic, got {chunk_size}."
        )
    return chunk_size


def check_model_output(output: Any, *, what: str = "model") -> Tensor:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{what}: a model Hessian needs the model to return one tensor, got "
            f"{type(output).__name__}; wrap the model so that forward returns one tensor "
            "(e.g. torch.cat of the outputs), or use the loss Hessian functions."
        )
    if not output.is_floating_point():
        raise TypeError(
            f"{what}: the output must be floating point to be differentiated, got {output.dtype}."
        )
    return output


def check_scalar_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"criterion: expected it to return a scalar tensor, got {type(loss).__name__}."
        )
    if loss.ndim != 0:
        raise ValueError(
            f"criterion: expected a scalar loss, got a tensor of shape {tuple(loss.shape)}; use "
            "reduction='mean' or 'sum' (not 'none'), or reduce the loss inside the criterion."
        )
    if not loss.is_floating_point():
        raise TypeError(f"criterion: the loss must be floating point, got {loss.dtype}.")
    return loss


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"

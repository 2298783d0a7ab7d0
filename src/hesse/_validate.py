"""Boundary checks: each bad argument fails early with the argument's name and the fix."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hesse._layout import ParamLayout

Seed = int | torch.Generator | None  # an explicit seed, a generator, or torch's global one

__all__ = [
    "Seed",
    "batch_size",
    "check_chunk_size",
    "check_criterion",
    "check_finite",
    "check_flag",
    "check_model",
    "check_model_output",
    "check_nonempty",
    "check_scalar_loss",
    "check_seed",
    "check_tolerance",
    "integer",
    "normal_tensor",
    "normalize_inputs",
    "positive_float",
]


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool; a TypeError naming ``name`` otherwise (``"no"`` is not False)."""
    if not isinstance(value, bool):
        kind = type(value)
        named = (
            kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
        )
        raise TypeError(f"{name}: expected True or False, got {named} {value!r}.")
    return value


def check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module, got {type(model).__name__}; wrap a plain "
            "function in an nn.Module whose parameters are nn.Parameter attributes."
        )
    return model


def check_criterion(criterion: Any) -> Callable[..., Tensor]:
    if isinstance(criterion, type):
        raise TypeError(
            f"criterion: expected a loss to call, got the class {criterion.__name__} itself; "
            f"pass an instance such as {criterion.__name__}()."
        )
    if not callable(criterion):
        raise TypeError(
            f"criterion: expected a callable loss such as torch.nn.MSELoss(), got "
            f"{type(criterion).__name__}."
        )
    # A module is called through forward unless its class overrides __call__.
    plain = isinstance(criterion, nn.Module) and type(criterion).__call__ is nn.Module.__call__
    signature = _signature(criterion.forward if plain else criterion)
    if signature is not None:
        try:
            signature.bind(None, None)
        except TypeError:
            raise TypeError(
                f"criterion: hesse calls it as criterion(output, target), but its signature is "
                f"{signature}; give it two positional parameters, e.g. "
                "lambda output, target: ... (ignore target where the loss does not use one)."
            ) from None
    return criterion


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        # Not the signature of what a decorator wraps: the wrapper is what hesse calls.
        return inspect.signature(function, follow_wrapped=False)
    except (TypeError, ValueError):  # builtins without one: called as they are
        return None


def normalize_inputs(inputs: Any) -> tuple[Tensor, ...]:
    """A bare tensor is one input; a tuple or list of tensors is passed positionally."""
    if isinstance(inputs, Tensor):
        return (normal_tensor(inputs),)
    if isinstance(inputs, (tuple, list)) and inputs:
        bad = [i for i, x in enumerate(inputs) if not isinstance(x, Tensor)]
        if not bad:
            return tuple(normal_tensor(x) for x in inputs)
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


def normal_tensor(x: Any) -> Any:
    """``x``, or a normal copy of a tensor made under ``torch.inference_mode``.

    Such tensors cannot be saved for the backward passes hesse runs. Call outside inference
    mode.
    """
    if isinstance(x, Tensor) and x.is_inference():
        return x.clone()
    return x


def normal_target(target: Any) -> Any:
    """The target as the criterion gets it (see `normal_tensor`), but never a NumPy array.

    torch's losses and hesse's per-sample transforms cannot take one.
    """
    if type(target).__module__ == "numpy" and type(target).__name__ == "ndarray":
        raise TypeError(
            f"target: expected a torch.Tensor (or whatever your criterion takes), got "
            f"numpy.{type(target).__name__}; convert it with torch.as_tensor(target)."
        )
    return normal_tensor(target)


def check_nonempty(inputs: tuple[Tensor, ...]) -> None:
    """A loss over an empty batch is a mean over nothing (NaN) or a constant: refuse it."""
    empty = [i for i, x in enumerate(inputs) if x.ndim and x.shape[0] == 0]
    if empty:
        raise ValueError(
            f"inputs: the batch is empty (dim 0 of inputs[{empty[0]}] has size 0); the loss of "
            "no samples has no curvature. Pass at least one sample."
        )


def check_finite(model: nn.Module, layout: ParamLayout, theta: Tensor | None = None) -> None:
    """Derivatives at NaN or infinite parameters are NaN: say which parameters, up front.

    ``theta``: the selected parameters already gathered into one vector (one check for all).
    """
    if theta is not None and bool(torch.isfinite(theta).all()):
        return
    named = dict(model.named_parameters(remove_duplicate=False))
    bad = [n for n in layout.names if not bool(torch.isfinite(named[n]).all())]
    if bad:
        raise ValueError(
            f"model: the parameter(s) {', '.join(bad)} contain NaN or infinite values, so every "
            "derivative at them is NaN; check the training run that produced them (a diverged "
            "loss, a learning rate too large) or restore a finite checkpoint."
        )


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An int (NumPy integers too, not bools) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}."
        )
    if int(value) < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}.")
    return int(value)


def positive_float(name: str, value: Any) -> float:
    """A finite real number > 0 (NumPy and 0-dim tensor numbers too)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}.")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}.")
    return number


def check_tolerance(tol: Any) -> float | None:
    """``None`` (the default for the dtype) or a finite ``tol > 0``."""
    return None if tol is None else positive_float("tol", tol)


def check_seed(seed: Any) -> int | torch.Generator | None:
    """``None``, an int (NumPy integers too) or a ``torch.Generator``."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"seed: expected an int, a torch.Generator or None, got {type(seed).__name__} {seed!r}."
        )
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed!r}.")
    return int(seed)


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

"""Pure functions of one flat parameter vector, built from a model with ``functional_call``.

``params_of`` maps the flat vector to the parameter dict handed to ``functional_call``: a
`ParamLayout`'s ``unflatten``, or its ``window`` view when only some entries are differentiated.
Parameters missing from the dict keep the model's own values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

ParamsOf = Callable[[Tensor], dict[str, Tensor]]


__all__ = [
    "ParamsOf",
    "loss_function",
    "model_function",
    "sample_loss_function",
    "sample_model_function",
]


def model_function(
    model: nn.Module, params_of: ParamsOf, inputs: tuple[Tensor, ...]
) -> Callable[[Tensor], Tensor]:
    """``theta ↦ model(*inputs)`` with the selected blocks replaced by views of ``theta``."""

    def f(theta: Tensor) -> Tensor:
        return functional_call(model, params_of(theta), inputs)

    return f


def loss_function(
    model: nn.Module,
    params_of: ParamsOf,
    criterion: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    target: Any,
) -> Callable[[Tensor], Tensor]:
    """``theta ↦ criterion(model(*inputs), target)``, a scalar."""

    def f(theta: Tensor) -> Tensor:
        return criterion(functional_call(model, params_of(theta), inputs), target)

    return f


def sample_model_function(
    model: nn.Module, params_of: ParamsOf, output_shape: tuple[int, ...]
) -> Callable[..., Tensor]:
    """``(theta, *sample) ↦ model(*batch_of_one)`` reshaped to the per-sample ``output_shape``.

    Each sample is evaluated as a batch of one, so models that reshape with ``-1`` or flatten
    the batch dim see the shapes they were written for.
    """

    def f(theta: Tensor, *sample: Tensor) -> Tensor:
        batch = tuple(x.unsqueeze(0) for x in sample)
        return functional_call(model, params_of(theta), batch).reshape(output_shape)

    return f


def sample_loss_function(
    model: nn.Module, params_of: ParamsOf, criterion: Callable[..., Tensor]
) -> Callable[..., Tensor]:
    """``(theta, target, *sample) ↦ criterion(model(*batch_of_one), target[None])``."""

    def f(theta: Tensor, target: Tensor, *sample: Tensor) -> Tensor:
        batch = tuple(x.unsqueeze(0) for x in sample)
        output = functional_call(model, params_of(theta), batch)
        return criterion(output, target.unsqueeze(0))

    return f

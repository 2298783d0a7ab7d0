"""Pure functions of one flat parameter vector, built from a model with ``functional_call``.

``params_of`` maps the flat vector to the parameter dict handed to ``functional_call``: a
`ParamLayout`'s ``unflatten``, or its ``window`` view when only some entries are differentiated.
Parameters missing from the dict keep the model's own values.

`evaluate` and `loss` are the only places where hesse runs a user's model or criterion: inside
`hesse._compat.second_order_safe`, so every path (vectorised or plain autograd, dense or
operator, the checks too) gets the same second-derivative fixes by construction, and work that
only replays a graph (a kept gradient graph's backward) pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from hesse._compat import second_order_safe

ParamsOf = Callable[[Tensor], dict[str, Tensor]]


__all__ = [
    "ParamsOf",
    "criterion_loss",
    "evaluate",
    "loss",
    "loss_function",
    "model_function",
    "sample_loss_function",
    "sample_model_function",
]


def evaluate(model: nn.Module, params: dict[str, Tensor] | None, inputs: tuple[Any, ...]) -> Any:
    """``model(*inputs)``, with ``params`` in place of the model's own when given."""
    with second_order_safe():
        if params is None:
            return model(*inputs)
        return functional_call(model, params, inputs)


def loss(
    criterion: Callable[..., Tensor],
    model: nn.Module,
    params: dict[str, Tensor] | None,
    inputs: tuple[Any, ...],
    target: Any,
) -> Tensor:
    """``criterion(model(*inputs), target)``, ``params`` in place of the model's own if given."""
    with second_order_safe():
        output = model(*inputs) if params is None else functional_call(model, params, inputs)
        return criterion(output, target)


def criterion_loss(criterion: Callable[..., Tensor], output: Any, target: Any) -> Tensor:
    """``criterion(output, target)`` of outputs already computed (the GGN's outer loss)."""
    with second_order_safe():
        return criterion(output, target)


def model_function(
    model: nn.Module, params_of: ParamsOf, inputs: tuple[Tensor, ...]
) -> Callable[[Tensor], Tensor]:
    """``theta ↦ model(*inputs)`` with the selected blocks replaced by views of ``theta``."""

    def f(theta: Tensor) -> Tensor:
        return evaluate(model, params_of(theta), inputs)

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
        return loss(criterion, model, params_of(theta), inputs, target)

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
        return evaluate(model, params_of(theta), batch).reshape(output_shape)

    return f


def sample_loss_function(
    model: nn.Module, params_of: ParamsOf, criterion: Callable[..., Tensor]
) -> Callable[..., Tensor]:
    """``(theta, target, *sample) ↦ criterion(model(*batch_of_one), target[None])``."""

    def f(theta: Tensor, target: Tensor, *sample: Tensor) -> Tensor:
        batch = tuple(x.unsqueeze(0) for x in sample)
        return loss(criterion, model, params_of(theta), batch, target.unsqueeze(0))

    return f

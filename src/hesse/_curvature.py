"""The curvature of one batch: the one home of "Hessian columns of this model on this batch".

The dense functions use it for their one batch, the operators for each batch of their dataset,
so both take the same transforms, fallbacks and memory planning. A `Curvature` is built without
evaluating the model; the checks that need a forward pass (`check_independent_samples`) are
separate, so that an operator pays them once, not per product.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_leaves

from hesse._functional import (
    evaluate,
    loss,
    loss_function,
    model_function,
    sample_loss_function,
    sample_model_function,
)
from hesse._layers import hessian_diagonal_blocks, model_diagonal_blocks
from hesse._layout import ParamLayout
from hesse._memory import Alternative, activation_bytes, plan_chunk
from hesse._transforms import (
    ColumnFn,
    Fallbacks,
    dense_from_columns,
    diagonal_from_columns,
    hessian_columns,
    sample_hessian_columns,
)

__all__ = [
    "Curvature",
    "alternatives",
    "check_independent_samples",
    "dense",
    "diagonal",
    "loss_curvature",
    "model_curvature",
    "sample_loss_curvature",
    "sample_model_curvature",
]


@dataclass(frozen=True)
class Curvature:
    """A map of the selected parameters whose Hessian is wanted, ready for a transform.

    ``columns(layout, theta, window)`` builds the column function of the map restricted to a
    sub-layout (other blocks stay at the model's values) and to ``theta[window]`` within it;
    ``lead`` is the shape of the map's value, batch dim included. ``layered(theta)``, where
    present, gives the exact diagonal blocks that layer structure makes cheap (`hesse._layers`);
    the others come from columns.
    """

    model: nn.Module
    layout: ParamLayout
    lead: tuple[int, ...]
    columns: Callable[[ParamLayout, Tensor, slice], ColumnFn]
    activations: Callable[[ParamLayout, Tensor], int]
    layered: Callable[[Tensor], dict[str, Tensor]] | None = None
    # The public call that gives this map's exact diagonal, to suggest; None: there is none,
    # or a diagonal (and diagonal blocks) would not serve the call (sharpness).
    diagonal: str | None = "hesse.model_hessian_diagonal"


def model_curvature(
    model: nn.Module,
    layout: ParamLayout,
    args: tuple[Tensor, ...],
    output_shape: tuple[int, ...],
    fallbacks: Fallbacks,
) -> Curvature:
    """``theta ↦ model(*args)`` as one evaluation (``is_batch=False``)."""
    scalar = math.prod(output_shape) == 1

    def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        f = model_function(model, sub.window(theta, window), args)
        return fallbacks(hessian_columns(f, theta[window], scalar=scalar))

    def activations(sub: ParamLayout, theta: Tensor) -> int:
        return activation_bytes(model_function(model, sub.unflatten, args), theta, args)

    return Curvature(model, layout, output_shape, columns, activations)


def sample_model_curvature(
    model: nn.Module,
    layout: ParamLayout,
    args: tuple[Tensor, ...],
    sample_shape: tuple[int, ...],
    fallbacks: Fallbacks,
) -> Curvature:
    """Each sample's output, the sample evaluated as a batch of one: lead ``(B, *O)``."""
    b = args[0].shape[0]
    scalar = math.prod(sample_shape) == 1

    def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        g = sample_model_function(model, sub.window(theta, window), sample_shape)
        return fallbacks(sample_hessian_columns(g, theta[window], args, scalar=scalar))

    def activations(sub: ParamLayout, theta: Tensor) -> int:
        g = sample_model_function(model, sub.unflatten, sample_shape)
        return b * activation_bytes(lambda t: g(t, *(x[0] for x in args)), theta, args)

    def layered(theta: Tensor) -> dict[str, Tensor]:
        # The batch evaluated at once equals each sample alone: the callers check independence.
        return model_diagonal_blocks(model, layout, layout.unflatten(theta), args, b, sample_shape)

    return Curvature(model, layout, (b, *sample_shape), columns, activations, layered)


def loss_curvature(
    model: nn.Module,
    layout: ParamLayout,
    criterion: Callable[..., Tensor],
    args: tuple[Tensor, ...],
    target: Any,
    fallbacks: Fallbacks,
) -> Curvature:
    """``theta ↦ criterion(model(*args), target)``, a scalar: lead ``()``."""

    def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        f = loss_function(model, sub.window(theta, window), criterion, args, target)
        return fallbacks(hessian_columns(f, theta[window], scalar=True))

    def activations(sub: ParamLayout, theta: Tensor) -> int:
        f = loss_function(model, sub.unflatten, criterion, args, target)
        return activation_bytes(f, theta, (*args, target))

    def layered(theta: Tensor) -> dict[str, Tensor]:
        first = args[0] if args else None
        batch = first.shape[0] if isinstance(first, Tensor) and first.ndim > 0 else 0
        return hessian_diagonal_blocks(
            model,
            layout,
            layout.unflatten(theta),
            lambda leaves: loss(criterion, model, leaves, args, target),
            batch,
        )

    return Curvature(
        model, layout, (), columns, activations, layered, "hesse.loss_hessian_diagonal"
    )


def sample_loss_curvature(
    model: nn.Module,
    layout: ParamLayout,
    criterion: Callable[..., Tensor],
    args: tuple[Tensor, ...],
    target: Tensor,
    fallbacks: Fallbacks,
) -> Curvature:
    """Each sample's own loss, ``criterion(model(x_b[None]), target[b][None])``: lead ``(B,)``."""
    b = args[0].shape[0]
    samples = (target, *args)

    def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        g = sample_loss_function(model, sub.window(theta, window), criterion)
        return fallbacks(sample_hessian_columns(g, theta[window], samples, scalar=False))

    def activations(sub: ParamLayout, theta: Tensor) -> int:
        g = sample_loss_function(model, sub.unflatten, criterion)
        return b * activation_bytes(lambda t: g(t, *(x[0] for x in samples)), theta, samples)

    return Curvature(model, layout, (b,), columns, activations, diagonal=None)


def check_independent_samples(
    model: nn.Module, layout: ParamLayout, args: tuple[Tensor, ...], what: str
) -> None:
    """Refuse per-sample curvature of a model whose samples influence each other.

    Per-sample results evaluate each sample as a batch of one. A model that couples the samples
    of a batch (subtracts the batch mean, BatchNorm without running statistics) gives each
    sample another output alone than in the batch, and its per-sample Hessians would answer for
    another function. Every tensor of the output (a tuple or dict too, rows of several samples
    flattened together as well) is compared, alone and in the batch, at the parameters and at
    a random point near them: coupling can vanish at the parameters themselves (BatchNorm's
    scale initialised to zero, as ResNets' ``zero_init_residual`` does). Values, not
    derivatives, which a ReLU's kink at rounding-level inputs would flip. Four forward passes
    without autograd: cheap next to the Hessians.
    """
    b = args[0].shape[0]
    theta = layout.gather(model).detach()
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(theta.shape, generator=g, dtype=theta.dtype).to(theta.device)
    # 10% of the parameters' RMS per entry: far above rounding, near enough to stay finite.
    rms = float(theta.square().mean().sqrt()) if theta.numel() else 0.0
    points = (theta, theta + noise * 0.1 * (rms if rms > 0 else 1.0))

    def alone(t: Tensor, *sample: Tensor) -> tuple[Tensor, ...]:
        return _tensors(evaluate(model, layout.unflatten(t), tuple(x[None] for x in sample)))

    gap = 0.0
    with torch.no_grad():
        for point in points:
            together = _tensors(evaluate(model, layout.unflatten(point), args))
            try:
                each = vmap(alone, in_dims=(None, *(0,) * len(args)))(point, *args)
            except (RuntimeError, NotImplementedError):  # not batchable over samples (nn.LSTM)
                rows = [alone(point, *sample) for sample in zip(*args)]
                each = tuple(torch.stack(parts) for parts in zip(*rows))
            # Outputs with as many numbers both ways, sample-major (a batch-level extra output
            # has fewer in the batch and is not compared).
            pairs = [
                (t.reshape(b, -1), a.reshape(b, -1))
                for t, a in zip(together, each)
                if t.is_floating_point() and t.numel() == a.numel()
            ]
            if point is theta and not all(bool(torch.isfinite(t).all()) for t, _ in pairs):
                raise ValueError(
                    f"model: its output is NaN or infinite for some samples of the batch, so "
                    f"{what} cannot compare each sample's output alone with its output in the "
                    "batch; check the inputs for NaN or infinite values."
                )
            gap = max([gap, *(_gap(t, a) for t, a in pairs)])
    if gap > 1:
        raise ValueError(
            f"model: {what} evaluates each sample as a batch of one, but this model's output "
            "for a sample alone differs from its output within the batch (at its parameters "
            "or near them): it couples the samples of a batch (batch statistics such as "
            "BatchNorm(track_running_stats=False), or an operation across dim 0) or draws random "
            "numbers in its forward pass, so per-sample Hessians would belong to another "
            "function. Use is_batch=False to differentiate the batched output as one "
            "evaluation, or the loss functions for the batch loss."
        )


def _tensors(output: Any) -> tuple[Tensor, ...]:
    """The tensors of a model's output (a tensor, or a tuple, list or dict of them)."""
    return tuple(x for x in tree_leaves(output) if isinstance(x, Tensor))


def _gap(together: Tensor, alone: Tensor) -> float:
    """``|together - alone|`` in units of ``√eps`` times their scale (at least 1).

    Beyond 1, rounding does not explain it.
    """
    if together.numel() == 0:
        return 0.0
    diff = float((together - alone).abs().max())
    if not math.isfinite(diff):  # NaN or infinite alone, finite in the batch
        return math.inf
    tol = torch.finfo(together.dtype).eps ** 0.5
    return diff / (tol * max(float(together.abs().max()), float(alone.abs().max()), 1.0))


# ----------------------------------------------------------------------- dense and diagonal


def alternatives(c: Curvature, *, diagonal: bool = True, blocks: bool = True) -> list[Alternative]:
    """Cheaper calls than a dense result, with their result sizes.

    ``diagonal=False`` when the failing call is the diagonal itself; ``blocks=False`` when it
    already asks for the diagonal blocks only. Neither is offered where ``c.diagonal`` is None
    (per-sample loss Hessians, sharpness).
    """
    itemsize = c.layout.dtype.itemsize
    lanes = math.prod(c.lead)
    options: list[Alternative] = []
    if diagonal and c.diagonal is not None:
        options.append((f"the exact diagonal ({c.diagonal})", c.layout.numel * lanes * itemsize))
    if blocks and c.diagonal is not None and len(c.layout.names) > 1:
        size = sum(k * k for k in c.layout.numels) * lanes * itemsize
        options.append(("diagonal_only=True in dict form", size))
    options.append(("params=[...] to select fewer parameters", None))
    if not c.lead:  # a loss: its curvature is also available matrix-free
        options.append(("a matrix-free hesse.HessianOperator with hesse.eigsh / hesse.trace", None))
    return options


def _plan(
    c: Curvature,
    sub: ParamLayout,
    theta: Tensor,
    what: str,
    out: tuple[int, ...],
    chunk_size: int | None,
    *,
    blocks: bool = True,
) -> int:
    return plan_chunk(
        what=what,
        n=sub.numel,
        lead=c.lead,
        output_shape=out,
        dtype=sub.dtype,
        device=sub.device,
        chunk_size=chunk_size,
        activations=lambda: c.activations(sub, theta),
        alternatives=alternatives(c, diagonal=len(out) > len(c.lead) + 1, blocks=blocks),
    ).chunk


def dense(
    c: Curvature,
    sub: ParamLayout,
    chunk_size: int | None,
    what: str,
    theta: Tensor | None = None,
    *,
    blocks: bool = True,
) -> Tensor:
    """The ``(*lead, n, n)`` Hessian of the blocks of ``sub``, planned to fit in memory.

    ``blocks=False``: the call already asks for diagonal blocks only (not to be suggested).
    """
    theta = sub.gather(c.model) if theta is None else theta
    n = sub.numel
    chunk = _plan(c, sub, theta, what, (*c.lead, n, n), chunk_size, blocks=blocks)
    return dense_from_columns(partial(c.columns, sub, theta), n, c.lead, chunk, theta)


def diagonal(
    c: Curvature, chunk_size: int | None, what: str, theta: Tensor | None = None
) -> Tensor:
    """The exact ``(*lead, N)`` diagonal, planned to fit in memory.

    Blocks the layer route covers (``c.layered``) cost a few products per layer; the rest
    take one column per entry.
    """
    theta = c.layout.gather(c.model) if theta is None else theta
    blocks = c.layered(theta) if c.layered is not None else {}
    rest = c.layout.restrict(n for n in c.layout.names if n not in blocks)
    if not blocks:
        n = c.layout.numel
        chunk = _plan(c, c.layout, theta, what, (*c.lead, n), chunk_size)
        return diagonal_from_columns(partial(c.columns, c.layout, theta), n, c.lead, chunk, theta)
    out = theta.new_empty(*c.lead, c.layout.numel)
    for name, block in blocks.items():
        out[..., c.layout.slice(name)] = block.reshape(*c.lead, -1)
    if rest.names:
        sub_theta = torch.cat([theta[c.layout.slice(n)] for n in rest.names])
        chunk = _plan(c, rest, sub_theta, what, (*c.lead, rest.numel), chunk_size)
        d = diagonal_from_columns(
            partial(c.columns, rest, sub_theta), rest.numel, c.lead, chunk, sub_theta
        )
        for name, piece in zip(rest.names, d.split(rest.numels, dim=-1)):
            out[..., c.layout.slice(name)] = piece
    return out

"""Exact dense Hessians, diagonals and sharpness of a model or of its loss.

Every public function here is one composition:
model + inputs → a pure function of the flat parameter vector (`hesse._functional`) → Hessian
columns by a torch.func transform (`hesse._transforms`) → a structured result laid out by
`ParamLayout`. The seed's flags (``diagonal_only``, ``is_batch``) only choose which composition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from hesse._compat import second_order_safe
from hesse._functional import (
    loss_function,
    model_function,
    sample_loss_function,
    sample_model_function,
)
from hesse._layout import ParamLayout
from hesse._memory import Alternative, activation_bytes, plan_chunk
from hesse._spectral import sharpness
from hesse._state import evaluation_mode
from hesse._transforms import (
    ColumnFn,
    Fallbacks,
    dense_from_columns,
    diagonal_from_columns,
    hessian_columns,
    sample_hessian_columns,
)
from hesse._validate import (
    batch_size,
    check_chunk_size,
    check_criterion,
    check_model,
    check_model_output,
    check_scalar_loss,
    normalize_inputs,
)

__all__ = [
    "loss_hessian_diagonal",
    "loss_hessian_dict",
    "loss_hessian_matrix",
    "loss_sharpness",
    "model_hessian_diagonal",
    "model_hessian_dict",
    "model_hessian_matrix",
    "model_sharpness",
    "per_sample_loss_hessian",
]

Params = str | Sequence[str] | None


@dataclass(frozen=True)
class _Curvature:
    """A map of the selected parameters whose Hessian is wanted, ready for a transform.

    ``columns(layout, theta, window)`` builds the column function of the map restricted to a
    sub-layout (other blocks stay at the model's values) and to ``theta[window]`` within it;
    ``lead`` is the shape of the map's value, batch dim included.
    """

    model: nn.Module
    layout: ParamLayout
    lead: tuple[int, ...]
    columns: Callable[[ParamLayout, Tensor, slice], ColumnFn]
    activations: Callable[[ParamLayout, Tensor], int]


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}.")
    return value


def _model_curvature(model: nn.Module, inputs: Any, params: Params, is_batch: bool) -> _Curvature:
    check_model(model)
    args = normalize_inputs(inputs)
    _check_flag("is_batch", is_batch)
    layout = ParamLayout.from_module(model, params)
    fallbacks = Fallbacks()
    if not is_batch:
        output = check_model_output(model(*args))

        def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
            f = model_function(model, sub.window(theta, window), args)
            return fallbacks(hessian_columns(f, theta[window], scalar=output.numel() == 1))

        def activations(sub: ParamLayout, theta: Tensor) -> int:
            return activation_bytes(model_function(model, sub.unflatten, args), theta)

        return _Curvature(model, layout, tuple(output.shape), columns, activations)

    b = batch_size(args)
    one = check_model_output(model(*(x[:1] for x in args)), what="model (one sample)")
    # A batch of one keeps a leading dim of size 1 unless the model flattened it away.
    sample_shape = tuple(one.shape[1:] if one.ndim and one.shape[0] == 1 else one.shape)
    batched = check_model_output(model(*args))
    if batched.numel() != b * one.numel():
        raise ValueError(
            f"model: with is_batch=True each sample's output must not depend on the other samples, "
            f"but a batch of {b} gave {tuple(batched.shape)} while one sample gave "
            f"{tuple(one.shape)}; pass is_batch=False to differentiate the whole batched output."
        )

    def sample_columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        g = sample_model_function(model, sub.window(theta, window), sample_shape)
        return fallbacks(sample_hessian_columns(g, theta[window], args, scalar=one.numel() == 1))

    def sample_activations(sub: ParamLayout, theta: Tensor) -> int:
        g = sample_model_function(model, sub.unflatten, sample_shape)
        return b * activation_bytes(lambda t: g(t, *(x[0] for x in args)), theta)

    return _Curvature(model, layout, (b, *sample_shape), sample_columns, sample_activations)


def _loss_curvature(
    model: nn.Module, criterion: Any, inputs: Any, target: Any, params: Params
) -> _Curvature:
    check_model(model)
    check_criterion(criterion)
    args = normalize_inputs(inputs)
    layout = ParamLayout.from_module(model, params)
    fallbacks = Fallbacks()
    check_scalar_loss(criterion(model(*args), target))

    def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        f = loss_function(model, sub.window(theta, window), criterion, args, target)
        return fallbacks(hessian_columns(f, theta[window], scalar=True))

    def activations(sub: ParamLayout, theta: Tensor) -> int:
        return activation_bytes(loss_function(model, sub.unflatten, criterion, args, target), theta)

    return _Curvature(model, layout, (), columns, activations)


def _sample_loss_curvature(
    model: nn.Module, criterion: Any, inputs: Any, target: Any, params: Params
) -> _Curvature:
    check_model(model)
    check_criterion(criterion)
    args = normalize_inputs(inputs)
    b = batch_size(args)
    if not isinstance(target, Tensor) or target.ndim == 0 or target.shape[0] != b:
        given = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target: per-sample loss Hessians need a tensor target whose dim 0 is the batch "
            f"({b}), got {given}."
        )
    layout = ParamLayout.from_module(model, params)
    fallbacks = Fallbacks()
    check_scalar_loss(criterion(model(*(x[:1] for x in args)), target[:1]))
    samples = (target, *args)

    def columns(sub: ParamLayout, theta: Tensor, window: slice) -> ColumnFn:
        g = sample_loss_function(model, sub.window(theta, window), criterion)
        return fallbacks(sample_hessian_columns(g, theta[window], samples, scalar=False))

    def activations(sub: ParamLayout, theta: Tensor) -> int:
        g = sample_loss_function(model, sub.unflatten, criterion)
        return b * activation_bytes(lambda t: g(t, *(x[0] for x in samples)), theta)

    return _Curvature(model, layout, (b,), columns, activations)


def _alternatives(c: _Curvature, *, diagonal: bool = True) -> list[Alternative]:
    """Cheaper calls than a dense result, with their result sizes; ``diagonal=False`` when
    the failing call is the diagonal itself."""
    itemsize = c.layout.dtype.itemsize
    lanes = math.prod(c.lead)
    options: list[Alternative] = []
    if diagonal:
        options.append(
            ("the exact diagonal (*_hessian_diagonal)", c.layout.numel * lanes * itemsize)
        )
    if len(c.layout.names) > 1:
        blocks = sum(k * k for k in c.layout.numels) * lanes * itemsize
        options.append(("diagonal_only=True in dict form", blocks))
    options.append(("params=[...] to select fewer parameters", None))
    if not c.lead:  # a loss: its curvature is also available matrix-free
        options.append(("a matrix-free hesse.HessianOperator with hesse.eigsh / hesse.trace", None))
    return options


def _plan(
    c: _Curvature,
    sub: ParamLayout,
    theta: Tensor,
    what: str,
    out: tuple[int, ...],
    chunk_size: int | None,
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
        alternatives=_alternatives(c, diagonal=len(out) > len(c.lead) + 1),
    ).chunk


def _dense(c: _Curvature, sub: ParamLayout, chunk_size: int | None, what: str) -> Tensor:
    theta = sub.gather(c.model)
    n = sub.numel
    chunk = _plan(c, sub, theta, what, (*c.lead, n, n), chunk_size)
    return dense_from_columns(partial(c.columns, sub, theta), n, c.lead, chunk, theta)


def _diagonal(c: _Curvature, chunk_size: int | None, what: str) -> Tensor:
    theta = c.layout.gather(c.model)
    n = c.layout.numel
    chunk = _plan(c, c.layout, theta, what, (*c.lead, n), chunk_size)
    return diagonal_from_columns(partial(c.columns, c.layout, theta), n, c.lead, chunk, theta)


def _diagonal_blocks(c: _Curvature, chunk_size: int | None, what: str) -> dict[str, Tensor]:
    """``{P: (*lead, n_P, n_P)}``: only the diagonal blocks are computed."""
    return {name: _dense(c, c.layout.restrict([name]), chunk_size, what) for name in c.layout.names}


def _matrix(c: _Curvature, diagonal_only: bool, chunk_size: int | None, what: str) -> Tensor:
    _check_flag("diagonal_only", diagonal_only)
    chunk_size = check_chunk_size(chunk_size)
    if not diagonal_only:
        return _dense(c, c.layout, chunk_size, what)
    n = c.layout.numel
    plan_chunk(  # the zero-filled result must fit before any block is computed
        what=what,
        n=n,
        lead=c.lead,
        output_shape=(*c.lead, n, n),
        dtype=c.layout.dtype,
        device=c.layout.device,
        chunk_size=1,
        activations=lambda: 0,
        alternatives=_alternatives(c),
    )
    out = torch.zeros(*c.lead, n, n, dtype=c.layout.dtype, device=c.layout.device)
    for name, block in _diagonal_blocks(c, chunk_size, what).items():
        s = c.layout.slice(name)
        out[..., s, s] = block
    return out


def _dict(
    c: _Curvature, diagonal_only: bool, chunk_size: int | None, what: str
) -> dict[str, dict[str, Tensor]]:
    _check_flag("diagonal_only", diagonal_only)
    chunk_size = check_chunk_size(chunk_size)
    if not diagonal_only:
        return c.layout.unflatten_matrix(_dense(c, c.layout, chunk_size, what))
    lead = c.lead
    return {
        name: {name: block.reshape(*lead, *shape, *shape)}
        for (name, block), shape in zip(
            _diagonal_blocks(c, chunk_size, what).items(), c.layout.shapes
        )
    }


def _run(model: nn.Module, build: Callable[[], Any]) -> Any:
    # no_grad: torch.func transforms ignore it, but it stops autograd from recording a graph
    # through parameters that were not selected.
    with evaluation_mode(check_model(model)), torch.no_grad(), second_order_safe():
        return build()


# --------------------------------------------------------------------------------------------
# Model Hessians


def model_hessian_matrix(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    diagonal_only: bool = False,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Hessian of each model output with respect to the parameters, as one matrix.

    With $f_b(\theta)$ the output for sample ``b``, entry ``[b, *o, i, j]`` is
    $\partial^2 f_{b,o} / \partial\theta_i \partial\theta_j$. Each sample is evaluated as a
    batch of one; the cost is linear in the batch size.

    Args:
        model: The module, evaluated in eval mode; its state is restored afterwards.
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        params: Parameter names or glob patterns; ``None`` selects every trainable parameter.
        diagonal_only: Compute only the diagonal blocks (one per parameter tensor), zeros
            elsewhere.
        is_batch: Dim 0 of every input is a batch of independent samples. ``False``
            differentiates ``model(*inputs)`` as one evaluation.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and memory).

    Returns:
        Shape ``(B, *O, N, N)`` with ``is_batch=True``, else ``(*O, N, N)``, where
        ``O = model(*inputs).shape[1:]`` (or ``.shape``) and ``N`` is the number of selected
        parameter entries, ordered as ``model.named_parameters()``.

    Raises:
        MemoryBudgetError: The result and working set would not fit in the device's memory.

    Example:
        The quadratic form $f(x) = x^\top A x$ has Hessian $2A$ for every x:

        >>> class Quadratic(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        ...     def forward(self, x):
        ...         return (self.w * x).pow(2).sum(-1)
        >>> x = torch.tensor([[1.0, 3.0]])
        >>> model_hessian_matrix(Quadratic(), x)  # f = w1^2 x1^2 + w2^2 x2^2
        tensor([[[ 2.,  0.],
                 [ 0., 18.]]])
    """
    what = "model_hessian_matrix"
    return _run(
        model,
        lambda: _matrix(
            _model_curvature(model, inputs, params, is_batch), diagonal_only, chunk_size, what
        ),
    )


def model_hessian_dict(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    diagonal_only: bool = False,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    """The model Hessian as ``d[P][Q]`` blocks, the layout of ``torch.func.hessian``.

    Args and semantics as `model_hessian_matrix`.

    Returns:
        ``d[P][Q]`` of shape ``(B, *O, *shape(P), *shape(Q))`` (``(*O, ...)`` with
        ``is_batch=False``); with ``diagonal_only=True`` only ``d[P][P]`` exists.
    """
    what = "model_hessian_dict"
    return _run(
        model,
        lambda: _dict(
            _model_curvature(model, inputs, params, is_batch), diagonal_only, chunk_size, what
        ),
    )


def model_hessian_diagonal(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """The exact diagonal of each model-output Hessian, without forming the matrix.

    Returns:
        Shape ``(B, *O, N)`` (``(*O, N)`` with ``is_batch=False``); memory ``O(chunk · N)``.
    """
    what = "model_hessian_diagonal"
    return _run(
        model,
        lambda: _diagonal(
            _model_curvature(model, inputs, params, is_batch), check_chunk_size(chunk_size), what
        ),
    )


def model_sharpness(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Largest absolute eigenvalue of each model-output Hessian.

    Returns:
        Shape ``(B, *O)`` (``O`` as in `model_hessian_matrix`), or ``(*O)`` with
        ``is_batch=False``.
    """
    what = "model_sharpness"
    return _run(
        model,
        lambda: sharpness(
            _matrix(_model_curvature(model, inputs, params, is_batch), False, chunk_size, what)
        ),
    )


# --------------------------------------------------------------------------------------------
# Loss Hessians


def loss_hessian_matrix(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    params: Params = None,
    diagonal_only: bool = False,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Hessian of the scalar ``criterion(model(*inputs), target)`` with respect to the parameters.

    Args:
        model: The module, evaluated in eval mode; its state is restored afterwards.
        criterion: Any callable returning a scalar tensor (an ``nn.Module`` loss or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        target: Passed to ``criterion`` as its second argument.
        params: Parameter names or glob patterns; ``None`` selects every trainable parameter.
        diagonal_only: Compute only the diagonal blocks, zeros elsewhere.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and memory).

    Returns:
        Shape ``(N, N)`` on the parameters' dtype and device.

    Example:
        Least squares $\frac{1}{2}\lVert Xw - y\rVert^2$ has Hessian $X^\top X$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 1)
        >>> loss = lambda out, t: 0.5 * (out - t).pow(2).sum()
        >>> loss_hessian_matrix(model, loss, X, y)
        tensor([[10., 14.],
                [14., 20.]])
    """
    what = "loss_hessian_matrix"
    return _run(
        model,
        lambda: _matrix(
            _loss_curvature(model, criterion, inputs, target, params),
            diagonal_only,
            chunk_size,
            what,
        ),
    )


def loss_hessian_dict(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    params: Params = None,
    diagonal_only: bool = False,
    *,
    chunk_size: int | None = None,
) -> dict[str, dict[str, Tensor]]:
    """The loss Hessian as ``d[P][Q]`` blocks of shape ``(*shape(P), *shape(Q))``.

    Args and semantics as `loss_hessian_matrix`; with ``diagonal_only=True`` only ``d[P][P]``.
    """
    what = "loss_hessian_dict"
    return _run(
        model,
        lambda: _dict(
            _loss_curvature(model, criterion, inputs, target, params),
            diagonal_only,
            chunk_size,
            what,
        ),
    )


def loss_hessian_diagonal(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    params: Params = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""The exact diagonal of the loss Hessian, ``(N,)``, without forming the matrix.

    Example:
        For $\sum_i (w \cdot x_i)^2$ the diagonal is $2 \sum_i x_i^2$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> loss_hessian_diagonal(model, lambda out, t: out.pow(2).sum(), X, None)
        tensor([20., 40.])
    """
    what = "loss_hessian_diagonal"
    return _run(
        model,
        lambda: _diagonal(
            _loss_curvature(model, criterion, inputs, target, params),
            check_chunk_size(chunk_size),
            what,
        ),
    )


def loss_sharpness(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    params: Params = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Largest absolute eigenvalue of the loss Hessian, a 0-dim tensor.

    The dense Hessian is formed, then `hesse.sharpness` takes its spectrum: dense ``eigvalsh``
    up to N = 256, Lanczos on the matrix beyond (exact to the last digits, far cheaper).
    """
    what = "loss_sharpness"
    return _run(
        model,
        lambda: sharpness(
            _matrix(
                _loss_curvature(model, criterion, inputs, target, params), False, chunk_size, what
            )
        ),
    )


def per_sample_loss_hessian(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Tensor,
    params: Params = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Hessian of each sample's own loss ``criterion(model(x_b[None]), target[b][None])``.

    For ``reduction="sum"`` the per-sample Hessians add up to the batch loss Hessian; for
    ``"mean"`` their mean does. Cost is linear in the batch size.

    Returns:
        Shape ``(B, N, N)``.
    """
    what = "per_sample_loss_hessian"
    return _run(
        model,
        lambda: _matrix(
            _sample_loss_curvature(model, criterion, inputs, target, params),
            False,
            chunk_size,
            what,
        ),
    )

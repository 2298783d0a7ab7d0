"""Exact dense Hessians, diagonals and sharpness of a model or of its loss.

Every public function here is one composition:
model + inputs → a pure function of the flat parameter vector (`hesse._functional`) → Hessian
columns by a torch.func transform (`hesse._transforms`), for one batch (`hesse._curvature`) → a
structured result laid out by `ParamLayout`. The seed's flags (``diagonal_only``, ``is_batch``)
only choose which composition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from hesse._curvature import (
    Curvature,
    alternatives,
    check_independent_samples,
    dense,
    diagonal,
    loss_curvature,
    model_curvature,
    sample_loss_curvature,
    sample_model_curvature,
)
from hesse._data import Batch, missing_derivative, model_fits
from hesse._functional import evaluate, loss
from hesse._layout import ParamLayout, Params
from hesse._memory import plan_chunk
from hesse._operators import HessianOperator
from hesse._spectral import DENSE_LIMIT, dense_sharpness, sharpness
from hesse._state import check_training, model_scope
from hesse._transforms import Fallbacks
from hesse._validate import (
    batch_size,
    check_chunk_size,
    check_criterion,
    check_finite,
    check_flag,
    check_model,
    check_model_output,
    check_nonempty,
    check_scalar_loss,
    normal_target,
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


def _model_curvature(
    model: nn.Module, inputs: Any, params: Params, is_batch: bool, training: bool, what: str
) -> Curvature:
    args = normalize_inputs(inputs)
    check_flag("is_batch", is_batch)
    layout = ParamLayout.from_module(model, params)
    check_finite(model, layout)
    fits = model_fits(
        "inputs", Batch(args, None), layout.dtype, where="them", criterion=False, batched=is_batch
    )
    if not is_batch:
        with fits:
            output = check_model_output(evaluate(model, None, args))
        return model_curvature(model, layout, args, tuple(output.shape), Fallbacks())
    if training:
        raise ValueError(
            f"training: {what} with is_batch=True evaluates each sample as a batch of one, "
            "where batch statistics are meaningless; pass is_batch=False for the Hessian of "
            "the batched output in train mode, or training=False."
        )
    b = batch_size(args)
    with fits:
        one = check_model_output(
            evaluate(model, None, tuple(x[:1] for x in args)), what="model (one sample)"
        )
        batched = check_model_output(evaluate(model, None, args))
    # A batch of one keeps a leading dim of size 1 unless the model flattened it away.
    sample_shape = tuple(one.shape[1:] if one.ndim and one.shape[0] == 1 else one.shape)
    if batched.numel() != b * one.numel():
        raise ValueError(
            f"model: with is_batch=True each sample's output must not depend on the other samples, "
            f"but a batch of {b} gave {tuple(batched.shape)} while one sample gave "
            f"{tuple(one.shape)}; pass is_batch=False to differentiate the whole batched output."
        )
    check_independent_samples(model, layout, args, what)
    return sample_model_curvature(model, layout, args, sample_shape, Fallbacks())


def _loss_curvature(
    model: nn.Module, criterion: Any, inputs: Any, target: Any, params: Params
) -> Curvature:
    check_criterion(criterion)
    args = normalize_inputs(inputs)
    target = normal_target(target)
    check_nonempty(args)
    layout = ParamLayout.from_module(model, params)
    check_finite(model, layout)
    with model_fits("inputs, target", Batch(args, target), layout.dtype, where="the batch"):
        value = loss(criterion, model, None, args, target)
    check_scalar_loss(value)
    return loss_curvature(model, layout, criterion, args, target, Fallbacks())


def _sample_loss_curvature(
    model: nn.Module, criterion: Any, inputs: Any, target: Any, params: Params, what: str
) -> Curvature:
    check_criterion(criterion)
    args = normalize_inputs(inputs)
    target = normal_target(target)
    b = batch_size(args)
    if not isinstance(target, Tensor) or target.ndim == 0 or target.shape[0] != b:
        given = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target: per-sample loss Hessians need a tensor target whose dim 0 is the batch "
            f"({b}), got {given}."
        )
    layout = ParamLayout.from_module(model, params)
    check_finite(model, layout)
    first = tuple(x[:1] for x in args)
    with model_fits("inputs, target", Batch(args, target), layout.dtype, where="the batch"):
        check_scalar_loss(loss(criterion, model, None, first, target[:1]))
        check_independent_samples(model, layout, args, what)
    return sample_loss_curvature(model, layout, criterion, args, target, Fallbacks())


def _diagonal_blocks(c: Curvature, chunk_size: int | None, what: str) -> dict[str, Tensor]:
    """``{P: (*lead, n_P, n_P)}``: only the diagonal blocks are computed."""
    # Each block is planned (and refused) on its own: the message names it.
    return {
        name: dense(
            c, c.layout.restrict([name]), chunk_size, f"{what}, block {name!r}", blocks=False
        )
        for name in c.layout.names
    }


def _matrix(c: Curvature, diagonal_only: bool, chunk_size: int | None, what: str) -> Tensor:
    check_flag("diagonal_only", diagonal_only)
    chunk_size = check_chunk_size(chunk_size)
    if not diagonal_only:
        return dense(c, c.layout, chunk_size, what)
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
        alternatives=alternatives(c),
    )
    out = torch.zeros(*c.lead, n, n, dtype=c.layout.dtype, device=c.layout.device)
    for name, block in _diagonal_blocks(c, chunk_size, what).items():
        s = c.layout.slice(name)
        out[..., s, s] = block
    return out


def _dict(
    c: Curvature, diagonal_only: bool, chunk_size: int | None, what: str
) -> dict[str, dict[str, Tensor]]:
    check_flag("diagonal_only", diagonal_only)
    chunk_size = check_chunk_size(chunk_size)
    if not diagonal_only:
        return c.layout.unflatten_matrix(dense(c, c.layout, chunk_size, what))
    lead = c.lead
    return {
        name: {name: block.reshape((*lead, *shape, *shape))}
        for (name, block), shape in zip(
            _diagonal_blocks(c, chunk_size, what).items(), c.layout.shapes
        )
    }


def _run(model: nn.Module, build: Callable[[], Any], training: bool = False) -> Any:
    """Evaluate ``build()`` with the model's state restored afterwards (`hesse._state`).

    Every evaluation of the model inside goes through `hesse._functional`.
    """
    with model_scope(check_model(model), training=check_training(training)):
        try:
            return build()
        except NotImplementedError as err:
            named = missing_derivative(err)
            if named is None:
                raise
            raise named from err


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
    training: bool = False,
) -> Tensor:
    r"""Hessian of each model output with respect to the parameters, as one matrix.

    With $f_b(\theta)$ the output for sample ``b``, entry ``[b, *o, i, j]`` is
    $\partial^2 f_{b,o} / \partial\theta_i \partial\theta_j$. Each sample is evaluated as a
    batch of one; the cost is linear in the batch size.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        diagonal_only: Compute only the diagonal blocks (one per parameter tensor), zeros
            elsewhere; for the diagonal itself use `model_hessian_diagonal`.
        is_batch: Dim 0 of every input is a batch of independent samples, each evaluated as
            a batch of one. ``False`` differentiates ``model(*inputs)`` as one evaluation.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: Differentiate the model in train mode (BatchNorm on the batch's statistics,
            its running statistics untouched; dropout stays off). Only with
            ``is_batch=False``: a sample alone has no batch statistics.

    Returns:
        Shape ``(B, *O, N, N)`` with ``is_batch=True``, else ``(*O, N, N)``, where
        ``O = model(*inputs).shape[1:]`` (or ``.shape``) and ``N`` is the number of selected
        parameter entries, ordered as ``model.named_parameters()``; on the parameters' dtype
        and device, detached.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` are not tensors, the model
            does not return one floating-point tensor, or a flag or ``chunk_size`` has the
            wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; ``chunk_size < 1``; with ``is_batch=True``: the
            inputs' batch sizes differ or are 0, the model couples the samples of a batch
            (batch statistics, an operation across dim 0), or ``training=True``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
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
            _model_curvature(model, inputs, params, is_batch, training, what),
            diagonal_only,
            chunk_size,
            what,
        ),
        training,
    )


def model_hessian_dict(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    diagonal_only: bool = False,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
    training: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """The model Hessian as ``d[P][Q]`` blocks, the layout of ``torch.func.hessian``.

    The same Hessian as `model_hessian_matrix`, split by parameter: ``d[P][Q]`` holds the
    second derivatives with respect to parameters ``P`` and ``Q``.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        diagonal_only: Compute only the blocks ``d[P][P]`` of each parameter with itself;
            the others are absent.
        is_batch: Dim 0 of every input is a batch of independent samples, each evaluated as
            a batch of one. ``False`` differentiates ``model(*inputs)`` as one evaluation.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: Differentiate the model in train mode (BatchNorm on the batch's statistics,
            its running statistics untouched; dropout stays off). Only with
            ``is_batch=False``: a sample alone has no batch statistics.

    Returns:
        ``d[P][Q]`` of shape ``(B, *O, *shape(P), *shape(Q))`` (``(*O, ...)`` with
        ``is_batch=False``), keyed by parameter name in ``model.named_parameters()`` order;
        with ``diagonal_only=True`` only ``d[P][P]`` exists.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` are not tensors, the model
            does not return one floating-point tensor, or a flag or ``chunk_size`` has the
            wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; ``chunk_size < 1``; with ``is_batch=True``: the
            inputs' batch sizes differ or are 0, the model couples the samples of a batch
            (batch statistics, an operation across dim 0), or ``training=True``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
        >>> model = torch.nn.Linear(2, 1)  # f = w1 x1 + w2 x2 + b: linear, zero Hessian
        >>> d = model_hessian_dict(model, torch.ones(3, 2))
        >>> d["weight"]["bias"].shape  # (B, *O, *weight.shape, *bias.shape)
        torch.Size([3, 1, 1, 2, 1])
        >>> bool(d["weight"]["weight"].eq(0).all())
        True
    """
    what = "model_hessian_dict"
    return _run(
        model,
        lambda: _dict(
            _model_curvature(model, inputs, params, is_batch, training, what),
            diagonal_only,
            chunk_size,
            what,
        ),
        training,
    )


def model_hessian_diagonal(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
    training: bool = False,
) -> Tensor:
    r"""The exact diagonal of each model-output Hessian, without forming the matrix.

    Every entry still costs a Hessian column, so the time is about that of
    `model_hessian_matrix`; the memory is $O(\text{chunk} \cdot N)$ instead of $N^2$.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        is_batch: Dim 0 of every input is a batch of independent samples, each evaluated as
            a batch of one. ``False`` differentiates ``model(*inputs)`` as one evaluation.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: Differentiate the model in train mode (BatchNorm on the batch's statistics,
            its running statistics untouched; dropout stays off). Only with
            ``is_batch=False``: a sample alone has no batch statistics.

    Returns:
        Shape ``(B, *O, N)`` (``(*O, N)`` with ``is_batch=False``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` are not tensors, the model
            does not return one floating-point tensor, or a flag or ``chunk_size`` has the
            wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; ``chunk_size < 1``; with ``is_batch=True``: the
            inputs' batch sizes differ or are 0, the model couples the samples of a batch
            (batch statistics, an operation across dim 0), or ``training=True``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
        $f = (w_1 x_1)^2 + (w_2 x_2)^2$ has diagonal $(2x_1^2, 2x_2^2)$:

        >>> class Squares(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.ones(2))
        ...     def forward(self, x):
        ...         return (self.w * x).pow(2).sum(-1)
        >>> model_hessian_diagonal(Squares(), torch.tensor([[1.0, 3.0], [2.0, 0.0]]))
        tensor([[ 2., 18.],
                [ 8.,  0.]])
    """
    what = "model_hessian_diagonal"
    return _run(
        model,
        lambda: diagonal(
            _model_curvature(model, inputs, params, is_batch, training, what),
            check_chunk_size(chunk_size),
            what,
        ),
        training,
    )


def model_sharpness(
    model: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    params: Params = None,
    is_batch: bool = True,
    *,
    chunk_size: int | None = None,
    training: bool = False,
) -> Tensor:
    r"""Largest absolute eigenvalue $\max_i |\lambda_i|$ of each model-output Hessian.

    Each Hessian is formed densely (as by `model_hessian_matrix`) and solved with
    ``torch.linalg.eigvalsh``.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        is_batch: Dim 0 of every input is a batch of independent samples, each evaluated as
            a batch of one. ``False`` differentiates ``model(*inputs)`` as one evaluation.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: Differentiate the model in train mode (BatchNorm on the batch's statistics,
            its running statistics untouched; dropout stays off). Only with
            ``is_batch=False``: a sample alone has no batch statistics.

    Returns:
        Shape ``(B, *O)`` (``O`` as in `model_hessian_matrix`), or ``(*O)`` with
        ``is_batch=False``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``inputs`` are not tensors, the model
            does not return one floating-point tensor, or a flag or ``chunk_size`` has the
            wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; ``chunk_size < 1``; with ``is_batch=True``: the
            inputs' batch sizes differ or are 0, the model couples the samples of a batch
            (batch statistics, an operation across dim 0), or ``training=True``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
        $f = w_1 w_2 x$ has Hessian $\begin{pmatrix} 0 & x \\ x & 0 \end{pmatrix}$, with
        eigenvalues $\pm x$:

        >>> class Product(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.ones(2))
        ...     def forward(self, x):
        ...         return self.w[0] * self.w[1] * x
        >>> model_sharpness(Product(), torch.tensor([3.0, -2.0]))
        tensor([3., 2.])
    """
    what = "model_sharpness"

    def build() -> Tensor:
        c = _model_curvature(model, inputs, params, is_batch, training, what)
        # No diagonal to suggest: it gives no sharpness.
        matrix = _matrix(replace(c, diagonal=None), False, chunk_size, what)
        return dense_sharpness(matrix).to(c.layout.dtype)

    return _run(model, build, training)


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
    training: bool = False,
) -> Tensor:
    r"""Hessian of the scalar ``criterion(model(*inputs), target)`` with respect to the parameters.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        criterion: Any callable ``criterion(output, target)`` returning a scalar tensor (an
            ``nn.Module`` loss or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        target: Passed to ``criterion`` as its second argument (``None`` for a criterion that
            ignores it).
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        diagonal_only: Compute only the diagonal blocks (one per parameter tensor), zeros
            elsewhere; for the diagonal itself use the ``*_hessian_diagonal`` functions.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: The Hessian of the training-mode loss: BatchNorm normalises with the
            batch's statistics (its running statistics untouched); dropout stays off.

    Returns:
        Shape ``(N, N)`` on the parameters' dtype and device, detached; rows and columns
        follow ``model.named_parameters()`` (see `ParamLayout`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or a flag or
            ``chunk_size`` has the wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; the batch is empty; the loss is not a scalar
            (``reduction="none"``); ``chunk_size < 1``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
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
        training,
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
    training: bool = False,
) -> dict[str, dict[str, Tensor]]:
    r"""The loss Hessian as ``d[P][Q]`` blocks, the layout of ``torch.func.hessian``.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        criterion: Any callable ``criterion(output, target)`` returning a scalar tensor (an
            ``nn.Module`` loss or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        target: Passed to ``criterion`` as its second argument (``None`` for a criterion that
            ignores it).
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        diagonal_only: Compute only the blocks ``d[P][P]`` of each parameter with itself;
            the others are absent.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: The Hessian of the training-mode loss: BatchNorm normalises with the
            batch's statistics (its running statistics untouched); dropout stays off.

    Returns:
        ``d[P][Q]`` of shape ``(*shape(P), *shape(Q))``, keyed by parameter name in
        ``model.named_parameters()`` order; with ``diagonal_only=True`` only ``d[P][P]``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or a flag or
            ``chunk_size`` has the wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; the batch is empty; the loss is not a scalar
            (``reduction="none"``); ``chunk_size < 1``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
        For $\frac{1}{2}\lVert Xw + b\rVert^2$ the weight-bias block is $X^\top \mathbf{1}$:

        >>> model = torch.nn.Linear(2, 1)
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> loss = lambda out, t: 0.5 * out.pow(2).sum()
        >>> loss_hessian_dict(model, loss, X, None)["weight"]["bias"]
        tensor([[[4.],
                 [6.]]])
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
        training,
    )


def loss_hessian_diagonal(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    params: Params = None,
    *,
    chunk_size: int | None = None,
    training: bool = False,
) -> Tensor:
    r"""The exact diagonal of the loss Hessian, ``(N,)``, without forming the matrix.

    Every entry still costs a Hessian column, so the time is about that of
    `loss_hessian_matrix`; the memory is $O(\text{chunk} \cdot N)$ instead of $N^2$.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        criterion: Any callable ``criterion(output, target)`` returning a scalar tensor (an
            ``nn.Module`` loss or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        target: Passed to ``criterion`` as its second argument (``None`` for a criterion that
            ignores it).
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: The Hessian of the training-mode loss: BatchNorm normalises with the
            batch's statistics (its running statistics untouched); dropout stays off.

    Returns:
        Shape ``(N,)`` on the parameters' dtype and device.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or a flag or
            ``chunk_size`` has the wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; the batch is empty; the loss is not a scalar
            (``reduction="none"``); ``chunk_size < 1``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
        For $\sum_i (w \cdot x_i)^2$ the diagonal is $2 \sum_i x_i^2$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> loss_hessian_diagonal(model, lambda out, t: out.pow(2).sum(), X, None)
        tensor([20., 40.])
    """
    what = "loss_hessian_diagonal"
    return _run(
        model,
        lambda: diagonal(
            _loss_curvature(model, criterion, inputs, target, params),
            check_chunk_size(chunk_size),
            what,
        ),
        training,
    )


def loss_sharpness(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    params: Params = None,
    *,
    chunk_size: int | None = None,
    training: bool = False,
) -> Tensor:
    r"""Largest absolute eigenvalue of the loss Hessian, $\max_i |\lambda_i|$, a 0-dim tensor.

    Up to N = 256 the dense Hessian is formed and ``eigvalsh`` takes its spectrum; beyond,
    Lanczos runs on Hessian-vector products (`hesse.HessianOperator` and `hesse.sharpness`)
    and the N x N matrix is never formed: at N = 5,699 that took 0.66 s where forming the
    dense matrix took 11.3 s. Lanczos stops at a relative residual of $\epsilon^{0.625}$ of the
    dtype (1.6e-10 in float64), so the value then agrees with the dense one to about machine
    precision, not bit for bit; its start vector comes from a fixed seed, so the call is
    reproducible and leaves torch's global generator alone.

    Edge-of-stability work tracks the largest *algebraic* eigenvalue instead:
    ``hesse.eigsh(hesse.HessianOperator(...), k=1, which="LA")``.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            parameters, flags, buffers and ``.grad`` restored afterwards.
        criterion: Any callable ``criterion(output, target)`` returning a scalar tensor (an
            ``nn.Module`` loss or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        target: Passed to ``criterion`` as its second argument (``None`` for a criterion that
            ignores it).
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        chunk_size: Hessian columns per vectorised pass of the dense path (N <= 256);
            unused beyond.
        training: The Hessian of the training-mode loss: BatchNorm normalises with the
            batch's statistics (its running statistics untouched); dropout stays off.

    Returns:
        A 0-dim tensor on the parameters' dtype and device.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or a flag or
            ``chunk_size`` has the wrong type.
        ValueError: ``params`` names no parameter of the model or selects none; a selected
            parameter is NaN or infinite; the batch is empty; the loss is not a scalar
            (``reduction="none"``); ``chunk_size < 1``; the loss Hessian has NaN or infinite
            entries (data with them).
        MemoryBudgetError: The dense Hessian (N <= 256) would not fit in the device's memory.

    Examples:
        $\frac{1}{2}\lVert Xw\rVert^2$ with $X = \operatorname{diag}(1, 2)$ has Hessian
        $X^\top X = \operatorname{diag}(1, 4)$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> loss_sharpness(model, lambda out, t: 0.5 * out.pow(2).sum(), X, None)
        tensor(4.)
    """
    what = "loss_sharpness"
    # Named after what the user passed: the spectral tools' "A:" is no argument here.
    not_finite = ValueError(
        "inputs, target: the loss Hessian contains NaN or infinite values; check the data and "
        "the model's parameters."
    )

    def build() -> Tensor:
        c = _loss_curvature(model, criterion, inputs, target, params)
        dtype = c.layout.dtype
        if c.layout.numel <= DENSE_LIMIT:
            matrix = _matrix(replace(c, diagonal=None), False, check_chunk_size(chunk_size), what)
            if not bool(torch.isfinite(matrix).all()):
                raise not_finite
            return dense_sharpness(matrix).to(dtype)
        # Matrix-free: Lanczos on products, far cheaper than forming N x N and solving it. A
        # residual of eps^0.625 (1.6e-10 in float64) puts the eigenvalue within about eps of
        # the dense one (eigsh's default, √eps on the eigenvalue, left 1e-9 here).
        batch = Batch(normalize_inputs(inputs), normal_target(target))
        op = HessianOperator(model, criterion, batch, params, training=training)
        tol = torch.finfo(torch.promote_types(dtype, torch.float32)).eps ** 0.625  # half: in f32
        try:
            value = sharpness(op, seed=0, tol=tol)  # reproducible; global RNG untouched
        except ValueError as err:
            if not str(err).startswith("A: a product A @ V returned NaN or infinite values"):
                raise
            raise not_finite from None
        return value.to(dtype)

    return _run(model, build, training)


def per_sample_loss_hessian(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Tensor,
    params: Params = None,
    *,
    chunk_size: int | None = None,
    training: bool = False,
) -> Tensor:
    r"""Hessian of each sample's own loss ``criterion(model(x_b[None]), target[b][None])``.

    For ``reduction="sum"`` the per-sample Hessians add up to the batch loss Hessian; for
    ``"mean"`` their mean does. Each sample is evaluated as a batch of one, in eval mode;
    the cost is linear in the batch size.

    Args:
        model: The module; evaluated in eval mode, its parameters, flags, buffers and
            ``.grad`` restored afterwards.
        criterion: Any callable ``criterion(output, target)`` returning a scalar tensor (an
            ``nn.Module`` loss or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``; dim 0 of
            each is the batch.
        target: A tensor whose dim 0 is the batch: sample ``b``'s loss gets ``target[b][None]``.
        params: The parameters to differentiate: names, glob patterns (``"encoder.*"``) or the
            model's ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``. Rows follow
            ``model.named_parameters()``.
        chunk_size: Hessian columns per vectorised pass (``None``: chosen for speed and
            memory).
        training: Must be ``False``: a sample evaluated alone has no batch statistics. For
            the training-mode batch loss use ``loss_hessian_matrix(..., training=True)``.

    Returns:
        Shape ``(B, N, N)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or ``training``
            or ``chunk_size`` has the wrong type.
        ValueError: ``training=True``; ``target`` is not a tensor whose dim 0 is the batch;
            the inputs' batch sizes differ or are 0; the model couples the samples of a
            batch; ``params`` names no parameter or selects none; a selected parameter is
            NaN or infinite; the loss is not a scalar; ``chunk_size < 1``.
        MemoryBudgetError: The result and working set would not fit in the device's memory
            (raised before allocating).

    Examples:
        $\ell_b = (w \cdot x_b)^2$ has Hessian $2 x_b x_b^\top$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 0.0], [1.0, 2.0]]), torch.zeros(2, 1)
        >>> per_sample_loss_hessian(model, torch.nn.MSELoss(reduction="sum"), X, y)
        tensor([[[2., 0.],
                 [0., 0.]],
        <BLANKLINE>
                [[2., 4.],
                 [4., 8.]]])
    """
    what = "per_sample_loss_hessian"
    if check_training(training):
        raise ValueError(
            "training: per_sample_loss_hessian evaluates each sample as a batch of one, where "
            "batch statistics are meaningless; use training=False (eval mode), or "
            "loss_hessian_matrix(..., training=True) for the batch loss in train mode."
        )
    return _run(
        model,
        lambda: _matrix(
            _sample_loss_curvature(model, criterion, inputs, target, params, what),
            False,
            chunk_size,
            what,
        ),
    )

"""torch.func transforms that turn a pure function of ``theta`` into Hessian columns.

A *column function* maps tangents ``E`` of shape ``(C, N)`` to ``(C, *lead, N)``: row ``c`` holds
``H_k E[c]`` for every output ``k`` of the differentiated function (``lead`` = its output shape,
with a leading batch dim for per-sample functions). Dense matrices and exact diagonals are then
assembled from columns of the identity, ``chunk`` at a time, so memory stays bounded.

Two transforms, each the faster one somewhere (2 CPU threads, torch 2.13):

- reverse-over-reverse, ``jacrev(v ↦ jacrev(f)(θ)·v)``: the forward and first backward pass do
  not depend on the tangent, so ``vmap`` runs them once per chunk and batches only the second
  backward. Fastest for a scalar loss (0.30 vs 0.49 ms per column at N=7,770), and needs no
  forward-mode derivatives (``nn.LSTM`` has none on CPU).
- forward-over-reverse, ``jvp(jacrev(f), θ, v)``: fastest for per-sample outputs (4-5x over
  reverse-over-reverse for an MLP with 4 outputs per sample). ``jvp(grad(f))`` would fail with
  ``nn.MSELoss`` on flat-vector views (pytorch#123996); ``jvp(jacrev(f))`` does not.

Each call tries the preferred transform on its first chunk and falls back to the other, then to
loops (see `Fallbacks`); only the loops warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from hesse._validate import first_line

__all__ = [
    "ColumnFn",
    "ColumnsAt",
    "Fallbacks",
    "PerformanceWarning",
    "Strategy",
    "dense_from_columns",
    "diagonal_from_columns",
    "forward_columns",
    "hessian_columns",
    "looped_hvp_columns",
    "pullback_columns",
    "reverse_columns",
    "sample_hessian_columns",
    "sample_hvp_columns",
    "sample_loop_columns",
    "warn_fallback",
]

ColumnFn = Callable[[Tensor], Tensor]


class PerformanceWarning(UserWarning):
    """hesse fell back to a correct but slower computation path.

    Issued when ``torch.func.vmap`` cannot batch the model (``.item()`` on inputs,
    ``nn.LSTM`` over samples, an ``autograd.Function`` without ``setup_context``) and a loop
    computes the same result: once per call of a dense function, once per kind of product for
    an operator. The message names the reason and the path taken. Silence it with
    ``warnings.filterwarnings("ignore", category=hesse.PerformanceWarning)``.
    """


def _contract(jacobian: Tensor, v: Tensor) -> Tensor:
    # (*out, N) @ (N,) -> (*out,); a scalar function's gradient gives a scalar.
    return jacobian @ v


Transform = Callable[[Callable[[Tensor], Tensor], Tensor], ColumnFn]


def reverse_columns(f: Callable[[Tensor], Tensor], theta: Tensor) -> ColumnFn:
    """Vectorised reverse-over-reverse HVPs of ``f: (N,) -> (*out)`` at ``theta``."""

    def column(v: Tensor) -> Tensor:
        return jacrev(lambda t: _contract(jacrev(f)(t), v))(theta)

    return vmap(column)


def pullback_columns(f: Callable[[Tensor], Tensor], theta: Tensor) -> ColumnFn:
    """HVPs of a function with one output, by the pullback of its gradient.

    The forward pass and the gradient run once, then the pullback of the gradient (``H v``
    for every ``v``) is vectorised over the tangents. For a loss this batches only the second
    backward: 24 ms against 33 ms for 128 columns of the nested ``jacrev`` at N = 7,770, 28
    against 30 ms for 32 columns at N = 16,522 (2 CPU threads). A function with more than
    one output raises, and the policy moves on to the next transform.
    """

    def columns(tangents: Tensor) -> Tensor:
        shape: list[int] = []

        def one_output(t: Tensor) -> Tensor:
            value = f(t)
            shape[:] = value.shape
            return value.reshape(())

        pullback = vjp(grad(one_output), theta)[1]
        return vmap(pullback)(tangents)[0].reshape(tangents.shape[0], *shape, theta.numel())

    return columns


def forward_columns(f: Callable[[Tensor], Tensor], theta: Tensor) -> ColumnFn:
    """Vectorised forward-over-reverse HVPs of ``f: (N,) -> (*out)`` at ``theta``."""

    def column(v: Tensor) -> Tensor:
        return jvp(jacrev(f), (theta,), (v,))[1]

    return vmap(column)


def sample_hvp_columns(
    transform: Transform, g: Callable[..., Tensor], theta: Tensor, samples: tuple[Tensor, ...]
) -> ColumnFn:
    """Per-sample HVPs of ``g(theta, *sample)``, vectorised over samples and tangents.

    ``samples`` carry the batch in dim 0; the result is ``(C, B, *out, N)``. Cost is linear in B.
    """

    def columns(tangents: Tensor) -> Tensor:
        def one(*sample: Tensor) -> Tensor:
            return transform(lambda t: g(t, *sample), theta)(tangents)

        # out_dims=0 then movedim: vmap's out_dims=1 fails to expand a result that does not
        # depend on the sample (a zero Hessian block), as of torch 2.13.
        return vmap(one)(*samples).movedim(0, 1)

    return columns


def looped_hvp_columns(f: Callable[[Tensor], Tensor], theta: Tensor) -> ColumnFn:
    """The same products by plain autograd double-backward, one output and tangent at a time.

    The slow path for models that ``vmap`` cannot batch (``.item()``, data-dependent control
    flow); it uses no torch.func transform, so it is correct wherever the model runs at all.
    """

    def columns(tangents: Tensor) -> Tensor:
        t = theta.detach().requires_grad_()
        with torch.enable_grad():
            out = f(t)
            flat = out.reshape(-1)
            res = tangents.new_zeros(tangents.shape[0], flat.numel(), theta.numel())
            for k in range(flat.numel()):
                if not flat[k].requires_grad:
                    continue
                (g,) = torch.autograd.grad(flat[k], t, create_graph=True, allow_unused=True)
                if g is None or not g.requires_grad:
                    continue  # f is at most linear in theta: this Hessian is zero
                for c in range(tangents.shape[0]):
                    (hv,) = torch.autograd.grad(
                        g, t, grad_outputs=tangents[c], retain_graph=True, allow_unused=True
                    )
                    if hv is not None:
                        res[c, k] = hv
        return res.reshape(tangents.shape[0], *out.shape, theta.numel())

    return columns


def sample_loop_columns(
    columns_of: Callable[[tuple[Tensor, ...]], ColumnFn], samples: tuple[Tensor, ...]
) -> ColumnFn:
    """Per-sample column functions applied one sample at a time, stacked as ``(C, B, ...)``.

    The fallback of `sample_hvp_columns` for models that vmap cannot batch over samples
    (``nn.LSTM``, ``.item()`` on inputs): ``columns_of(sample)`` is still vectorised over
    tangents, or the autograd loop `looped_hvp_columns`.
    """

    def columns(tangents: Tensor) -> Tensor:
        return torch.stack([columns_of(sample)(tangents) for sample in zip(*samples)], dim=1)

    return columns


def warn_fallback(error: BaseException, path: str, stacklevel: int = 3) -> None:
    """The one warning a call emits when vmap fails and a slower, correct path takes over."""
    warnings.warn(
        f"hesse: torch.func.vmap could not batch this model ({first_line(error)}); fell back "
        f"to a correct but slower path: {path}.",
        PerformanceWarning,
        stacklevel=stacklevel,
    )


class Strategy(NamedTuple):
    """One way to compute columns; ``slow`` ones (loops) warn when a call falls back to them."""

    description: str
    columns: ColumnFn
    slow: bool


def _out_of_memory(error: BaseException) -> bool:
    """Running out of memory is never a reason to take another path: it is the user's to see."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(error)
    return isinstance(error, oom) or "out of memory" in text or "can't allocate memory" in text


class Fallbacks:
    """The one fallback policy: the fastest strategy that works for the model, chosen once.

    A policy lives as long as one public call of a dense function, or one operator (one per
    kind of computation). Strategy lists are built fastest first. The first chunk tries them in
    order; every later chunk starts from the one that worked, so a call that falls back to a
    loop warns once (`PerformanceWarning`, naming the reason and the path). Only a first chunk
    may fall back, and never on running out of memory: a later failure is a real error.
    """

    def __init__(self) -> None:
        self._start = 0
        self._settled = False  # a chunk has succeeded: no more falling back in this call
        self._warned = False

    def __call__(self, strategies: list[Strategy]) -> ColumnFn:
        def columns(tangents: Tensor) -> Tensor:
            if self._settled:
                return strategies[self._start].columns(tangents)
            first_error: BaseException | None = None
            for i in range(self._start, len(strategies)):
                strategy = strategies[i]
                try:
                    result = strategy.columns(tangents)
                except (RuntimeError, NotImplementedError) as err:
                    if i == len(strategies) - 1 or _out_of_memory(err):
                        raise
                    first_error = first_error or err
                    continue
                if strategy.slow and first_error is not None and not self._warned:
                    self._warned = True
                    warn_fallback(first_error, strategy.description)
                self._start, self._settled = i, True
                return result
            raise AssertionError("no strategy given")  # unreachable

        return columns


def _transforms(scalar: bool) -> tuple[Transform, Transform]:
    return (reverse_columns, forward_columns) if scalar else (forward_columns, reverse_columns)


def hessian_columns(
    f: Callable[[Tensor], Tensor], theta: Tensor, *, scalar: bool
) -> list[Strategy]:
    """Strategies for the Hessian columns of ``f`` at ``theta``, fastest first.

    ``scalar``: ``f`` returns one number (a loss), where reverse-over-reverse is faster.
    """
    fastest = [Strategy("vectorised", pullback_columns(f, theta), slow=False)] if scalar else []
    return [
        *fastest,
        *(Strategy("vectorised", t(f, theta), slow=False) for t in _transforms(scalar)),
        Strategy("an autograd loop over outputs and columns", looped_hvp_columns(f, theta), True),
    ]


def sample_hessian_columns(
    g: Callable[..., Tensor], theta: Tensor, samples: tuple[Tensor, ...], *, scalar: bool
) -> list[Strategy]:
    """Strategies for per-sample columns of ``g(theta, *sample)``, fastest first."""

    def per_sample(transform: Transform) -> Callable[[tuple[Tensor, ...]], ColumnFn]:
        return lambda sample: transform(lambda t: g(t, *sample), theta)

    transforms = _transforms(scalar)
    return [
        *(
            Strategy("vectorised", sample_hvp_columns(t, g, theta, samples), slow=False)
            for t in transforms
        ),
        *(
            Strategy("a loop over samples", sample_loop_columns(per_sample(t), samples), True)
            for t in transforms
        ),
        Strategy(
            "an autograd loop over samples, outputs and columns",
            sample_loop_columns(per_sample(looped_hvp_columns), samples),
            slow=True,
        ),
    ]


ColumnsAt = Callable[[slice], ColumnFn]


def _identity_rows(count: int, n: int, like: Tensor) -> Tensor:
    e = like.new_zeros(count, n)
    idx = torch.arange(count, device=like.device)
    e[idx, idx] = 1
    return e


def dense_from_columns(
    columns_at: ColumnsAt, n: int, lead: tuple[int, ...], chunk: int, like: Tensor
) -> Tensor:
    """The full ``(*lead, N, N)`` Hessian, ``chunk`` identity columns per vectorised pass.

    ``columns_at(window)`` gives the column function of the map of ``theta[window]`` alone
    (the other entries held at their values). By symmetry, the chunk of columns ``[a, b)``
    only needs rows ``[a, N)``: it differentiates the window ``[a, N)`` and mirrors the
    result, so the backward pass stops at the first layer the window touches.
    """
    out = like.new_empty(*lead, n, n)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        band = columns_at(slice(start, n))(_identity_rows(stop - start, n - start, like))
        band = band.movedim(0, -2)  # (*lead, chunk, N - start): rows [start, stop)
        out[..., start:stop, start:] = band
        out[..., start:, start:stop] = band.transpose(-1, -2)
    return out


def diagonal_from_columns(
    columns_at: ColumnsAt, n: int, lead: tuple[int, ...], chunk: int, like: Tensor
) -> Tensor:
    """The exact diagonal ``(*lead, N)``; each chunk differentiates only its own window."""
    out = like.new_empty(*lead, n)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = columns_at(slice(start, stop))(_identity_rows(stop - start, stop - start, like))
        out[..., start:stop] = block.movedim(0, -2).diagonal(dim1=-2, dim2=-1)
    return out

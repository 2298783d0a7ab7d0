"""Workarounds that keep second derivatives correct on torch 2.x, applied during every call.

`second_order_safe` is the one context in which hesse evaluates a model for derivatives, on
every path (vectorised or plain autograd, dense or operator); nothing else needs remembering.

- torch's forward-AD decompositions are loaded once up front (see `load_forward_ad`).
- Fused attention kernels (flash / memory-efficient, CPU and GPU) have no second derivative;
  the MATH backend of ``scaled_dot_product_attention`` has one.
- ``vmap`` batching rules of the layer-norm and batch-norm *backward* kernels give wrong second
  derivatives (functorch#534, still open): on torch 2.13 the vmapped Hessian of an affine
  ``nn.LayerNorm`` model was off by 2.9 and of ``nn.InstanceNorm1d(affine=True)`` by 87, while
  plain autograd was right. Normalisations that use the statistics of their input are therefore
  evaluated through the same formula written with elementary ops, whose batching rules are
  correct. Batch norm with running statistics (eval mode) and group norm were measured correct
  and are left to their fused kernels.
- ``torch._weight_norm`` (behind both weight-norm APIs) has a wrong double backward in plain
  autograd and under torch.func alike: its Hessian was non-symmetric and off by 0.45 against
  finite differences. It is evaluated as ``v * (g / ‖v‖)`` written with elementary ops.
- ``nn.Embedding(max_norm=...)`` renormalises its weight in place during forward, which fails
  on a view of hesse's flat parameters and would change the user's weight: it is done out of
  place, with the derivative torch's in-place version gives.
- Dropout is the identity: a random mask would make every product come from another matrix.
  In eval mode (the default) it is the identity anyway; with ``training=True`` this is the
  documented choice (the training loss with dropout off), also for ``F.dropout`` called
  directly with ``training=self.training``.
- ``torch.utils.checkpoint`` is switched off: recomputation saves memory but does not change
  values, and the checkpointed function itself is differentiable where the checkpoint is not
  (torch.func refuses its saved-tensor hooks, and the reentrant variant silently gives no
  gradient to parameters when no input requires grad).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["load_forward_ad", "second_order_safe"]

_forward_ad_ready = False


def load_forward_ad() -> None:
    """Import torch's forward-AD decompositions once, without its internal deprecation warning.

    torch 2.13 registers them through ``torch.jit.script`` on the first ``jvp``, which emits
    "torch.jit.script is deprecated" at the user even though nobody called ``torch.jit``.
    """
    global _forward_ad_ready
    if _forward_ad_ready:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        # A torch without the module loads nothing on the first jvp either.
        with suppress(ImportError):
            import torch._decomp.decompositions_for_jvp  # noqa: F401
    _forward_ad_ready = True


def _normalize(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


def _layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    k = len(normalized_shape)
    dims = tuple(range(input.ndim - k, input.ndim))
    return _affine(_normalize(input, dims, eps), weight, bias, tuple(normalized_shape))


def _channel_shape(input: Tensor) -> tuple[int, ...]:
    return (1, input.shape[1]) + (1,) * (input.ndim - 2)


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        dims = (0, *range(2, input.ndim))
        out = _normalize(input, dims, eps)
    else:
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(out, weight, bias, shape)


def _instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    shape = _channel_shape(input)
    if use_input_stats or running_mean is None or running_var is None:
        out = _normalize(input, tuple(range(2, input.ndim)), eps)
    else:
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(out, weight, bias, shape)


def _batch_norm_dispatch(*args: Any, **kwargs: Any) -> Tensor:
    training = kwargs.get("training", args[5] if len(args) > 5 else False)
    if training:
        return _batch_norm(*args, **kwargs)
    return F.batch_norm(*args, **kwargs)


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    keep = dim % v.ndim
    norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.ndim) if d != keep], keepdim=True)
    return v * (g / norm)


def _no_dropout(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return input


def _attention_no_dropout(*args: Any, **kwargs: Any) -> Tensor:
    """``scaled_dot_product_attention`` with ``dropout_p=0``.

    Attention modules pass their dropout as an argument (``nn.MultiheadAttention`` without
    weights, HuggingFace's ``dropout_p=p if self.training else 0``), not through F.dropout.
    """
    if len(args) > 4:
        args = (*args[:4], 0.0, *args[5:])
    if "dropout_p" in kwargs:
        kwargs["dropout_p"] = 0.0
    return F.scaled_dot_product_attention(*args, **kwargs)


def _embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    if max_norm is not None:
        # torch renormalises the looked-up rows of the weight in place, under no_grad, so that
        # derivatives are taken at the renormalised values with an identity Jacobian. The same
        # out of place (a view of hesse's flat parameters cannot be written): value r(w),
        # derivative of w. Detached, not only under no_grad, which forward mode ignores.
        w = weight.detach()
        norms = torch.linalg.vector_norm(w, ord=norm_type, dim=1)
        used = torch.zeros_like(norms).scatter(0, input.reshape(-1), 1.0) > 0
        scale = torch.where(used & (norms > max_norm), max_norm / (norms + 1e-7), 1.0)
        weight = weight + w * (scale[:, None] - 1)
    if padding_idx is not None:
        # The padding row gets no gradient in reverse mode, but forward mode carries its
        # tangent: both see it as a constant when it is one (the same values).
        row = padding_idx if padding_idx >= 0 else weight.shape[0] + padding_idx
        pad = torch.arange(weight.shape[0], device=weight.device) == row
        weight = torch.where(pad[:, None], weight.detach(), weight)
    return F.embedding(input, weight, None, None, norm_type, scale_grad_by_freq, sparse)


_DECOMPOSITIONS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    torch._weight_norm: _weight_norm,
    F.embedding: _embedding,
    F.scaled_dot_product_attention: _attention_no_dropout,
    F.dropout: _no_dropout,
    F.dropout1d: _no_dropout,
    F.dropout2d: _no_dropout,
    F.dropout3d: _no_dropout,
    F.alpha_dropout: _no_dropout,
    F.feature_alpha_dropout: _no_dropout,
    torch.dropout: _no_dropout,
    torch.alpha_dropout: _no_dropout,
    torch.feature_dropout: _no_dropout,
    torch.feature_alpha_dropout: _no_dropout,
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.instance_norm: _instance_norm,
    F.batch_norm: _batch_norm_dispatch,
}


class _SecondOrderSafe(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        impl = _DECOMPOSITIONS.get(func)
        return (impl or func)(*args, **(kwargs or {}))


class _NoCheckpoint:
    """Stand-in for the reentrant ``CheckpointFunction``: run the function, keep its graph."""

    @staticmethod
    def apply(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _plain_generator(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stand-in for the non-reentrant checkpoint's context generator: no hooks at all."""
    yield


@contextmanager
def _checkpoint_off() -> Iterator[None]:
    # ``torch.utils.checkpoint.checkpoint`` looks both names up in its module at call time, so
    # this reaches models that imported ``checkpoint`` itself, and HuggingFace's partials of it.
    import torch.utils.checkpoint as ckpt

    names = ("CheckpointFunction", "_checkpoint_without_reentrant_generator")
    if not all(hasattr(ckpt, n) for n in names):  # another torch: leave checkpoint alone
        yield
        return
    saved = [getattr(ckpt, n) for n in names]
    setattr(ckpt, names[0], _NoCheckpoint)
    setattr(ckpt, names[1], _plain_generator)
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(ckpt, name, value)


@contextmanager
def second_order_safe() -> Iterator[None]:
    """The context in which hesse differentiates a model twice, on every path.

    Attention runs on the MATH kernel (the only one with a second derivative); norms, weight
    norm and dropout go through the replacements above; checkpointing is off.
    """
    load_forward_ad()
    with ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(_checkpoint_off())
        stack.enter_context(_SecondOrderSafe())
        yield

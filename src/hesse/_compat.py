"""Workarounds that keep second derivatives correct on torch 2.x, applied during every call.

- torch's forward-AD decompositions are loaded once up front (see `_load_forward_ad`).
- Fused attention kernels (flash / memory-efficient, CPU and GPU) have no second derivative;
  the MATH backend of ``scaled_dot_product_attention`` has one.
- ``vmap`` batching rules of the layer-norm and batch-norm *backward* kernels give wrong second
  derivatives (functorch#534, still open): on torch 2.13 the vmapped Hessian of an affine
  ``nn.LayerNorm`` model was off by 2.9 and of ``nn.InstanceNorm1d(affine=True)`` by 87, while
  plain autograd was right. Normalisations that use the statistics of their input are therefore
  evaluated through the same formula written with elementary ops, whose batching rules are
  correct. Batch norm with running statistics (eval mode) and group norm were measured correct
  and are left to their fused kernels.
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

__all__ = ["elementary_norms", "math_attention", "second_order_safe"]

_forward_ad_ready = False


def _load_forward_ad() -> None:
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


_DECOMPOSITIONS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.instance_norm: _instance_norm,
    F.batch_norm: _batch_norm_dispatch,
}


class _ElementaryNorms(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        impl = _DECOMPOSITIONS.get(func)
        return (impl or func)(*args, **(kwargs or {}))


def math_attention() -> Any:
    """Attention through the MATH kernel, the only one with a second derivative."""
    return sdpa_kernel(SDPBackend.MATH)


def elementary_norms() -> Any:
    """Normalisations through elementary ops, whose vmap batching rules are correct.

    Plain autograd (no vmap) does not need it: its norm double-backward is right.
    """
    _load_forward_ad()
    return _ElementaryNorms()


@contextmanager
def second_order_safe() -> Iterator[None]:
    """Context in which torch.func second derivatives of common layers are correct."""
    with ExitStack() as stack:
        stack.enter_context(math_attention())
        stack.enter_context(elementary_norms())
        yield

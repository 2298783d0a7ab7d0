"""Memory planning: estimate what a dense call needs, pick a chunk, refuse before allocating."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Alternative",
    "ChunkPlan",
    "MemoryBudgetError",
    "activation_bytes",
    "available_bytes",
    "check_dense_fits",
    "plan_chunk",
]

# Vectorised lanes (columns x outputs per column) per pass when memory allows, and the most
# columns. Measured on 2 CPU threads: a loss Hessian (MLP, N=7,770, batch 256) took 3.7 s at 64,
# 4.0 s at 128, 3.7 s at 256, 4.8 s at 512 and 6.3 s at 1,024 columns, with peak memory growth
# 0.96x, 1.16x, 1.58x, 2.1x, 3.2x the result; per-sample Hessians with 64 and 256 lanes per
# column were fastest at 128 and 32 columns.
TARGET_LANES = 8192
TARGET_COLUMNS = 128
# Fraction of the available memory a call may plan to use; the rest is for the user's process.
MEMORY_FRACTION = 0.8
# Second backward passes hold about this many copies of the forward's saved activations.
ACTIVATION_FACTOR = 4


# Another call to suggest when one does not fit, and the bytes of its result (None: it varies).
Alternative = tuple[str, int | None]


class MemoryBudgetError(MemoryError):
    """A dense computation would need more memory than the device has; raised before allocating.

    The message gives the estimate (result and working set) against the free memory, and the
    cheaper calls that would fit: the exact diagonal, ``diagonal_only=True`` in dict form,
    fewer ``params``, a smaller ``chunk_size`` or a matrix-free operator. A subclass of
    ``MemoryError``.
    """


@dataclass(frozen=True)
class ChunkPlan:
    """How a dense computation will run and what it is estimated to need, in bytes."""

    chunk: int
    output_bytes: int
    working_bytes: int
    available: int | None


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def activation_bytes(
    f: Callable[[Tensor], object], theta: Tensor, data: Sequence[object] = ()
) -> int:
    """Bytes autograd saves for one evaluation of ``f`` at ``theta`` (its activations).

    A saved tensor keeps its whole storage alive, and counts it, with one exception: a view
    of a tensor in ``data`` (the batch ``f`` reads; it exists anyway) counts only the span
    it reaches, so a sample ``x[0]`` of a batch, or a slice of a large dataset, holds its own
    bytes, not the batch's. Storages count once (the span of all their views in ``data``).
    """
    given = {x.untyped_storage().data_ptr() for x in data if isinstance(x, Tensor)}
    spans: dict[int, tuple[int, int]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in given:
            spans[ptr] = (0, storage.nbytes())
        elif t.numel():
            size = t.element_size()
            start = int(t.storage_offset()) * size
            reach = sum((int(n) - 1) * abs(int(s)) for n, s in zip(t.shape, t.stride()))
            end = start + (reach + 1) * size
            lo, hi = spans.get(ptr, (start, end))
            spans[ptr] = (min(lo, start), max(hi, end))
        return t

    t = theta.detach().requires_grad_()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        f(t)
    return sum(hi - lo for lo, hi in spans.values())


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # unreachable


def plan_chunk(
    *,
    what: str,
    n: int,
    lead: tuple[int, ...],
    output_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    chunk_size: int | None,
    activations: Callable[[], int],
    alternatives: Sequence[Alternative],
) -> ChunkPlan:
    """Choose the number of identity columns per pass and check that the call fits in memory.

    Args:
        what: The public function, for messages.
        n: Number of parameters ``N``.
        lead: Leading shape of each column's result (``(B, *O)``, ``(*O)`` or ``()``).
        output_shape: Shape of the final result.
        dtype: The dtype of the result.
        device: Where the result lives.
        chunk_size: The user's choice, or None for automatic.
        activations: Measures the saved-activation bytes of one evaluation; called only when
            the output itself fits, so a hopeless call fails within milliseconds.
        alternatives: Other calls to suggest, each with the bytes of its result (None when
            that depends on the choice); only those that would fit are named.

    Raises:
        MemoryBudgetError: The estimate exceeds the available memory.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    out_bytes = math.prod(output_shape) * itemsize
    available = available_bytes(device)
    budget = None if available is None else int(available * MEMORY_FRACTION)

    def fail(needed: int, detail: str, working_set: bool) -> MemoryBudgetError:
        extra = ["a smaller chunk_size for a smaller working set"] if working_set else []
        return _refusal(
            what,
            needed,
            detail,
            (budget, available),
            device,
            output_shape,
            dtype,
            alternatives,
            extra,
        )

    if budget is not None and out_bytes > budget:
        raise fail(out_bytes, "the result alone", working_set=False)

    lanes = math.prod(lead)
    act = activations()
    base = ACTIVATION_FACTOR * act
    per_column = itemsize * n * (1 + 2 * lanes) + ACTIVATION_FACTOR * act
    if chunk_size is None:
        chunk = min(n, TARGET_COLUMNS, max(8, TARGET_LANES // max(lanes, 1)))
        if budget is not None:
            fits = (budget - out_bytes - base) // max(per_column, 1)
            chunk = max(1, min(chunk, fits))
    else:
        chunk = min(n, chunk_size)
    working = base + chunk * per_column
    if budget is not None and out_bytes + working > budget:
        raise fail(
            out_bytes + working,
            f"result {format_bytes(out_bytes)} + working set {format_bytes(working)} "
            f"for chunk_size={chunk}",
            working_set=True,
        )
    return ChunkPlan(chunk, out_bytes, working, available)


def _refusal(
    what: str,
    needed: int,
    detail: str,
    memory: tuple[int | None, int | None],
    device: torch.device,
    output_shape: tuple[int, ...],
    dtype: torch.dtype,
    alternatives: Sequence[Alternative],
    extra: Sequence[str] = (),
) -> MemoryBudgetError:
    """The error: what was needed and why, what can be used, and the alternatives that fit."""
    budget, available = memory
    out_bytes = math.prod(output_shape) * torch.empty((), dtype=dtype).element_size()
    fitting = [
        text if size is None else f"{text} ({format_bytes(size)})"
        for text, size in alternatives
        if size is None or (budget is not None and size <= budget // 2)
    ]
    return MemoryBudgetError(
        f"{what}: needs about {format_bytes(needed)} ({detail}) but about "
        f"{format_bytes(budget or 0)} can be used on {device} "
        f"({format_bytes(available or 0)} available). The result alone is "
        f"{' x '.join(map(str, output_shape))} {dtype} = {format_bytes(out_bytes)}. "
        f"Alternatives: {'; '.join([*fitting, *extra])}."
    )


def check_dense_fits(
    what: str,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
    alternatives: Sequence[Alternative] = (),
    *,
    copies: int = 1,
) -> None:
    """Refuse an operator's ``(N, N)`` matrix before allocating it when it would not fit.

    ``copies``: the ``N x N`` matrices the method holds at once (the result, an identity it
    multiplies, a sum's terms).

    Raises:
        MemoryBudgetError: ``copies`` such matrices exceed the available memory.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    available = available_bytes(device)
    if available is None:
        return
    budget = int(available * MEMORY_FRACTION)
    needed = copies * n * n * itemsize
    if needed <= budget:
        return
    detail = "the result alone" if copies == 1 else f"{copies} N x N matrices at once"
    options = [
        ("products op @ V with fewer columns", None),
        ("op.diagonal()", n * itemsize),
        *alternatives,
    ]
    raise _refusal(what, needed, detail, (budget, available), device, (n, n), dtype, options)

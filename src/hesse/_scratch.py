"""Temporaries reused from product to product on the CPU (`Scratch`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["CPU_CHUNK_BYTES", "Scratch", "chunk_size"]

# The most one `Scratch` keeps.
_SCRATCH_BYTES = 1 << 26
# On the CPU, chunks whose widest temporary fits in 8 MiB, and a `Scratch` hands the same
# buffers to every chunk. Chunks bound the memory; with the buffers reused, larger ones run
# the layers' matrix products on more rows (the chain's Hessian blocks, medians of 8
# alternating rounds against 2 MiB: MLP 64-96-96-10, batch 512, K = 32, float32 29.6 against
# 32.2 ms; MLP 64-256-256-64-10, batch 250, K = 20, float64 105 against 120 ms).
CPU_CHUNK_BYTES = 1 << 23


def chunk_size(
    total: int,
    per_item: int,
    like: Tensor,
    most: int | None = None,
    cpu_bytes: int | None = None,
) -> int:
    """Items per chunk: ``total`` items in equal chunks (the same buffers serve each).

    ``per_item`` numbers of the widest temporary belong to each item; a chunk holds at most
    ``most`` of them (no limit for None) and, on the CPU, ``cpu_bytes`` (default
    `CPU_CHUNK_BYTES`).
    """
    budget = total * per_item if most is None else most
    if like.device.type == "cpu":
        cap = CPU_CHUNK_BYTES if cpu_bytes is None else cpu_bytes
        budget = min(budget, cap // like.element_size())
    chunks = max(1, -(-total // max(1, budget // max(per_item, 1))))
    return max(1, -(-total // chunks))


class Scratch:
    """Buffers by role, reused from chunk to chunk and product to product on the CPU.

    glibc hands freed blocks of a few MiB back to the system, so each fresh temporary pays page
    faults on first touch: about a third of a K = 32 Hessian product of the benchmarks' MLP
    (54 against 36 ms with buffers reused; 42 ms with the allocator told to keep its memory).
    One flat buffer per role and dtype, grown to the largest shape asked for: a smaller shape
    (a narrower block, a shorter last chunk) is a view of it. Kept as long as its owner (the
    products of one call, or of a session); at most 64 MiB, beyond which a role gets a new
    tensor each time while the others stay reused. On other devices (a GPU's caching allocator
    reuses memory itself) it hands out nothing.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cpu"
        self.buffers: dict[tuple[Any, ...], Tensor] = {}
        self.bytes = 0

    def __call__(self, key: tuple[Any, ...], shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        """A buffer of ``shape`` for the role ``key`` (contents undefined), or None: allocate anew.

        The caller must be done with the buffer of a key before asking for it again.
        """
        if not self.enabled:
            return None
        full = (*key, like.dtype)
        numel = math.prod(shape)
        buffer = self.buffers.get(full)
        if buffer is None or buffer.numel() < numel:
            held = 0 if buffer is None else buffer.numel() * buffer.element_size()
            size = numel * like.element_size()
            if self.bytes - held + size > _SCRATCH_BYTES:
                return None  # over the cap: this role allocates anew, the others stay kept
            buffer = self.buffers[full] = like.new_empty(numel)
            self.bytes += size - held
        return buffer[:numel].view(shape)

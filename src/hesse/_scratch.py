"""Temporaries reused from product to product on the CPU (`Scratch`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["Scratch"]

# The most one `Scratch` keeps.
_SCRATCH_BYTES = 1 << 26


class Scratch:
    """Buffers by role and shape, reused from chunk to chunk and product to product on the CPU.

    glibc hands freed blocks of a few MiB back to the system, so each fresh temporary pays page
    faults on first touch: about a third of a K = 32 Hessian product of the benchmarks' MLP
    (54 against 36 ms with buffers reused; 42 ms with the allocator told to keep its memory).
    Kept as long as its owner (the products of one call, or of a session); at most 64 MiB.
    On other devices (a GPU's caching allocator reuses memory itself) it hands out nothing.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cpu"
        self.buffers: dict[tuple[Any, ...], Tensor] = {}
        self.bytes = 0

    def __call__(self, key: tuple[Any, ...], shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        """The buffer of ``key`` and ``shape`` (contents undefined), or None: allocate anew.

        The caller must be done with the buffer of a key before asking for it again.
        """
        if not self.enabled:
            return None
        full = (*key, shape, like.dtype)
        buffer = self.buffers.get(full)
        if buffer is None:
            size = math.prod(shape) * like.element_size()
            if size > _SCRATCH_BYTES:
                return None
            if self.bytes + size > _SCRATCH_BYTES:  # widths that changed (retired columns)
                self.buffers.clear()
                self.bytes = 0
            buffer = self.buffers[full] = like.new_empty(shape)
            self.bytes += size
        return buffer

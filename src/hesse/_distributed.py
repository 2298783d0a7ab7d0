"""Data parallelism over ``torch.distributed``: each rank holds a shard of one dataset.

An operator built while a process group is initialised sums its per-rank products with one
all-reduce of ``N x K`` numbers per product; sample counts are all-reduced once, at
construction, so ``reduction="mean"`` weights are exact for unequal shards. Nothing else is
communicated: every rank runs the same algorithm on identical all-reduced numbers and reaches
the same result.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from hesse._layout import ParamLayout

__all__ = ["Shard", "agree_on_parameters", "global_seed", "resolve_shard"]


@dataclass(frozen=True)
class Shard:
    """Where an operator's data lives: this process alone, or one rank of a group."""

    group: Any = None  # a ProcessGroup when distributed
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # collectives

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; a no-op for a local operator."""
        if self.distributed:
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of integers (the same length on every rank)."""
        if not self.distributed:
            return [values]
        local = torch.tensor(values, dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return [p.tolist() for p in parts]

    def common_seed(self) -> int:
        """A seed from rank 0's global torch generator, the same on every rank."""
        seed = torch.tensor([global_seed()], dtype=torch.int64, device=self.device)
        if self.distributed:
            dist.broadcast(seed, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(seed.item())


def global_seed() -> int:
    """A seed drawn from torch's global generator (advanced, never reseeded)."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


def resolve_shard(process_group: Any, distributed: bool | None, device: torch.device) -> Shard:
    """The shard of an operator built with these arguments.

    ``distributed=None`` (default): data-parallel when ``torch.distributed`` is initialised,
    over ``process_group`` (default: the global group). ``False``: this process's data only.
    ``True``: require an initialised group.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True, False or None, got {distributed!r}.")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is False or (distributed is None and not initialised):
        if process_group is not None and distributed is None:
            raise ValueError(
                "process_group: given, but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun sets it up)."
            )
        return Shard()
    if not initialised:
        raise ValueError(
            "distributed: True needs torch.distributed to be initialised; launch with "
            "torchrun and call torch.distributed.init_process_group()."
        )
    group = process_group if process_group is not None else dist.group.WORLD
    backend = dist.get_backend(group)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"process_group: the NCCL backend needs CUDA tensors but the parameters are on "
            f"{device}; use a gloo group (dist.new_group(backend='gloo')) for CPU models, or "
            "move the model to this rank's GPU."
        )
    comm_device = device if backend == "nccl" else torch.device("cpu")
    return Shard(
        group=group,
        distributed=True,
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        device=comm_device,
    )


def agree_on_parameters(
    shard: Shard, layout: ParamLayout, samples: int, options: str = ""
) -> list[int]:
    """Every rank's ``samples``, once all selected the same parameters: else the same error.

    The ranks compare their count ``N``, and a checksum of the parameters' names, shapes and
    dtype and of ``options`` (settings that change the layout of what is all-reduced): the
    same ``N`` from other parameters would sum unrelated numbers; another size would stop a
    collective midway. One all-gather of four integers.
    """
    described = ";".join(f"{n}:{tuple(s)}" for n, s in zip(layout.names, layout.shapes))
    code = zlib.crc32(f"{described}|{layout.dtype}|{options}".encode())
    dtype = _DTYPES.index(layout.dtype) if layout.dtype in _DTYPES else -1
    ranks = shard.gather([samples, layout.numel, code, dtype])
    if len({(n, c) for _, n, c, _ in ranks}) > 1:
        found = ", ".join(
            f"rank {r}: N = {n}, {_DTYPES[d] if d >= 0 else 'another dtype'}"
            for r, (_, n, _, d) in enumerate(ranks)
        )
        same = len({(n, d) for _, n, _, d in ranks}) == 1
        detail = f"{found}, but other parameter names or shapes" if same else found
        raise ValueError(
            f"model: the ranks disagree on the selected parameters ({detail}); every rank must "
            "build the same model with the same params=, dtype and options."
        )
    return [count for count, _, _, _ in ranks]


# The parameters' dtypes a message can name (the all-gather sends integers).
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

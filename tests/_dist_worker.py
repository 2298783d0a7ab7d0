"""Worker for tests/test_distributed.py: one rank of a 2-process gloo group on loopback.

Each rank holds an unequal shard of one dataset, runs the public API and saves what it got;
the test compares with one process over the union. The worker leaves with os._exit(0) after
saving: gloo children that ran torch.func code can abort at interpreter exit (DESIGN §4).
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import hesse

F64 = torch.float64


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3)).to(F64)  # N = 339
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    x = torch.randn(16, 10, generator=g, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=g)
    return model, x, y


def vectors(n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=F64)


def shard(rank: int, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Unequal shards: rank 0 holds 12 samples in two batches (7 + 5), rank 1 holds 4.
    if rank == 0:
        return [(x[:7], y[:7]), (x[7:12], y[7:12])]
    return [(x[12:], y[12:])]


def run(rank: int) -> dict[str, Any]:
    # Each rank's global generator differs (seed=None below must take rank 0's draw on both
    # ranks) and is fixed: the random estimates, checked against k standard errors, are the
    # same on every run instead of failing once in a few hundred.
    torch.manual_seed(1000 + rank)
    model, x, y = problem()
    ce = nn.CrossEntropyLoss()
    data = shard(rank, x, y)
    out: dict[str, Any] = {}
    h = hesse.HessianOperator(model, ce, data)
    v = vectors(h.shape[0])
    out["num_samples"] = h.num_samples
    out["matmat"] = h @ v
    out["matvec"] = h @ v[:, 0]
    out["dense"] = h.to_dense()
    out["diagonal"] = h.diagonal()
    out["eigsh"] = hesse.eigsh(h, k=2, which="LA").eigenvalues  # seed=None: rank 0's seed
    t = hesse.trace(h, 30, method="hutch++")
    out["trace"] = (t.estimate, t.stderr)
    # The block path is chosen by timing once both blocks above ran: the ranks, whose shards
    # differ, must agree on it (their collectives must match), and products stay right.
    out["block_path"] = h._block_path
    out["matmat_after"] = h @ v
    ggn = hesse.GGNOperator(model, ce, data)
    out["ggn"] = ggn @ v
    out["ggn_diagonal"] = ggn.diagonal()  # the layer route, summed over the ranks
    out["solve"] = hesse.solve(ggn, v, damping=0.1).solution
    out["kfac"] = hesse.KFACOperator(model, ce, data).to_dense()  # factors all-reduced
    out["ekfac"] = hesse.EKFACOperator(model, ce, data).to_dense()
    out["fisher"] = hesse.EmpiricalFisherOperator(model, ce, data) @ v
    out["local"] = hesse.HessianOperator(model, ce, data, distributed=False).num_samples
    for name, build in (
        ("empty", lambda: hesse.HessianOperator(model, ce, data if rank == 0 else [])),
        (
            "mismatch",
            lambda: hesse.HessianOperator(model, ce, data, params=None if rank == 0 else "2.*"),
        ),
        (  # the same N under other names (one rank's model wrapped, as DDP's "module."):
            "same_n",  # the parameters may differ too, and their sums would mean nothing
            lambda: hesse.HessianOperator(model if rank == 0 else nn.Sequential(model), ce, data),
        ),
        (  # the factors' all-reduces would stop midway (gloo aborted the process)
            "kfac_mismatch",
            lambda: hesse.KFACOperator(model, ce, data, params=None if rank == 0 else "2.*"),
        ),
    ):
        try:
            build()
            out[name] = "no error"
        except ValueError as err:
            out[name] = str(err)
    return out


def main(rank: int, world_size: int, store: str, results: str) -> None:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        torch.save(run(rank), os.path.join(results, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(results, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
    finally:
        os._exit(0)

"""Data-parallel operators: 1 and 2 processes (gloo) on one 2-core machine.

    python benchmarks/bench_distributed.py   # rewrites its table in docs/benchmarks.md

Model: MLP 512-1024-512-10 (N = 1,055,242), float32, cross-entropy, 2,048 samples in batches of
256 (8 batches; each rank reads its share). With 2 processes each rank uses 1 thread, so the
machine's 2 cores are used either way: the point is exactness and overhead, not speed-up.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import write_docs
from bench_dense import mlp

import hesse

SAMPLES, BATCH = 2048, 256


def worker(rank: int, world: int, store: str, out: str) -> None:
    try:
        torch.set_num_threads(max(1, 2 // world))
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        torch.manual_seed(0)
        model = mlp([512, 1024, 512, 10])
        x = torch.randn(SAMPLES, 512)
        y = torch.randint(0, 10, (SAMPLES,))
        batches = list(zip(x.split(BATCH), y.split(BATCH)))[rank::world]
        op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), batches)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
        op @ v
        products = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            op @ v
            products.append(time.perf_counter() - start)
        reduce_times = []
        buffer = torch.randn(op.shape[0])
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            reduce_times.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        top = hesse.eigsh(op, k=1, seed=0)
        eig_seconds = time.perf_counter() - start
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {
                        "product": statistics.median(products),
                        "all_reduce": statistics.median(reduce_times) if world > 1 else 0.0,
                        "eigsh": eig_seconds,
                        "eigsh_products": top.num_matvecs,
                        "top": float(top.eigenvalues[0]),
                        "n": op.shape[0],
                    }
                )
            )
    finally:
        os._exit(0)


def main() -> None:
    results = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(worker, args=(world, os.path.join(tmp, "store"), out), nprocs=world)
            results[world] = json.loads(Path(out).read_text())
            print(world, results[world], flush=True)
    one, two = results[1], results[2]
    lines = [
        "Command: `python benchmarks/bench_distributed.py`  ",
        f"MLP 512-1024-512-10, N = {one['n']:,}, float32, cross-entropy, {SAMPLES} samples in "
        f"batches of {BATCH}; gloo on one 2-core machine (2 threads for 1 process, 1 per rank "
        "for 2).",
        "",
        "| processes | one product | all-reduce of N floats | top eigenvalue (eigsh) | products "
        "| top eigenvalue |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for world, r in results.items():
        share = f" ({r['all_reduce'] / r['product']:.0%} of a product)" if world > 1 else ""
        lines.append(
            f"| {world} | {r['product'] * 1e3:.0f} ms | {r['all_reduce'] * 1e3:.1f} ms{share} | "
            f"{r['eigsh']:.1f} s | {r['eigsh_products']} | {r['top']:.7g} |"
        )
    lines += [
        "",
        f"Speed-up of one product with 2 processes: {one['product'] / two['product']:.2f}× "
        "(the same 2 cores either way).",
    ]
    table = "\n".join(lines)
    print(table)
    write_docs("distributed", table)


if __name__ == "__main__":
    main()

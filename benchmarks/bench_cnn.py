"""A ResNet-style CNN (BatchNorm in eval mode): products one at a time and in blocks of 16,
hesse side by side with curvlinops, round-robin in one process; prints a Markdown table.

    python benchmarks/bench_cnn.py            # the table in docs/benchmarks.md ("CNN")

Two residual blocks, 16 channels, batch 128 of 3x16x16 (N = 10,058), cross-entropy, float32.
On this model vectorising the second backward over columns is slower than single products on
the CPU, so hesse's operators time their first block products against single ones and keep the
faster path (the "hesse, 16 single products in one session" row is that path by hand).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import hesse

ROUNDS = 5
K = 16


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def main() -> None:
    warnings.simplefilter("ignore", DeprecationWarning)  # curvlinops' first jvp, torch 2.13
    import curvlinops

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16),
        Block(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    x, y = torch.randn(128, 3, 16, 16), torch.randint(0, 10, (128,))
    crit = nn.CrossEntropyLoss()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    v = torch.randn(n, K, generator=torch.Generator().manual_seed(1))
    single = v[:, 0].contiguous()
    ours = {
        "Hessian": hesse.HessianOperator(model, crit, (x, y)),
        "GGN": hesse.GGNOperator(model, crit, (x, y)),
    }
    peers = {
        "Hessian": curvlinops.HessianLinearOperator(
            model, crit, params, [(x, y)], check_deterministic=False
        ),
        "GGN": curvlinops.GGNLinearOperator(
            model, crit, params, [(x, y)], check_deterministic=False
        ),
    }

    def singles(op: Any) -> Callable[[], Any]:
        def run() -> Any:
            with op.session():
                return [op @ v[:, i].contiguous() for i in range(K)]

        return run

    runs: dict[str, Callable[[], Any]] = {}
    for kind in ("Hessian", "GGN"):
        op, peer = ours[kind], peers[kind]
        runs[f"{kind}|one product|hesse"] = lambda op=op: op @ single
        runs[f"{kind}|one product|curvlinops"] = lambda peer=peer: peer @ single
        runs[f"{kind}|K = {K}|hesse `op @ V`"] = lambda op=op: op @ v
        runs[f"{kind}|K = {K}|hesse, {K} single products in one session"] = singles(op)
        runs[f"{kind}|K = {K}|curvlinops"] = lambda peer=peer: peer @ v
    for run in runs.values():  # warm up; hesse's operators also choose their block path here
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"Command: `python benchmarks/{sys.argv[0].split('/')[-1]}`  ")
    print(f"N = {n:,}, batch 128, 2 threads, float32, medians of {ROUNDS} round-robin rounds.")
    print(
        f"hesse's block path after its measurement: Hessian {ours['Hessian']._block_path}, "
        f"GGN {ours['GGN']._block_path}.\n"
    )
    print("| curvature | product | method | time |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        kind, what, method = name.split("|")
        print(f"| {kind} | {what} | {method} | {statistics.median(values) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()

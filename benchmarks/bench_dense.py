"""Dense Hessians: hesse side by side with what users write instead, in one run.

Each measurement runs in its own subprocess (2 torch threads) so that its peak memory is its own:
peak-RSS growth = peak RSS after the call minus peak RSS before it. Times are medians.

    python benchmarks/bench_dense.py            # full run, rewrites the table in docs/benchmarks.md
    python benchmarks/bench_dense.py --quick    # small sizes, prints only

Peers: torch.func.hessian on a flat vector; torch.func.hessian on the parameter dict plus
assembly into one matrix (the seed README's "existing paradigm"); curvlinops' HessianLinearOperator
applied to identity chunks; the seed package's per-sample approach (Hessian of the batched output,
quadratic in the batch), reimplemented from its README.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    THREADS,
    child_main,
    measure_memory,
    measure_times,
    mib,
    seconds,
    write_docs,
)
from _harness import ratio as _ratio

WARM = ("quick/hesse", "quick/func_flat", "quick/func_dict", "quick/curvlinops")


# ---------------------------------------------------------------------------------- problems


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def loss_problem(widths: list[int], batch: int) -> tuple[nn.Module, Tensor, Tensor, nn.Module]:
    torch.manual_seed(0)
    model = mlp(widths)
    x = torch.randn(batch, widths[0])
    y = torch.randn(batch, widths[-1])
    return model, x, y, nn.MSELoss()


def _flat_loss(model: nn.Module, x: Tensor, y: Tensor, crit: nn.Module) -> tuple[Callable, Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: Tensor) -> Tensor:
        ps = {n: v.view(s) for n, v, s in zip(names, t.split(sizes), shapes)}
        return crit(functional_call(model, ps, (x,)), y)

    return f, theta


def assemble(blocks: dict[str, dict[str, Tensor]], lead: int = 0) -> Tensor:
    """Nested dict of blocks -> one matrix, as a user of torch.func.hessian writes it."""
    rows = []
    for p, row in blocks.items():
        cols = []
        for block in row.values():
            shape = block.shape
            lead_shape = shape[:lead]
            np_ = blocks[p][p].shape[lead:]
            n_p = int(torch.tensor(np_[: len(np_) // 2]).prod()) if len(np_) else 1
            cols.append(block.reshape(*lead_shape, n_p, -1))
        rows.append(torch.cat(cols, dim=-1))
    return torch.cat(rows, dim=-2)


# ----------------------------------------------------------------------------------- methods


def m_hesse(problem: Any, chunk: int | None = None) -> Callable[[], Tensor]:
    import hesse

    model, x, y, crit = problem
    return lambda: hesse.loss_hessian_matrix(model, crit, x, y, chunk_size=chunk)


def m_func_flat(problem: Any) -> Callable[[], Tensor]:
    f, theta = _flat_loss(*problem)
    return lambda: hessian(f)(theta)


def m_func_dict(problem: Any) -> Callable[[], Tensor]:
    model, x, y, crit = problem
    params = {n: p.detach() for n, p in model.named_parameters()}

    def run() -> Tensor:
        blocks = hessian(lambda ps: crit(functional_call(model, ps, (x,)), y))(params)
        return assemble(blocks)

    return run


def m_curvlinops(problem: Any, chunk: int = 256) -> Callable[[], Tensor]:
    from curvlinops import HessianLinearOperator

    model, x, y, crit = problem
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, crit, params, [(x, y)], check_deterministic=False)
    n = sum(p.numel() for p in params)

    def run() -> Tensor:
        out = torch.empty(n, n)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            eye = torch.zeros(n, stop - start)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = op @ eye
        return out

    return run


def per_sample_problem(batch: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return mlp([8, 16, 16, 4]), torch.randn(batch, 8)


def m_hesse_per_sample(problem: Any) -> Callable[[], Tensor]:
    import hesse

    model, x = problem
    return lambda: hesse.model_hessian_matrix(model, x)


def m_seed_per_sample(problem: Any) -> Callable[[], Tensor]:
    """The seed's approach: the Hessian of the *batched* output, then per-sample entries.

    Output (B, O) depends on all B samples through one batched forward, so the transform
    differentiates B·O outputs, each through a forward of size B: quadratic in B.
    """
    model, x = problem
    params = {n: p.detach() for n, p in model.named_parameters()}

    def run() -> Tensor:
        blocks = hessian(lambda ps: functional_call(model, ps, (x,)))(params)
        full = assemble(blocks, lead=2)  # (B, O, N, N)
        return full

    return run


def m_func_vmap_per_sample(problem: Any) -> Callable[[], Tensor]:
    """By hand with torch.func done well: vmap over samples of hessian on a flat vector."""
    model, x = problem
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t: Tensor, xb: Tensor) -> Tensor:
        ps = {n: v.view(s) for n, v, s in zip(names, t.split(sizes), shapes)}
        return functional_call(model, ps, (xb[None],))[0]

    return lambda: torch.func.vmap(hessian(f), in_dims=(None, 0))(theta, x)


# ------------------------------------------------------------------------- measurement (child)

SPECS: dict[str, Callable[[], Callable[[], Tensor]]] = {}


def _register() -> None:
    big = [64, 64, 48, 10]  # N = 7,770
    SPECS.update(
        {
            "loss7770/hesse": lambda: m_hesse(loss_problem(big, 256)),
            "loss7770/func_flat": lambda: m_func_flat(loss_problem(big, 256)),
            "loss7770/func_dict": lambda: m_func_dict(loss_problem(big, 256)),
            "loss7770/curvlinops": lambda: m_curvlinops(loss_problem(big, 256)),
            "loss20k/hesse": lambda: m_hesse(loss_problem([64, 128, 96, 10], 256)),
            "loss20k/func_flat": lambda: m_func_flat(loss_problem([64, 128, 96, 10], 256)),
            "quick/hesse": lambda: m_hesse(loss_problem([16, 32, 10], 64)),
            "quick/func_flat": lambda: m_func_flat(loss_problem([16, 32, 10], 64)),
            "quick/func_dict": lambda: m_func_dict(loss_problem([16, 32, 10], 64)),
            "quick/curvlinops": lambda: m_curvlinops(loss_problem([16, 32, 10], 64)),
        }
    )
    for c in (64, 128, 256, 512, 1024):
        SPECS[f"chunk{c}/hesse"] = lambda c=c: m_hesse(loss_problem(big, 256), chunk=c)
    for b in (16, 64):
        SPECS[f"sample{b}/hesse"] = lambda b=b: m_hesse_per_sample(per_sample_problem(b))
        SPECS[f"sample{b}/seed"] = lambda b=b: m_seed_per_sample(per_sample_problem(b))
        SPECS[f"sample{b}/func_vmap"] = lambda b=b: m_func_vmap_per_sample(per_sample_problem(b))


# ----------------------------------------------------------------------------------- report


def report(results: dict[str, dict[str, Any]], command: str, rounds: int) -> str:
    def t(spec: str) -> str:
        return seconds(results, spec)

    def ratio(spec: str, ref: str = "loss7770/hesse") -> str:
        return _ratio(results, spec, ref)

    def mem(spec: str) -> str:
        r = results.get(spec, {})
        if "peak_growth" not in r:
            return "failed: " + r["error"][:60] if "error" in r else "–"
        return f"{mib(r['peak_growth'])} ({r['peak_growth'] / r['output_bytes']:.2f}× output)"

    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{THREADS} threads, float32. Times: medians of {rounds} round-robin rounds in one process "
        "(each round runs every method of a table once). Memory: one call per method, each in "
        "its own process.",
        "",
        "### Dense loss Hessian, MLP 64-64-48-10 (Tanh), batch 256, MSE, N = 7,770",
        "",
        "| method | time | slower than hesse (range over rounds) | peak memory growth |",
        "| --- | --- | --- | --- |",
    ]
    names = {
        "loss7770/hesse": "hesse.loss_hessian_matrix (auto chunk)",
        "loss7770/func_flat": "torch.func.hessian on a flat vector",
        "loss7770/func_dict": "torch.func.hessian on the dict + assembly (seed README paradigm)",
        "loss7770/curvlinops": "curvlinops HessianLinearOperator @ I, 256-column chunks",
    }
    for spec, name in names.items():
        lines.append(f"| {name} | {t(spec)} | {ratio(spec)} | {mem(spec)} |")
    lines += [
        "",
        "The output matrix is 7,770² float32 = 230 MiB. For the loss Hessian the seed package's",
        "own approach is the dict + assembly row (its README wraps `torch.func.hessian` and",
        "assembles the blocks).",
        "",
        "### Chunk size (hesse, same problem)",
        "",
        "| chunk_size | time | relative to 128 (the automatic choice here) |",
        "| --- | --- | --- |",
    ]
    for c in (64, 128, 256, 512, 1024):
        spec = f"chunk{c}/hesse"
        if spec in results:
            lines.append(f"| {c} | {t(spec)} | {ratio(spec, 'chunk128/hesse')} |")
    lines += [
        "",
        "### About 20,000 parameters: MLP 64-128-96-10, batch 256, N = 21,674 (output 1.75 GiB)",
        "",
        "| method | time | peak memory growth |",
        "| --- | --- | --- |",
        f"| hesse.loss_hessian_matrix | {t('loss20k/hesse')} | {mem('loss20k/hesse')} |",
        f"| torch.func.hessian on a flat vector (address space capped at 20 GiB) | "
        f"{t('loss20k/func_flat')} | {mem('loss20k/func_flat')} |",
        "",
        "### Per-sample model Hessians, MLP 8-16-16-4, output (B, 4, 484, 484)",
        "",
        "| method | B = 16 | B = 64 | growth 16 → 64 |",
        "| --- | --- | --- | --- |",
    ]
    for key, name in (
        ("hesse", "hesse.model_hessian_matrix"),
        ("func_vmap", "torch.func by hand: vmap over samples of hessian"),
        ("seed", "seed approach: Hessian of the batched output"),
    ):
        a, b = results.get(f"sample16/{key}", {}), results.get(f"sample64/{key}", {})
        growth = (
            f"{b['median_s'] / a['median_s']:.1f}×" if "median_s" in a and "median_s" in b else "–"
        )
        lines.append(f"| {name} | {t(f'sample16/{key}')} | {t(f'sample64/{key}')} | {growth} |")
    lines += ["", "Linear cost in B means 4× from 16 to 64; quadratic means 16×."]
    return "\n".join(lines)


GROUPS = {
    "loss7770": [
        "loss7770/hesse",
        "loss7770/func_flat",
        "loss7770/func_dict",
        "loss7770/curvlinops",
    ],
    "chunk": [f"chunk{c}/hesse" for c in (64, 128, 256, 512, 1024)],
    "sample16": [f"sample16/{m}" for m in ("hesse", "func_vmap", "seed")],
    "sample64": [f"sample64/{m}" for m in ("hesse", "func_vmap", "seed")],
    "quick": [f"quick/{m}" for m in ("hesse", "func_flat", "func_dict", "curvlinops")],
}


def main() -> None:
    _register()
    if child_main(SPECS, WARM):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds")
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    args = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    groups = ["quick"] if args.quick else ["loss7770", "chunk", "sample16", "sample64"]
    for group in groups:
        print(f"{group}:", flush=True)
        results.update(measure_times(__file__, GROUPS[group], args.rounds))
        for spec in GROUPS[group]:
            if group != "chunk" or spec == "chunk128/hesse":
                results[spec].update(measure_memory(__file__, spec))
    if not args.quick:
        print("loss20k:", flush=True)
        for spec, limit in (("loss20k/hesse", None), ("loss20k/func_flat", 20.0)):
            r = measure_memory(__file__, spec, limit)
            results[spec] = {**r, "median_s": r["seconds"]} if "seconds" in r else r
    command = "python benchmarks/bench_dense.py" + (" --quick" if args.quick else "")
    table = report(results, command, args.rounds)
    print("\n" + table)
    if not args.quick:
        write_docs("dense", table)


if __name__ == "__main__":
    main()

"""Matrix-free operators: hesse side by side with curvlinops and hessian-eigenthings.

    python benchmarks/bench_operators.py          # full run, rewrites its docs/benchmarks.md table
    python benchmarks/bench_operators.py --quick  # small sizes, prints only

Problem: a cross-entropy MLP 64-96-96-10 (Tanh) on one batch of 512 samples given as a list,
float32. Products
with K = 32 columns are compared with 32 single products; one Hessian-vector product with the
peers'; ``to_dense()`` with hesse's exact dense path; and the peak memory of one product on a
~1M-parameter MLP over a 2-batch DataLoader.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (
    DEVICE,
    THREADS,
    child_main,
    measure_memory,
    measure_times,
    mib,
    ratio,
    seconds,
    synced,
    write_docs,
)
from bench_dense import mlp

import hesse

K = 32


def problem(
    widths: list[int], batch: int, batches: int = 1, loader: bool = False
) -> tuple[nn.Module, nn.Module, Any]:
    """A model, a loss and data: a list of batches, or a DataLoader (whose per-sample indexing
    and collation would otherwise dominate the timing of one product at this size)."""
    torch.manual_seed(0)
    model = mlp(widths).to(DEVICE)
    x = torch.randn(batch * batches, widths[0]).to(DEVICE)
    y = torch.randint(0, widths[-1], (batch * batches,)).to(DEVICE)
    if loader:
        return model, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=batch)
    return model, nn.CrossEntropyLoss(), list(zip(x.split(batch), y.split(batch)))


def _vectors(model: nn.Module, k: int) -> Tensor:
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(n, k, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def hesse_matmat(
    widths: list[int], batch: int, k: int, batches: int = 1, loader: bool = False
) -> Callable[[], Any]:
    model, crit, data = problem(widths, batch, batches, loader)
    op = hesse.HessianOperator(model, crit, data)
    v = _vectors(model, k)
    return synced((lambda: op @ v) if k > 1 else (lambda: op @ v[:, 0]))


REPEATS = 8


def hesse_repeated(widths: list[int], batch: int) -> Callable[[], Any]:
    """One vector's product repeated in one session, as within one `eigsh` call: the first
    product builds the gradient graph, the others reuse it."""
    model, crit, data = problem(widths, batch)
    op = hesse.HessianOperator(model, crit, data)
    v = _vectors(model, 1)[:, 0]

    def repeated() -> list[Tensor]:
        with op.session():
            return [op @ v for _ in range(REPEATS)]

    return synced(repeated)


def hesse_singles(widths: list[int], batch: int, k: int, batches: int = 1) -> Callable[[], Any]:
    model, crit, data = problem(widths, batch, batches)
    op = hesse.HessianOperator(model, crit, data)
    v = _vectors(model, k)

    def singles() -> list[Tensor]:
        with op.session():  # as in Lanczos: one call of an algorithm, the graph kept within it
            return [op @ v[:, i] for i in range(k)]

    return synced(singles)


def func_singles(widths: list[int], batch: int, k: int) -> Callable[[], Any]:
    """K products written by hand with torch.func, one vector at a time."""
    from torch.func import functional_call, grad

    model, crit, data = problem(widths, batch)
    x, y = data[0]
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = _vectors(model, k)
    sizes = [p.numel() for p in params.values()]

    def loss(ps: dict[str, Tensor]) -> Tensor:
        return crit(functional_call(model, ps, (x,)), y)

    def one(col: Tensor) -> dict[str, Tensor]:
        tangent = dict(
            zip(names, (t.view_as(p) for t, p in zip(col.split(sizes), params.values())))
        )

        def dot(ps: dict[str, Tensor]) -> Tensor:
            g = grad(loss)(ps)
            return sum((g[n] * tangent[n]).sum() for n in names)  # type: ignore[return-value]

        return grad(dot)(params)

    return synced(lambda: [one(v[:, i]) for i in range(k)])


def shared_gradient(widths: list[int], batch: int) -> Callable[[], Any]:
    """The part of a product that does not depend on the vector: forward pass and gradient with
    its graph (what one-batch operators keep between products)."""
    model, crit, data = problem(widths, batch)
    x, y = data[0]
    params = list(model.parameters())

    def run() -> Any:
        return torch.autograd.grad(crit(model(x), y), params, create_graph=True)

    return run


def curvlinops_matvec(
    widths: list[int], batch: int, batches: int = 1, loader: bool = False
) -> Callable[[], Any]:
    from curvlinops import HessianLinearOperator

    model, crit, data = problem(widths, batch, batches, loader)
    params = list(model.parameters())
    op = HessianLinearOperator(model, crit, params, data, check_deterministic=False)
    v = _vectors(model, 1)[:, 0]
    return lambda: op @ v


def block(kind: str, peer: bool, widths: list[int], batch: int, k: int) -> Callable[[], Any]:
    """``op @ V`` with ``k`` columns: hesse's Hessian or GGN operator, or curvlinops'."""
    model, crit, data = problem(widths, batch)
    v = _vectors(model, k)
    if peer:
        import curvlinops

        cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}
        params = list(model.parameters())
        op = cls[kind](model, crit, params, data, check_deterministic=False)
        return synced(lambda: op @ v)
    ours = {"hessian": hesse.HessianOperator, "ggn": hesse.GGNOperator}[kind](model, crit, data)
    return synced(lambda: ours @ v)


def eigenthings_matvec(widths: list[int], batch: int, batches: int = 1) -> Callable[[], Any]:
    import hessian_eigenthings as he

    model, crit, data = problem(widths, batch, batches)
    op = he.HessianOperator(model, data, he.supervised_loss(crit))
    v = _vectors(model, 1)[:, 0]
    return lambda: op.matvec(v)


def hesse_to_dense(widths: list[int], batch: int) -> Callable[[], Any]:
    model, crit, data = problem(widths, batch)
    op = hesse.HessianOperator(model, crit, data)
    return op.to_dense


def hesse_dense_path(widths: list[int], batch: int) -> Callable[[], Any]:
    model, crit, data = problem(widths, batch)
    x, y = data[0]
    return lambda: hesse.loss_hessian_matrix(model, crit, x, y)


MAIN = [64, 96, 96, 10]
DENSE = [64, 64, 48, 10]
BIG = [512, 1024, 512, 10]  # 1,055,242 parameters
SMALL = [64, 48, 32, 10]  # 5,018 parameters: where per-call overhead dominates
SPECS: dict[str, Callable[[], Callable[[], Any]]] = {
    "k32/hesse_matmat": lambda: hesse_matmat(MAIN, 512, K),
    "k32/hesse_singles": lambda: hesse_singles(MAIN, 512, K),
    "k32/func_singles": lambda: func_singles(MAIN, 512, K),
    "k32/gradient": lambda: shared_gradient(MAIN, 512),
    "k32small/hesse_matmat": lambda: hesse_matmat(SMALL, 64, K),
    "k32small/hesse_singles": lambda: hesse_singles(SMALL, 64, K),
    "k32small/func_singles": lambda: func_singles(SMALL, 64, K),
    "k32x2/hesse_matmat": lambda: hesse_matmat(MAIN, 256, K, batches=2),
    "k32x2/hesse_singles": lambda: hesse_singles(MAIN, 256, K, batches=2),
    "peer32/hesse_hessian": lambda: block("hessian", False, MAIN, 512, K),
    "peer32/curvlinops_hessian": lambda: block("hessian", True, MAIN, 512, K),
    "peer32/hesse_ggn": lambda: block("ggn", False, MAIN, 512, K),
    "peer32/curvlinops_ggn": lambda: block("ggn", True, MAIN, 512, K),
    "hvp/hesse": lambda: hesse_matmat(MAIN, 512, 1),
    "hvp/hesse_repeated": lambda: hesse_repeated(MAIN, 512),
    "hvp/curvlinops": lambda: curvlinops_matvec(MAIN, 512),
    "hvp/eigenthings": lambda: eigenthings_matvec(MAIN, 512),
    "hvp2/hesse": lambda: hesse_matmat(MAIN, 256, 1, batches=2),
    "hvp2/curvlinops": lambda: curvlinops_matvec(MAIN, 256, batches=2),
    "hvp2/eigenthings": lambda: eigenthings_matvec(MAIN, 256, batches=2),
    "dense/to_dense": lambda: hesse_to_dense(DENSE, 256),
    "dense/loss_hessian_matrix": lambda: hesse_dense_path(DENSE, 256),
    "big/hesse": lambda: hesse_matmat(BIG, 256, 1, batches=2, loader=True),
    "big/curvlinops": lambda: curvlinops_matvec(BIG, 256, batches=2, loader=True),
    "quick/hesse": lambda: hesse_matmat([8, 16, 4], 32, 4),
    "quick/hesse_1": lambda: hesse_matmat([8, 16, 4], 32, 1),
    "quick/curvlinops": lambda: curvlinops_matvec([8, 16, 4], 32),
    "quick/eigenthings": lambda: eigenthings_matvec([8, 16, 4], 32),
}
WARM = ("quick/hesse", "quick/hesse_1", "quick/curvlinops", "quick/eigenthings")
if DEVICE.type != "cpu":  # GPU runs time hesse and torch.func only; the peers need not be there
    WARM = WARM[:2]
GROUPS = {
    "k32": ["k32/hesse_matmat", "k32/hesse_singles", "k32/func_singles", "k32/gradient"],
    "k32small": ["k32small/hesse_matmat", "k32small/hesse_singles", "k32small/func_singles"],
    "k32x2": ["k32x2/hesse_matmat", "k32x2/hesse_singles"],
    "peer32": [
        "peer32/hesse_hessian",
        "peer32/curvlinops_hessian",
        "peer32/hesse_ggn",
        "peer32/curvlinops_ggn",
    ],
    "hvp": ["hvp/hesse", "hvp/hesse_repeated", "hvp/curvlinops", "hvp/eigenthings"],
    "hvp2": ["hvp2/hesse", "hvp2/curvlinops", "hvp2/eigenthings"],
    "dense": ["dense/to_dense", "dense/loss_hessian_matrix"],
    "quick": list(WARM),
}


def report(results: dict[str, dict[str, Any]], rounds: int) -> str:
    n_main = sum(p.numel() for p in mlp(MAIN).parameters())
    n_big = sum(p.numel() for p in mlp(BIG).parameters())

    def mem(spec: str) -> str:
        r = results.get(spec, {})
        return mib(r["peak_growth"]) if "peak_growth" in r else r.get("error", "–")[:80]

    lines = [
        "Command: `python benchmarks/bench_operators.py`  ",
        f"{THREADS} threads, float32, medians of {rounds} round-robin rounds"
        + (
            f", on {device}."
            if (device := os.environ.get("HESSE_BENCH_DEVICE", "cpu")) != "cpu"
            else "."
        ),
        "",
        f"### Products, cross-entropy MLP 64-96-96-10, batch 512, N = {n_main:,}",
        "",
        "| measurement | time | ratio (range over rounds) |",
        "| --- | --- | --- |",
        f"| `op @ V`, K = 32 columns | {seconds(results, 'k32/hesse_matmat', 'ms')} | 1.00× |",
        f"| 32 single products `op @ v` (one batch, one session: graph kept) | "
        f"{seconds(results, 'k32/hesse_singles', 'ms')} | "
        f"{ratio(results, 'k32/hesse_singles', 'k32/hesse_matmat')} slower |",
        f"| 32 single products by hand with torch.func (`grad` of `grad · v`) | "
        f"{seconds(results, 'k32/func_singles', 'ms')} | "
        f"{ratio(results, 'k32/func_singles', 'k32/hesse_matmat')} slower |",
        f"| forward pass + gradient with its graph (shared by all columns) | "
        f"{seconds(results, 'k32/gradient', 'ms')} | |",
        f"| `op @ V`, K = 32, 2 batches of 256 | {seconds(results, 'k32x2/hesse_matmat', 'ms')} "
        "| 1.00× |",
        f"| 32 single products, 2 batches of 256 | "
        f"{seconds(results, 'k32x2/hesse_singles', 'ms')} | "
        f"{ratio(results, 'k32x2/hesse_singles', 'k32x2/hesse_matmat')} slower |",
        f"| `op @ V`, K = 32, MLP 64-48-32-10 (N = 5,018), batch 64 | "
        f"{seconds(results, 'k32small/hesse_matmat', 'ms')} | 1.00× |",
        f"| 32 single products `op @ v`, same (one session: graph kept) | "
        f"{seconds(results, 'k32small/hesse_singles', 'ms')} | "
        f"{ratio(results, 'k32small/hesse_singles', 'k32small/hesse_matmat')} slower |",
        f"| 32 single products by hand with torch.func, same | "
        f"{seconds(results, 'k32small/func_singles', 'ms')} | "
        f"{ratio(results, 'k32small/func_singles', 'k32small/hesse_matmat')} slower |",
        f"| `op @ V`, K = 32, Hessian, hesse | {seconds(results, 'peer32/hesse_hessian', 'ms')} "
        "| 1.00× |",
        f"| `H @ V`, K = 32, curvlinops `HessianLinearOperator` | "
        f"{seconds(results, 'peer32/curvlinops_hessian', 'ms')} | "
        f"{ratio(results, 'peer32/curvlinops_hessian', 'peer32/hesse_hessian')} of hesse's time |",
        f"| `op @ V`, K = 32, GGN, hesse | {seconds(results, 'peer32/hesse_ggn', 'ms')} | 1.00× |",
        f"| `G @ V`, K = 32, curvlinops `GGNLinearOperator` | "
        f"{seconds(results, 'peer32/curvlinops_ggn', 'ms')} | "
        f"{ratio(results, 'peer32/curvlinops_ggn', 'peer32/hesse_ggn')} of hesse's time |",
        f"| one product, hesse (`op @ v` on its own: forward, gradient, second backward) | "
        f"{seconds(results, 'hvp/hesse', 'ms')} | 1.00× |",
        f"| {REPEATS} products in one session (as within one `eigsh` call), hesse | "
        f"{seconds(results, 'hvp/hesse_repeated', 'ms')} | "
        f"{ratio(results, 'hvp/hesse_repeated', 'hvp/hesse')} of one product's time |",
        f"| one product, curvlinops `HessianLinearOperator` | "
        f"{seconds(results, 'hvp/curvlinops', 'ms')} | "
        f"{ratio(results, 'hvp/curvlinops', 'hvp/hesse')} of hesse's time |",
        f"| one product, hessian-eigenthings `HessianOperator.matvec` | "
        f"{seconds(results, 'hvp/eigenthings', 'ms')} | "
        f"{ratio(results, 'hvp/eigenthings', 'hvp/hesse')} of hesse's time |",
        f"| one product over 2 batches of 256, hesse | {seconds(results, 'hvp2/hesse', 'ms')} "
        "| 1.00× |",
        f"| one product over 2 batches of 256, curvlinops | "
        f"{seconds(results, 'hvp2/curvlinops', 'ms')} | "
        f"{ratio(results, 'hvp2/curvlinops', 'hvp2/hesse')} of hesse's time |",
        f"| one product over 2 batches of 256, hessian-eigenthings | "
        f"{seconds(results, 'hvp2/eigenthings', 'ms')} | "
        f"{ratio(results, 'hvp2/eigenthings', 'hvp2/hesse')} of hesse's time |",
        "",
        "A product is a forward pass and a gradient, shared by every column, plus a second",
        "backward pass per column. `op @ V` computes the shared part once per batch; on these",
        "MLPs (an `nn.Sequential` of linear layers and activations) it runs the per-column part",
        "as a hand-written R-operator with the columns folded into each layer's matrix",
        "products, in cache-sized chunks, and the cross-entropy's outputs' Hessian in closed",
        "form; the GGN multiplies through the layers' factors, two matrix products per layer",
        "and column (other models: `vmap` over the second backward). Single products by hand",
        "with torch.func pay the shared part and torch.func's per-call overhead 32 times; so do",
        "hesse's single products over several batches (2-batch rows). Over one batch hesse's",
        "single products pay the shared part once (the first through the gradient graph, the",
        "others through the same R-operator, one column at a time), like `op @ V`: what",
        "separates them is how efficiently the 32 second passes run one by one or together,",
        "and at batch 512 that work is compute-bound on this CPU. The N = 5,018, batch-64 rows",
        "show the regime where per-call overhead dominates.",
        "",
        "Over one batch, hesse keeps the batch's gradient graph within one call of its",
        "algorithms (`eigsh`, `trace`, `spectral_density`: a session, where nothing can change",
        "between products), so a repeated product there costs one backward pass. A product on",
        "its own always starts from the model as it is, like the peers' products, which",
        "recompute the forward pass and the gradient each time. Over several batches no graph",
        "is kept, and all three do the same work.",
        "",
        "### `to_dense()` against the exact dense path, MLP 64-64-48-10, batch 256, N = 7,770",
        "",
        "| method | time | ratio |",
        "| --- | --- | --- |",
        f"| `HessianOperator(...).to_dense()` | {seconds(results, 'dense/to_dense')} | "
        f"{ratio(results, 'dense/to_dense', 'dense/loss_hessian_matrix')} |",
        f"| `hesse.loss_hessian_matrix` | {seconds(results, 'dense/loss_hessian_matrix')} "
        "| 1.00× |",
        "",
        f"### Memory of one product, MLP 512-1024-512-10 (N = {n_big:,}), DataLoader of 2 "
        "batches of 256",
        "",
        "| method | time | peak memory growth |",
        "| --- | --- | --- |",
        f"| hesse `HessianOperator @ v` | {seconds(results, 'big/hesse')} | {mem('big/hesse')} |",
        f"| curvlinops `HessianLinearOperator @ v` | {seconds(results, 'big/curvlinops')} | "
        f"{mem('big/curvlinops')} |",
        "",
        f"One vector of N floats is {mib(4 * n_big)}; the model's weights are the same size.",
    ]
    return "\n".join(lines)


def main() -> None:
    if child_main(SPECS, WARM):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=sorted(GROUPS), help="run one table, print only")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda with --only (print only)")
    args = parser.parse_args()
    os.environ["HESSE_BENCH_DEVICE"] = args.device
    if args.device != "cpu" and not args.only:
        parser.error("--device other than cpu needs --only (the docs tables are CPU runs)")
    results: dict[str, dict[str, Any]] = {}
    groups = (
        ["quick"] if args.quick else ["k32", "peer32", "k32x2", "k32small", "hvp", "hvp2", "dense"]
    )
    if args.only:
        groups, args.quick = [args.only], True
    for group in groups:
        print(f"{group}:", flush=True)
        results.update(measure_times(__file__, GROUPS[group], args.rounds))
    if not args.quick:
        print("big:", flush=True)
        for spec in ("big/hesse", "big/curvlinops"):
            r = measure_memory(__file__, spec)
            results[spec] = {**r, "median_s": r["seconds"]} if "seconds" in r else r
    table = report(results, args.rounds)
    print("\n" + table)
    if not args.quick:
        write_docs("operators", table)


if __name__ == "__main__":
    main()

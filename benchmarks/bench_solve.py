"""Damped solves and influence functions: hesse.solve against SciPy's cg on curvlinops' operator,
curvlinops' CG inverse (GPyTorch's linear_cg) and a textbook CG; K right-hand sides against one;
influence scores against a dense-inverse reference.

    python benchmarks/bench_solve.py          # full run, rewrites its docs/benchmarks.md table
    python benchmarks/bench_solve.py --quick  # small sizes, prints only
    python benchmarks/bench_solve.py --only k16 --device cuda  # K = 16 against one, GPU, prints

Solve problem: the cross-entropy MLP 64-96-96-10 (Tanh) of the spectral benchmark, one batch of
512, float64, N = 16,522; the damped GGN G + λI with λ = 1e-2, a random right-hand side, solved
to a relative residual of 1e-6. Products are counted per column and the relative residual
‖b − (G + λI)x‖/‖b‖ of each answer is recomputed with one exact product.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # SciPy's threads fight torch's

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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

DAMPING = 1e-2
TOL = 1e-6
K = 16
MAIN = ([64, 96, 96, 10], 512)
QUICK = ([16, 24, 10], 64)
# Influence: a ~100k-parameter MLP over 1,000 training and 20 test points; the dense reference
# at N = 5,722, where the dense GGN (262 MB in float64) and its inverse fit.
BIG = [64, 256, 256, 64, 10]  # 99,530 parameters
SMALL = [32, 64, 48, 10]  # 5,722 parameters
N_TRAIN, N_TEST, TRAIN_BATCH = 1000, 20, 250
QUICK_INFLUENCE = ([8, 16, 4], 60, 5, 20)


def problem(widths: list[int], batch: int) -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = mlp(widths).double().to(DEVICE)
    x = torch.randn(batch, widths[0], dtype=torch.float64).to(DEVICE)
    y = torch.randint(0, widths[-1], (batch,)).to(DEVICE)
    return model, nn.CrossEntropyLoss(), (x, y)


def rhs(n: int, k: int | None = None) -> Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (n,) if k is None else (n, k)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def relative_residual(op: Any, b: Tensor, x: Tensor) -> float:
    """‖b − (G + λI)x‖ / ‖b‖ from one exact product (column-wise maximum)."""
    r = b - (op @ x + DAMPING * x)
    return float((r.norm(dim=0) / b.norm(dim=0)).max())


# ------------------------------------------------------------------------------- methods


def hesse_cg(size: tuple[list[int], int], k: int | None = None) -> Callable[[], Any]:
    model, crit, data = problem(*size)
    op = hesse.GGNOperator(model, crit, data)
    b = rhs(op.shape[0], k)
    return synced(lambda: hesse.solve(op, b, damping=DAMPING, tol=TOL))


def textbook_cg(size: tuple[list[int], int]) -> Callable[[], Any]:
    """Conjugate gradients as in the textbooks, one product of hesse's operator per iteration,
    the whole solve in one session (as hesse.solve runs it)."""
    model, crit, data = problem(*size)
    op = hesse.GGNOperator(model, crit, data)
    b = rhs(op.shape[0])

    def run() -> tuple[Tensor, int]:
        with op.session():
            x = torch.zeros_like(b)
            r = b.clone()
            p = r.clone()
            rr = r @ r
            stop = TOL * b.norm()
            products = 0
            while r.norm() > stop:
                q = op @ p + DAMPING * p
                products += 1
                alpha = rr / (p @ q)
                x += alpha * p
                r -= alpha * q
                rr, previous = r @ r, rr
                p = r + (rr / previous) * p
        return x, products

    return run


def _curvlinops_ggn(size: tuple[list[int], int]) -> tuple[Any, Tensor]:
    from curvlinops import GGNLinearOperator

    model, crit, data = problem(*size)
    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(model, crit, params, [data], check_deterministic=False)
    return op, rhs(op.shape[0])


class _Counted:
    """A SciPy LinearOperator's matvec with a product count."""

    def __init__(self, scipy_op: Any) -> None:
        self.base, self.count = scipy_op, 0

    def __call__(self, v: Any) -> Any:
        self.count += 1
        return self.base.matvec(v) + DAMPING * v.reshape(-1)


def scipy_cg(size: tuple[list[int], int], counter: list[Any] | None = None) -> Callable[[], Any]:
    from scipy.sparse.linalg import LinearOperator, cg

    op, b = _curvlinops_ggn(size)
    scipy_op = op.to_scipy()
    matvec = _Counted(scipy_op)
    damped = LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
    if counter is not None:
        counter.append(matvec)
    b_np = b.numpy()
    return lambda: cg(damped, b_np, rtol=TOL, atol=0.0, maxiter=10 * b_np.size)


def curvlinops_cg(
    size: tuple[list[int], int], counter: list[Any] | None = None, max_iter: int = 3000
) -> Callable[[], Any]:
    """curvlinops' CGInverseLinearOperator (GPyTorch's linear_cg from `linear_operator`)."""
    from curvlinops import CGInverseLinearOperator
    from curvlinops._torch_base import PyTorchLinearOperator

    op, b = _curvlinops_ggn(size)

    class Damped(PyTorchLinearOperator):  # type: ignore[misc]
        SELF_ADJOINT = True

        def __init__(self) -> None:
            super().__init__(op._in_shape, op._out_shape)
            self.count = 0

        def _matmat(self, x: list[Tensor]) -> list[Tensor]:
            self.count += x[0].shape[-1]
            return [ax + DAMPING * xi for ax, xi in zip(op._matmat(x), x)]

        def _adjoint(self) -> Damped:
            return self

        @property
        def device(self) -> torch.device:
            return op.device

        @property
        def dtype(self) -> torch.dtype:
            return op.dtype

    damped = Damped()
    if counter is not None:
        counter.append(damped)
    inverse = CGInverseLinearOperator(damped, tolerance=TOL, max_iter=max_iter)
    return lambda: inverse @ b


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- influence


def influence_problem(
    widths: list[int], n_train: int, n_test: int, batch: int
) -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = mlp(widths).double()
    x = torch.randn(n_train + n_test, widths[0], dtype=torch.float64)
    y = torch.randint(0, widths[-1], (n_train + n_test,))
    train = list(zip(x[:n_train].split(batch), y[:n_train].split(batch)))
    return model, nn.CrossEntropyLoss(), train, (x[n_train:], y[n_train:])


def hesse_influence(widths: list[int], n_train: int, n_test: int, batch: int) -> Any:
    model, crit, train, test = influence_problem(widths, n_train, n_test, batch)
    return lambda: hesse.influence_scores(model, crit, train, test, damping=DAMPING, tol=TOL)


def dense_influence(widths: list[int], n_train: int, n_test: int, batch: int) -> Any:
    """The dense formula: the GGN formed, inverted, and applied to every training gradient."""
    model, crit, train, test = influence_problem(widths, n_train, n_test, batch)

    def run() -> Tensor:
        g = hesse.GGNOperator(model, crit, train).to_dense()
        inverse = torch.linalg.inv(g + DAMPING * torch.eye(g.shape[0], dtype=g.dtype))
        x = torch.cat([b[0] for b in train])
        y = torch.cat([b[1] for b in train])
        g_train = hesse.per_sample_gradients(model, crit, x, y)
        g_test = hesse.per_sample_gradients(model, crit, *test)
        return -g_test @ inverse @ g_train.T

    return run


SPECS: dict[str, Callable[[], Callable[[], Any]]] = {
    "solve/hesse": lambda: hesse_cg(MAIN),
    "solve/textbook": lambda: textbook_cg(MAIN),
    "solve/scipy": lambda: scipy_cg(MAIN),
    "solve/curvlinops": lambda: curvlinops_cg(MAIN),
    "k16/hesse_k16": lambda: hesse_cg(MAIN, K),
    "k16/hesse_k1": lambda: hesse_cg(MAIN),
    "influence/hesse_big": lambda: hesse_influence(BIG, N_TRAIN, N_TEST, TRAIN_BATCH),
    "influence/hesse_small": lambda: hesse_influence(SMALL, N_TRAIN, N_TEST, TRAIN_BATCH),
    "influence/dense_small": lambda: dense_influence(SMALL, N_TRAIN, N_TEST, TRAIN_BATCH),
    "quick/hesse": lambda: hesse_cg(QUICK),
    "quick/textbook": lambda: textbook_cg(QUICK),
    "quick/scipy": lambda: scipy_cg(QUICK),
    "quick/curvlinops": lambda: curvlinops_cg(QUICK, max_iter=300),
    "quick/hesse_k16": lambda: hesse_cg(QUICK, K),
    "quick/hesse_influence": lambda: hesse_influence(*QUICK_INFLUENCE),
    "quick/dense_influence": lambda: dense_influence(*QUICK_INFLUENCE),
}
WARM = ("quick/hesse",)
GROUPS = {
    "solve": ["solve/hesse", "solve/textbook", "solve/scipy"],
    "k16": ["k16/hesse_k16", "k16/hesse_k1"],
    "quick": [
        "quick/hesse",
        "quick/textbook",
        "quick/scipy",
        "quick/curvlinops",
        "quick/hesse_k16",
        "quick/hesse_influence",
        "quick/dense_influence",
    ],
}


def counts(size: tuple[list[int], int], quick: bool) -> dict[str, dict[str, Any]]:
    """Products and the recomputed relative residual of each method, one run each."""
    torch.set_num_threads(THREADS)
    model, crit, data = problem(*size)
    op = hesse.GGNOperator(model, crit, data)
    b = rhs(op.shape[0])
    out: dict[str, dict[str, Any]] = {}
    result = hesse.solve(op, b, damping=DAMPING, tol=TOL)
    out["hesse"] = {
        "products": result.num_matvecs,
        "residual": relative_residual(op, b, result.solution),
    }
    x, products = textbook_cg(size)()
    out["textbook"] = {"products": products, "residual": relative_residual(op, b, x)}
    counter: list[Any] = []
    solution, info = scipy_cg(size, counter)()
    out["scipy"] = {
        "products": counter[0].count,
        "residual": relative_residual(op, b, torch.as_tensor(solution)),
        "info": info,
    }
    if _installed("linear_operator"):
        counter = []
        x = curvlinops_cg(size, counter, max_iter=300 if quick else 3000)()
        out["curvlinops"] = {"products": counter[0].count, "residual": relative_residual(op, b, x)}
    result = hesse.solve(op, rhs(op.shape[0], K), damping=DAMPING, tol=TOL)
    out["hesse_k16"] = {
        "products": result.num_matvecs,
        "iterations": result.residual_norms.shape[0] - 1,
    }
    return out


def agreement(widths: list[int], n_train: int, n_test: int, batch: int) -> float:
    """Largest difference between hesse's scores and the dense formula's, relative to the
    largest score."""
    ours = hesse_influence(widths, n_train, n_test, batch)()
    dense = dense_influence(widths, n_train, n_test, batch)()
    return float((ours - dense).abs().max() / dense.abs().max())


def report(
    results: dict[str, dict[str, Any]],
    found: dict[str, dict[str, Any]],
    agree: float,
    rounds: int,
    quick: bool,
) -> str:
    widths, batch = QUICK if quick else MAIN
    n = sum(p.numel() for p in mlp(widths).parameters())
    max_iter = 300 if quick else 3000
    curvlinops_row = (
        f"| curvlinops `CGInverseLinearOperator` (GPyTorch's `linear_cg`, tolerance 1e-6, "
        f"max_iter {max_iter:,}) | {found['curvlinops']['products']:,} | "
        f"{seconds(results, 'solve/curvlinops')} | "
        f"{found['curvlinops']['residual']:.1e} | "
        f"{ratio(results, 'solve/curvlinops', 'solve/hesse')} of hesse's time |"
        if "curvlinops" in found
        else "| curvlinops `CGInverseLinearOperator` | – | not installed (needs GPyTorch's "
        "`linear_operator`) | – | – |"
    )

    def mem(spec: str) -> str:
        r = results.get(spec, {})
        return mib(r["peak_growth"]) if "peak_growth" in r else r.get("error", "–")[:80]

    lines = [
        "Command: `python benchmarks/bench_solve.py`  ",
        f"{THREADS} threads, float64, medians of {rounds} round-robin rounds; "
        "`OPENBLAS_NUM_THREADS=1` for SciPy.",
        "",
        f"### Damped GGN solve, CE MLP {'-'.join(map(str, widths))}, batch {batch}, N = {n:,}, "
        f"λ = {DAMPING:g}, relative residual {TOL:g}",
        "",
        "| method | products | time | relative residual reached | ratio |",
        "| --- | --- | --- | --- | --- |",
        f"| `hesse.solve(G, b, damping=λ, tol=1e-6)` (CG) | {found['hesse']['products']} | "
        f"{seconds(results, 'solve/hesse')} | {found['hesse']['residual']:.1e} | 1.00× |",
        f"| textbook CG on hesse's operator (one session) | {found['textbook']['products']} | "
        f"{seconds(results, 'solve/textbook')} | {found['textbook']['residual']:.1e} | "
        f"{ratio(results, 'solve/textbook', 'solve/hesse')} of hesse's time |",
        f"| SciPy `cg` on curvlinops' `GGNLinearOperator(...).to_scipy()` | "
        f"{found['scipy']['products']} | {seconds(results, 'solve/scipy')} | "
        f"{found['scipy']['residual']:.1e} | "
        f"{ratio(results, 'solve/scipy', 'solve/hesse')} of hesse's time |",
        curvlinops_row,
        "",
        f"### K = {K} right-hand sides against one, same system",
        "",
        "| measurement | time | ratio |",
        "| --- | --- | --- |",
        f"| one right-hand side | {seconds(results, 'k16/hesse_k1')} | 1.00× |",
        f"| K = {K} together ({found['hesse_k16']['iterations']} iterations, "
        f"{found['hesse_k16']['products']} products) | {seconds(results, 'k16/hesse_k16')} | "
        f"{ratio(results, 'k16/hesse_k16', 'k16/hesse_k1')} |",
    ]
    if not quick:
        n_big = sum(p.numel() for p in mlp(BIG).parameters())
        n_small = sum(p.numel() for p in mlp(SMALL).parameters())
        lines += [
            "",
            f"### Influence scores, {N_TRAIN:,} training × {N_TEST} test points, CE, float64, "
            f"λ = {DAMPING:g}",
            "",
            "| problem | method | time | peak memory growth |",
            "| --- | --- | --- | --- |",
            f"| MLP {'-'.join(map(str, BIG))}, N = {n_big:,} | `hesse.influence_scores` | "
            f"{seconds(results, 'influence/hesse_big')} | {mem('influence/hesse_big')} |",
            f"| MLP {'-'.join(map(str, SMALL))}, N = {n_small:,} | `hesse.influence_scores` | "
            f"{seconds(results, 'influence/hesse_small')} | {mem('influence/hesse_small')} |",
            f"| same | dense GGN, `torch.linalg.inv`, per-sample gradients | "
            f"{seconds(results, 'influence/dense_small')} | {mem('influence/dense_small')} |",
            "",
            f"At N = {n_small:,} the two agree to {agree:.1e} of the largest score. "
            f"The dense reference at N = {n_big:,} would need {8 * n_big**2 / 2**30:,.0f} GiB for "
            "the GGN alone.",
        ]
    return "\n".join(lines)


def main() -> None:
    if child_main(SPECS, WARM):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    parser.add_argument("--only", choices=["k16"], help="one table, print only")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda with --only (print only)")
    args = parser.parse_args()
    os.environ["HESSE_BENCH_DEVICE"] = args.device
    if args.device != "cpu" and not args.only:
        parser.error("--device other than cpu needs --only (the docs tables are CPU runs)")
    results: dict[str, dict[str, Any]] = {}
    if args.only:
        results = measure_times(__file__, GROUPS[args.only], args.rounds)
        k16 = ratio(results, "k16/hesse_k16", "k16/hesse_k1")
        print(
            f"\nK = {K} together: {seconds(results, 'k16/hesse_k16')}, one right-hand side: "
            f"{seconds(results, 'k16/hesse_k1')}; ratio {k16} ({args.device})"
        )
        return
    if args.quick:
        quick = measure_times(__file__, GROUPS["quick"], args.rounds)
        renamed = {
            "quick/hesse": "solve/hesse",
            "quick/textbook": "solve/textbook",
            "quick/scipy": "solve/scipy",
            "quick/curvlinops": "solve/curvlinops",
            "quick/hesse_k16": "k16/hesse_k16",
        }
        results = {renamed.get(k, k): v for k, v in quick.items()}
        results["k16/hesse_k1"] = quick["quick/hesse"]
        found = counts(QUICK, quick=True)
        agree = agreement(*QUICK_INFLUENCE)
    else:
        for group in ("solve", "k16"):
            print(f"{group}:", flush=True)
            results.update(measure_times(__file__, GROUPS[group], args.rounds))
        if _installed("linear_operator"):  # thousands of products: one timed round
            print("curvlinops:", flush=True)
            results.update(measure_times(__file__, ["solve/curvlinops"], 1))
        print("influence:", flush=True)
        for spec in ("influence/hesse_big", "influence/hesse_small", "influence/dense_small"):
            r = measure_memory(__file__, spec)
            results[spec] = {**r, "median_s": r["seconds"]} if "seconds" in r else r
        found = counts(MAIN, quick=False)
        agree = agreement(SMALL, N_TRAIN, N_TEST, TRAIN_BATCH)
    for name, value in found.items():
        print(f"  {name}: {value}")
    print(f"  influence agreement with the dense formula: {agree:.1e}")
    table = report(results, found, agree, args.rounds, args.quick)
    print("\n" + table)
    if not args.quick:
        write_docs("solve", table)


if __name__ == "__main__":
    main()

"""KFAC: hesse's `KFACOperator` side by side with curvlinops' `KFACLinearOperator`.

    python benchmarks/bench_kfac.py          # full run, rewrites its docs/benchmarks.md table
    python benchmarks/bench_kfac.py --quick  # small sizes, prints only

Problems (float32, CPU unless ``HESSE_BENCH_DEVICE=cuda``): a cross-entropy MLP 64-96-96-10
(Tanh) over 4 batches of 256 given as a list, and a small CNN (two 3x3 convolutions, 16
channels, a linear head) over 4 batches of 64 images 3x16x16. Timed: building the type-2
factors (curvlinops: construction plus ``compute_kronecker_factors()``, given ``num_data``
and ``num_per_example_loss_terms=1`` so that it does not read the data to count them), and
applying the exactly damped inverse (damping 1e-3) to K = 32 columns with the
eigendecompositions cached (curvlinops: ``KFACInverseLinearOperator(use_exact_damping=True)``).
"""

from __future__ import annotations

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
    measure_times,
    ratio,
    seconds,
    synced,
    write_docs,
)
from bench_dense import mlp

from hesse._kfac import KFACOperator

K = 32
DAMPING = 1e-3
MLP = ([64, 96, 96, 10], 256, 4)  # widths, batch, batches
QUICK_MLP = ([64, 96, 96, 10], 64, 2)
CNN = (64, 4)  # batch, batches
QUICK_CNN = (16, 2)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def problem(kind: str, quick: bool) -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(0)
    if kind == "mlp":
        widths, batch, batches = QUICK_MLP if quick else MLP
        model = mlp(widths)
        x = torch.randn(batch * batches, widths[0])
        classes = widths[-1]
    else:
        batch, batches = QUICK_CNN if quick else CNN
        model = cnn()
        x = torch.randn(batch * batches, 3, 16, 16)
        classes = 10
    y = torch.randint(0, classes, (batch * batches,))
    model = model.to(DEVICE)
    data = list(zip(x.to(DEVICE).split(batch), y.to(DEVICE).split(batch)))
    return model, nn.CrossEntropyLoss(), data


def _vectors(model: nn.Module) -> Tensor:
    n = sum(p.numel() for p in model.parameters())
    return torch.randn(n, K, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _curvlinops(model: nn.Module, crit: nn.Module, data: list[Any]) -> Any:
    from curvlinops import KFACLinearOperator

    op = KFACLinearOperator(
        model,
        crit,
        list(model.parameters()),
        data,
        fisher_type="type-2",
        check_deterministic=False,
        num_data=sum(len(y) for _, y in data),
        num_per_example_loss_terms=1,
    )
    op.compute_kronecker_factors()
    return op


def hesse_build(kind: str, quick: bool) -> Callable[[], Any]:
    model, crit, data = problem(kind, quick)
    return synced(lambda: KFACOperator(model, crit, data))


def curvlinops_build(kind: str, quick: bool) -> Callable[[], Any]:
    model, crit, data = problem(kind, quick)
    return synced(lambda: _curvlinops(model, crit, data))


def hesse_inverse(kind: str, quick: bool) -> Callable[[], Any]:
    model, crit, data = problem(kind, quick)
    inverse = KFACOperator(model, crit, data).inverse(DAMPING)
    v = _vectors(model)
    return synced(lambda: inverse @ v)


def curvlinops_inverse(kind: str, quick: bool) -> Callable[[], Any]:
    from curvlinops import KFACInverseLinearOperator

    model, crit, data = problem(kind, quick)
    inverse = KFACInverseLinearOperator(
        _curvlinops(model, crit, data), damping=DAMPING, use_exact_damping=True
    )
    v = _vectors(model)
    return synced(lambda: inverse @ v)


SPECS: dict[str, Callable[[], Callable[[], Any]]] = {}
for _kind in ("mlp", "cnn"):
    for _quick, _prefix in ((False, ""), (True, "quick-")):
        for _name, _factory in (
            ("build/hesse", hesse_build),
            ("build/curvlinops", curvlinops_build),
            ("inverse/hesse", hesse_inverse),
            ("inverse/curvlinops", curvlinops_inverse),
        ):
            SPECS[f"{_prefix}{_kind}-{_name}"] = (
                lambda f=_factory, k=_kind, q=_quick: f(k, q)  # type: ignore[misc]
            )
WARM = ("quick-mlp-build/hesse",)


def agreement(kind: str, quick: bool) -> tuple[float, float]:
    """Relative differences of ``K @ V`` and of the damped inverse's ``@ V`` against curvlinops."""
    from curvlinops import KFACInverseLinearOperator

    model, crit, data = problem(kind, quick)
    ours, theirs = KFACOperator(model, crit, data), _curvlinops(model, crit, data)
    v = _vectors(model)
    a, b = ours @ v, theirs @ v
    product = float((a - b).abs().max() / b.abs().max())
    inv = KFACInverseLinearOperator(theirs, damping=DAMPING, use_exact_damping=True)
    a, b = ours.inverse(DAMPING) @ v, inv @ v
    return product, float((a - b).abs().max() / b.abs().max())


def report(results: dict[str, dict[str, Any]], prefix: str, rounds: int) -> str:
    widths, batch, batches = QUICK_MLP if prefix else MLP
    cnn_batch, cnn_batches = QUICK_CNN if prefix else CNN
    lines = [
        f"KFAC (type-2), float32 on {DEVICE.type}, {THREADS} threads, median of {rounds} rounds "
        "(ratio hesse / curvlinops, below 1 is faster; range over rounds). Inverse: exact "
        f"damping {DAMPING}, K = {K} columns, eigendecompositions cached.",
        "",
        "| problem | step | hesse | curvlinops | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {
        "mlp": f"MLP {'-'.join(map(str, widths))}, {batches} × {batch}",
        "cnn": f"CNN 3-16-16-10 on 16×16, {cnn_batches} × {cnn_batch}",
    }
    for kind in ("mlp", "cnn"):
        for step, label in (("build", "factors"), ("inverse", f"(K + λI)⁻¹ @ V, K = {K}")):
            ours, theirs = f"{prefix}{kind}-{step}/hesse", f"{prefix}{kind}-{step}/curvlinops"
            lines.append(
                f"| {names[kind]} | {label} | {seconds(results, ours, 'ms')} | "
                f"{seconds(results, theirs, 'ms')} | {ratio(results, ours, theirs)} |"
            )
    for kind in ("mlp", "cnn"):
        product, inverse = agreement(kind, bool(prefix))
        lines.append("")
        lines.append(
            f"{names[kind]}: relative difference to curvlinops {product:.1e} (`K @ V`), "
            f"{inverse:.1e} (inverse)."
        )
    return "\n".join(lines)


def main() -> None:
    if child_main(SPECS, WARM):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    args = parser.parse_args()
    prefix = "quick-" if args.quick else ""
    rounds = 3 if args.quick else args.rounds
    results: dict[str, dict[str, Any]] = {}
    for kind in ("mlp", "cnn"):
        for step in ("build", "inverse"):
            names = [f"{prefix}{kind}-{step}/hesse", f"{prefix}{kind}-{step}/curvlinops"]
            print(f"{kind} {step}:", flush=True)
            results.update(measure_times(__file__, names, rounds))
    table = report(results, prefix, rounds)
    print("\n" + table)
    if not args.quick:
        write_docs("kfac", table)


if __name__ == "__main__":
    main()

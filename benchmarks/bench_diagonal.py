"""Exact diagonals: hesse side by side with BackPACK (DiagHessian, DiagGGNExact, DiagGGNMC),
torch.func and hesse's own general path.

    python benchmarks/bench_diagonal.py           # full run, rewrites its docs/benchmarks.md table
    python benchmarks/bench_diagonal.py --quick   # small sizes, prints only

Time: the loss Hessian's and the GGN's diagonal of a cross-entropy MLP 64-64-48-10 (Tanh),
batch 256, float32 (N = 7,770); a small ResNet-style CNN (BatchNorm in eval mode) and a
one-block transformer, where only some layers take the layer route, against hesse's general
path (one Hessian column per parameter) with the route switched off. Agreement: the same
diagonal in float64, hesse against BackPACK. Coverage:
small float64 models outside BackPACK's module list (LayerNorm, attention, tied weights, a
residual branch), each compared with ``torch.autograd.functional.hessian``; what BackPACK does
with each is reported as it happens. BackPACK always works on a deep copy: ``extend()`` rewires
a module so that torch.func transforms on it break.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import THREADS, child_main, measure_times, ratio, seconds, write_docs
from bench_cnn import Block
from bench_dense import mlp

import hesse

WIDTHS = [64, 64, 48, 10]
BATCH = 256


def problem(
    widths: list[int], batch: int, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = mlp(widths).to(dtype)
    x = torch.randn(batch, widths[0], dtype=dtype)
    y = torch.randint(0, widths[-1], (batch,))
    return model, nn.CrossEntropyLoss(), x, y


def backpack_diagonal(model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """BackPACK's exact DiagHessian, flattened in ``named_parameters`` order."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    copied = extend(copy.deepcopy(model))
    loss_fn = extend(copy.deepcopy(criterion))
    loss = loss_fn(copied(x), y)
    with backpack(DiagHessian()):
        loss.backward()
    return torch.cat([p.diag_h.reshape(-1) for p in copied.parameters()])  # type: ignore[attr-defined]


def hesse_call(widths: list[int], batch: int) -> Callable[[], Any]:
    model, crit, x, y = problem(widths, batch)
    return lambda: hesse.loss_hessian_diagonal(model, crit, x, y)


def backpack_call(widths: list[int], batch: int) -> Callable[[], Any]:
    model, crit, x, y = problem(widths, batch)
    return lambda: backpack_diagonal(model, crit, x, y)


def general(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with the layer route switched off: hesse's general path for every parameter."""

    def run() -> Any:
        with (
            mock.patch("hesse._curvature.hessian_diagonal_blocks", return_value={}),
            mock.patch("hesse._operators.ggn_diagonal_blocks", return_value={}),
        ):
            return call()

    return run


def backpack_ggn(model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor, mc: int = 0) -> Any:
    """BackPACK's DiagGGNExact (or DiagGGNMC with ``mc`` samples), flattened."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    copied = extend(copy.deepcopy(model))
    loss_fn = extend(copy.deepcopy(criterion))
    extension = DiagGGNMC(mc_samples=mc) if mc else DiagGGNExact()
    attr = "diag_ggn_mc" if mc else "diag_ggn_exact"

    def run() -> Tensor:
        loss = loss_fn(copied(x), y)
        with backpack(extension):
            loss.backward()
        return torch.cat([getattr(p, attr).reshape(-1) for p in copied.parameters()])

    return run


def ggn_call(widths: list[int], batch: int) -> Callable[[], Any]:
    model, crit, x, y = problem(widths, batch)
    op = hesse.GGNOperator(model, crit, (x, y))
    return op.diagonal


def mc_call(widths: list[int], batch: int) -> Callable[[], Any]:
    model, crit, x, y = problem(widths, batch)
    op = hesse.GGNOperator(model, crit, (x, y))
    return lambda: op.mc_diagonal(mc_samples=1, seed=0)


def cnn_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """ResNet-style: two residual blocks of 8 channels, BatchNorm in eval mode, batch 32."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Block(8),
        Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).eval()
    return model, nn.CrossEntropyLoss(), torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))


class TransformerBlock(nn.Module):
    """Pre-norm: attention with q/k/v/out projections as nn.Linear, then a token-wise MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n1(x)

        def split(z: Tensor) -> Tensor:
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h))
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.tanh(self.up(self.n2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = TransformerBlock(d, heads=2)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.block(self.embed(tokens)).mean(1))


def transformer_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """One block, d = 16, 2 heads, 8 tokens per sample, batch 32, 10 classes."""
    torch.manual_seed(0)
    model = Transformer().eval()
    return model, nn.CrossEntropyLoss(), torch.randint(0, 32, (32, 8)), torch.randint(0, 10, (32,))


def structured(build: Callable[[], Any], kind: str) -> Callable[[], Callable[[], Any]]:
    def factory() -> Callable[[], Any]:
        model, crit, x, y = build()
        if kind == "hessian":
            return lambda: hesse.loss_hessian_diagonal(model, crit, x, y)
        return hesse.GGNOperator(model, crit, (x, y)).diagonal

    return factory


def func_call(widths: list[int], batch: int) -> Callable[[], Any]:
    """By hand: torch.func.hessian of a flat-vector loss, then its diagonal."""
    loss, theta = flat_loss(*problem(widths, batch))
    return lambda: torch.func.hessian(loss)(theta).diagonal()


def flat_loss(
    model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """The loss as a function of one flat parameter vector (tied parameters once), and the
    model's current vector."""
    named = dict(model.named_parameters())
    shapes = [p.shape for p in named.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in named.values()])

    def loss(flat: Tensor) -> Tensor:
        pieces = flat.split([s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(named, pieces, shapes)}
        return criterion(torch.func.functional_call(model, params, (x,)), y)

    return loss, theta


# ------------------------------------------------------------------- models outside BackPACK


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + torch.tanh(self.inner(x)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.tanh(self.mix(self.embed(tokens))) @ self.embed.weight.T  # (B, 5) logits


def coverage_cases() -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    layer_norm = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    tokens = torch.randint(0, 5, (16,), generator=g)
    return {
        "MLP with LayerNorm": (layer_norm.double(), x, y),
        "self-attention (nn.MultiheadAttention)": (
            Attention().double(),
            torch.randn(16, 4, 6, generator=g, dtype=torch.float64),
            y,
        ),
        "tied weights (embedding = output layer)": (Tied().double(), tokens, tokens),
        "residual branch (x + tanh(Wx))": (Residual().double(), x, y),
    }


def autograd_diagonal(model: nn.Module, criterion: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    loss, theta = flat_loss(model, criterion, x, y)
    # Fused CPU attention kernels have no second derivative; the math kernel has.
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss, theta).diagonal()


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def coverage() -> list[tuple[str, str, str]]:
    rows = []
    criterion = nn.CrossEntropyLoss()
    for name, (model, x, y) in coverage_cases().items():
        reference = autograd_diagonal(model, criterion, x, y)
        ours = hesse.loss_hessian_diagonal(model, criterion, x, y)
        hesse_text = f"max rel. error {_relative(ours, reference):.0e}"
        try:
            theirs = backpack_diagonal(model, criterion, x, y)
        except Exception as err:  # report whatever BackPACK does, as it happens
            first = f"{type(err).__name__}: {err}".splitlines()[0][:170]
            backpack_text = f"fails: `{first}`"
        else:
            if theirs.shape != reference.shape:
                backpack_text = f"wrong size: {theirs.numel()} entries for N = {reference.numel()}"
            else:
                backpack_text = f"runs; max rel. error {_relative(theirs, reference):.0e}"
        rows.append((name, hesse_text, backpack_text))
        print(f"  {name}: hesse {hesse_text}; BackPACK {backpack_text}", flush=True)
    return rows


def _backpack_ggn_call(widths: list[int], batch: int, mc: int = 0) -> Callable[[], Any]:
    return backpack_ggn(*problem(widths, batch), mc=mc)


SPECS: dict[str, Callable[[], Callable[[], Any]]] = {
    "diag/hesse": lambda: hesse_call(WIDTHS, BATCH),
    "diag/backpack": lambda: backpack_call(WIDTHS, BATCH),
    "diag/general": lambda: general(hesse_call(WIDTHS, BATCH)),
    "diag/func": lambda: func_call(WIDTHS, BATCH),
    "ggn/hesse": lambda: ggn_call(WIDTHS, BATCH),
    "ggn/backpack": lambda: _backpack_ggn_call(WIDTHS, BATCH),
    "ggn/general": lambda: general(ggn_call(WIDTHS, BATCH)),
    "mc/hesse": lambda: mc_call(WIDTHS, BATCH),
    "mc/backpack": lambda: _backpack_ggn_call(WIDTHS, BATCH, mc=1),
    "cnn/hesse": structured(cnn_problem, "hessian"),
    "cnn/general": lambda: general(structured(cnn_problem, "hessian")()),
    "cnnggn/hesse": structured(cnn_problem, "ggn"),
    "cnnggn/general": lambda: general(structured(cnn_problem, "ggn")()),
    "tf/hesse": structured(transformer_problem, "hessian"),
    "tf/general": lambda: general(structured(transformer_problem, "hessian")()),
    "tfggn/hesse": structured(transformer_problem, "ggn"),
    "tfggn/general": lambda: general(structured(transformer_problem, "ggn")()),
    "quick/hesse": lambda: hesse_call([8, 16, 4], 32),
    "quick/backpack": lambda: backpack_call([8, 16, 4], 32),
    "quick/general": lambda: general(hesse_call([8, 16, 4], 32)),
    "quick/func": lambda: func_call([8, 16, 4], 32),
}
WARM = ("quick/hesse", "quick/backpack")
# One child process per group. The general path and torch.func allocate hundreds of MB per
# call, and timed next to them the millisecond methods slowed down round after round (glibc's
# allocator): the head-to-head rows run in a process of their own.
GROUPS = {
    "diag": ["diag/hesse", "diag/backpack"],
    "ggn": ["ggn/hesse", "ggn/backpack", "mc/hesse", "mc/backpack"],
    "general": ["diag/general", "diag/func", "ggn/general"],
    "structured": [
        "cnn/hesse",
        "cnn/general",
        "cnnggn/hesse",
        "cnnggn/general",
        "tf/hesse",
        "tf/general",
        "tfggn/hesse",
        "tfggn/general",
    ],
}


def backpack_on(build: Callable[[], Any]) -> str:
    """What BackPACK's DiagHessian does with a model, as it happens."""
    try:
        backpack_diagonal(*build())
    except Exception as err:
        return f"raises `{f'{type(err).__name__}: {err}'.splitlines()[0][:90]}`"
    return "runs"


def _params(build: Callable[[], Any]) -> int:
    return sum(p.numel() for p in build()[0].parameters())


def agreement() -> tuple[float, float]:
    model, crit, x, y = problem(WIDTHS, BATCH, torch.float64)
    hessian = _relative(
        hesse.loss_hessian_diagonal(model, crit, x, y), backpack_diagonal(model, crit, x, y)
    )
    ggn = _relative(
        hesse.GGNOperator(model, crit, (x, y)).diagonal(), backpack_ggn(model, crit, x, y)()
    )
    return hessian, ggn


def report(
    results: dict[str, dict[str, Any]],
    rounds: int,
    agree: tuple[float, float],
    rows: list[Any],
    backpack_rows: dict[str, str],
) -> str:
    n = sum(p.numel() for p in mlp(WIDTHS).parameters())

    def t(spec: str) -> str:
        return seconds(results, spec, "ms")

    lines = [
        "Command: `python benchmarks/bench_diagonal.py`  ",
        f"{THREADS} threads, float32, medians of {rounds} round-robin rounds; BackPACK "
        "works on a deep copy of the model. The general path is hesse with the layer route "
        "switched off (one Hessian column per parameter, vectorised); it and torch.func run "
        "in a process of their own, as each table group does.",
        "",
        f"### CE MLP 64-64-48-10 (Tanh), batch {BATCH}, N = {n:,}",
        "",
        "| diagonal | method | time | ratio (range over rounds) |",
        "| --- | --- | --- | --- |",
        f"| Hessian | `hesse.loss_hessian_diagonal` | {t('diag/hesse')} | 1.00× |",
        f"| Hessian | BackPACK `DiagHessian` | {t('diag/backpack')} | "
        f"hesse takes {ratio(results, 'diag/hesse', 'diag/backpack')} BackPACK's time |",
        f"| Hessian | hesse, general path | {t('diag/general')} | "
        f"{ratio(results, 'diag/general', 'diag/hesse')} of hesse's time |",
        f"| Hessian | `torch.func.hessian(...).diagonal()` by hand | {t('diag/func')} | "
        f"{ratio(results, 'diag/func', 'diag/hesse')} of hesse's time |",
        f"| GGN | `GGNOperator(...).diagonal()` | {t('ggn/hesse')} | 1.00× |",
        f"| GGN | BackPACK `DiagGGNExact` | {t('ggn/backpack')} | "
        f"hesse takes {ratio(results, 'ggn/hesse', 'ggn/backpack')} BackPACK's time |",
        f"| GGN | hesse, general path | {t('ggn/general')} | "
        f"{ratio(results, 'ggn/general', 'ggn/hesse')} of hesse's time |",
        f"| GGN, Monte-Carlo (1 sample) | `GGNOperator(...).mc_diagonal(1)` | {t('mc/hesse')} | "
        "1.00× |",
        f"| GGN, Monte-Carlo (1 sample) | BackPACK `DiagGGNMC(1)` | {t('mc/backpack')} | "
        f"hesse takes {ratio(results, 'mc/hesse', 'mc/backpack')} BackPACK's time |",
        "",
        f"In float64 hesse and BackPACK agree to a max relative difference of {agree[0]:.1e} "
        f"(Hessian) and {agree[1]:.1e} (GGN). hesse's route: one batched product per linear "
        "layer with the probes e_i in every sample (Hessian), one backward pass per column of "
        "the outputs' loss-Hessian factor for all layers at once (GGN), each layer checked on "
        "the batch first; see the [diagonals how-to](how-to/diagonals.md).",
        "",
        "### Where only some layers take the route (BackPACK's answer as it happens)",
        "",
        "| model | diagonal | hesse | general path | speed-up | BackPACK `DiagHessian` |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label, build in (
        (
            "cnn",
            "ResNet-style CNN, 2 residual blocks of 8 channels, BatchNorm (eval), batch 32",
            cnn_problem,
        ),
        ("tf", "one-block transformer, d = 16, 8 tokens, batch 32", transformer_problem),
    ):
        n_model = _params(build)
        for kind, spec in (("Hessian", key), ("GGN", f"{key}ggn")):
            lines.append(
                f"| {label}, N = {n_model:,} | {kind} | {t(spec + '/hesse')} | "
                f"{t(spec + '/general')} | {ratio(results, spec + '/general', spec + '/hesse')} | "
                f"{backpack_rows.get(key, '–') if kind == 'Hessian' else ''} |"
            )
    lines += [
        "",
        "### Models outside BackPACK's module list (float64, cross-entropy, 16 samples)",
        "",
        "| model | hesse vs `torch.autograd.functional.hessian` | BackPACK `DiagHessian` |",
        "| --- | --- | --- |",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    return "\n".join(lines)


def main() -> None:
    if child_main(SPECS, WARM):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)  # the millisecond rows vary by ±30%
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print("coverage:", flush=True)
    rows = coverage()
    agree = agreement()
    print(f"agreement (float64): Hessian {agree[0]:.1e}, GGN {agree[1]:.1e}", flush=True)
    backpack_rows = {"cnn": backpack_on(cnn_problem), "tf": backpack_on(transformer_problem)}
    print(f"BackPACK on the structured models: {backpack_rows}", flush=True)
    if args.quick:
        results = measure_times(__file__, ["quick/hesse", "quick/backpack", "quick/general"], 2)
        print({k: v.get("median_s") for k, v in results.items()})
        return
    results = {}
    for names in GROUPS.values():
        results.update(measure_times(__file__, names, args.rounds))
    table = report(results, args.rounds, agree, rows, backpack_rows)
    print("\n" + table)
    write_docs("diagonal", table)


if __name__ == "__main__":
    main()

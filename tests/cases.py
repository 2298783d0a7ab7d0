"""The case registry: small float64 models that every public function is run through.

Each case builds ``(model, inputs, target, criterion)`` from a seeded generator. Models are
tiny (N <= ~80) so that loops of ``torch.autograd.functional.hessian`` stay fast as oracles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hesse.cli._demo import MimoModel  # the seed README's model, shared with `hesse demo`

DTYPE = torch.float64


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: tuple[Tensor, ...]
    target: Tensor
    criterion: Callable[..., Tensor]
    train_mode: bool = False  # put in train mode before the call, to check it is restored
    # torch.func.vmap cannot batch the model over samples (nn.LSTM in torch 2.13): per-sample
    # functions then warn once and loop over samples.
    vmaps_samples: bool = True


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return model.to(DTYPE)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


class Embedder(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.mix = nn.Linear(3, 3)
        self.decode = nn.Linear(3, 6, bias=False)
        if tied:
            self.decode.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.decode(torch.tanh(self.mix(self.embed(ids).mean(dim=1))))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class MatrixOutput(nn.Module):
    """Per-sample output of rank 2: (B, 2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 6)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)).reshape(-1, 2, 3)


class ScalarOutput(nn.Module):
    """Per-sample scalar output, reduced over dim 1: (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)).pow(2).sum(dim=1)


def _sum_mse(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).sum()


def build_cases() -> list[Case]:
    g = _gen(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    ce = nn.CrossEntropyLoss()
    mse = nn.MSELoss()
    cases = [
        Case(
            "mlp",
            _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 1),
            (randn(5, 3),),
            randn(5, 2),
            mse,
        ),
        Case(
            "cnn",
            _init(
                nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)),
                2,
            ),
            (randn(3, 1, 5, 5),),
            torch.tensor([0, 2, 1]),
            ce,
        ),
        Case(
            "layernorm",
            _init(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)), 3),
            (randn(4, 3),),
            randn(4, 2),
            mse,
        ),
        Case("attention", _init(Attention(), 4), (randn(3, 3, 4),), randn(3, 2), mse),
        Case(
            "embedding",
            _init(Embedder(tied=False), 5),
            (torch.tensor([[0, 1, 2], [3, 4, 5], [1, 1, 0]]),),
            torch.tensor([1, 4, 0]),
            ce,
        ),
        Case(
            "tied",
            _init(Embedder(tied=True), 6),
            (torch.tensor([[0, 1, 2], [3, 4, 5], [1, 1, 0]]),),
            torch.tensor([1, 4, 0]),
            ce,
        ),
        Case(
            "batchnorm",
            _init(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)), 7),
            (randn(5, 3),),
            randn(5, 2),
            mse,
            train_mode=True,
        ),
        Case(
            "dropout",
            _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 2)), 8),
            (randn(5, 3),),
            randn(5, 2),
            mse,
            train_mode=True,
        ),
        Case(
            "lstm", _init(Recurrent(), 9), (randn(3, 4, 2),), randn(3, 2), mse, vmaps_samples=False
        ),
        Case("multi_input", _init(MimoModel(2), 10), (randn(2, 2), randn(2, 2)), randn(2, 4), mse),
        Case("multi_output", _init(MatrixOutput(), 11), (randn(3, 3),), randn(3, 2, 3), _sum_mse),
        Case("scalar_output", _init(ScalarOutput(), 12), (randn(4, 3),), randn(4), _sum_mse),
        Case(  # vmap cannot batch GroupNorm's backward over probes: the fallbacks must serve
            "groupnorm",
            _init(
                nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 2)), 13
            ),
            (randn(5, 3),),
            torch.tensor([0, 1, 1, 0, 1]),
            ce,
        ),
    ]
    # Non-trivial running statistics, so that a silent update would be seen.
    bn = cases[6].model[1]
    with torch.no_grad():
        bn.running_mean.copy_(randn(4) * 0.1)
        bn.running_var.copy_(1 + randn(4).abs())
        bn.num_batches_tracked.fill_(3)
    return cases


CASES = {c.name: c for c in build_cases()}


# --------------------------------------------------------------------------------------------
# Independent oracles: torch.autograd.functional.hessian over a tuple of parameter tensors,
# assembled into a matrix with explicit loops. Nothing here uses hesse's code.


def _named(model: nn.Module, params: list[str] | None) -> list[tuple[str, Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        return [(n, p) for n, p in named if p.requires_grad]
    return [(n, p) for n, p in named if n in params]


def _assemble(blocks: Any, sizes: list[int]) -> Tensor:
    rows = []
    for i, si in enumerate(sizes):
        rows.append(torch.cat([blocks[i][j].reshape(si, sj) for j, sj in enumerate(sizes)], 1))
    return torch.cat(rows, 0)


def oracle_hessian(
    model: nn.Module, scalar_fn: Callable[[Tensor], Tensor], params: list[str] | None = None
) -> Tensor:
    """Hessian of ``scalar_fn(model_output_fn)`` where scalar_fn maps the model to a scalar."""
    named = _named(model, params)
    names = [n for n, _ in named]
    values = tuple(p.detach().clone() for _, p in named)

    def fn(*ps: Tensor) -> Tensor:
        return scalar_fn(dict(zip(names, ps)))

    was_training = model.training
    model.eval()
    try:
        # Plain autograd: the fused attention kernels have no double backward, MATH has.
        with sdpa_kernel(SDPBackend.MATH):
            blocks = torch.autograd.functional.hessian(fn, values)
    finally:
        model.train(was_training)
    return _assemble(blocks, [v.numel() for v in values])


def oracle_loss_hessian(case: Case, params: list[str] | None = None) -> Tensor:
    def scalar(ps: dict[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(case.model, ps, case.inputs)
        return case.criterion(out, case.target)

    return oracle_hessian(case.model, scalar, params)


def oracle_model_hessian(case: Case, params: list[str] | None = None) -> Tensor:
    """(B, *O, N, N) by a loop over samples and output entries."""
    was_training = case.model.training
    case.model.eval()
    with torch.no_grad():
        out_shape = case.model(*case.inputs).shape
    case.model.train(was_training)
    b, o = out_shape[0], out_shape[1:]
    per_sample = []
    for i in range(b):
        sample = tuple(x[i : i + 1] for x in case.inputs)
        entries = []
        for k in range(int(torch.tensor(o).prod().item()) if o else 1):

            def scalar(ps: dict[str, Tensor], sample: Any = sample, k: int = k) -> Tensor:
                return torch.func.functional_call(case.model, ps, sample).reshape(-1)[k]

            entries.append(oracle_hessian(case.model, scalar, params))
        n = entries[0].shape[-1]
        per_sample.append(torch.stack(entries).reshape(*o, n, n))
    return torch.stack(per_sample)

"""Chunk planning and the memory guard."""

from __future__ import annotations

import pytest
import torch

import hesse
from hesse._memory import (
    TARGET_COLUMNS,
    MemoryBudgetError,
    activation_bytes,
    available_bytes,
    plan_chunk,
)


def _plan(monkeypatch: pytest.MonkeyPatch, available: int | None, **kw: object) -> object:
    monkeypatch.setattr("hesse._memory.available_bytes", lambda device: available)
    args = dict(
        what="f",
        n=1000,
        lead=(),
        output_shape=(1000, 1000),
        dtype=torch.float32,
        device=torch.device("cpu"),
        chunk_size=None,
        activations=lambda: 10_000,
        alternatives=[("the diagonal", 4000), ("a huge thing", 10**15), ("params", None)],
    )
    args.update(kw)
    return plan_chunk(**args)  # type: ignore[arg-type]


def test_automatic_chunk_targets_cache_sized_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(monkeypatch, 10**12)
    assert plan.chunk == TARGET_COLUMNS
    assert plan.output_bytes == 4 * 10**6
    assert _plan(monkeypatch, None).chunk == TARGET_COLUMNS  # memory unknown: no guard
    assert _plan(monkeypatch, 10**12, n=10, output_shape=(10, 10)).chunk == 10


def test_automatic_chunk_shrinks_to_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 MB output; each column costs 4*1000*3 + 4*10_000 = 52 kB; 6 MB * 0.8 leaves ~16 columns
    plan = _plan(monkeypatch, 6 * 10**6)
    assert 1 <= plan.chunk < TARGET_COLUMNS
    assert plan.output_bytes + plan.working_bytes <= 0.8 * 6 * 10**6


def test_guard_names_the_estimate_and_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    with pytest.raises(MemoryBudgetError, match=r"f: needs about 3\.8 MiB .*the diagonal") as info:
        _plan(monkeypatch, 10**6, activations=lambda: called.append(1) or 0)
    assert not called  # a hopeless call fails before measuring anything
    # Only alternatives that would fit are named; a smaller chunk cannot shrink the result.
    message = str(info.value)
    assert "the diagonal (3.9 KiB)" in message and "params" in message
    assert "a huge thing" not in message and "chunk_size" not in message
    with pytest.raises(MemoryBudgetError, match="chunk_size=1000") as info:
        _plan(monkeypatch, 5 * 10**6 + 10**6, chunk_size=5000)
    assert "a smaller chunk_size" in str(info.value)


def test_available_bytes_and_activations() -> None:
    free = available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    w = torch.randn(50, 20)
    x = torch.randn(8, 50)
    act = activation_bytes(lambda t: torch.tanh(x @ t.view(50, 20)).sum(), w.reshape(-1))
    assert act >= 8 * 20 * 4  # at least the tanh output is saved


def test_a_saved_view_counts_its_own_bytes_not_its_storage() -> None:
    # One sample x[0] of a batch (or a slice of a large dataset) holds its row only: counting
    # the whole storage charged per-sample calls B times the batch (terabytes for 80 MB).
    x = torch.randn(4000, 250)
    theta = torch.tensor(0.5)
    row = activation_bytes(lambda t: (t * x[0]).pow(2).sum(), theta, [x])
    assert row == activation_bytes(lambda t: (t * x[0].clone()).pow(2).sum(), theta, [x])
    assert row < 4 * 250 * 4  # x[0] and (t x[0]), 1 KB each
    both = activation_bytes(lambda t: (t * x[:2]).sum() * (t * x[3]).sum(), theta, [x])
    assert 4 * 250 * 4 <= both < 4 * 250 * 4 + 100  # rows 0..3 of x's storage, and scalars
    # A crop of an intermediate keeps all of it alive: that storage counts whole.
    crop = activation_bytes(lambda t: (t * (x * 2)[:1, :8]).sum(), theta, [x])
    assert crop >= 4000 * 250 * 4


def test_per_sample_hessians_of_a_large_batch_are_not_refused() -> None:
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.w * x).pow(2).sum(-1)  # one output per sample

    x = torch.randn(20000, 1000, generator=torch.Generator().manual_seed(0))  # 80 MB
    got = hesse.model_hessian_diagonal(Scale(), x)  # (B, 1): 78 KiB; was refused at 11.6 TiB
    torch.testing.assert_close(got[:, 0], 2 * x.pow(2).sum(-1), rtol=1e-5, atol=0)


def test_every_to_dense_is_guarded_before_it_allocates(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    data = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,)))
    ggn = hesse.GGNOperator(model, nn.CrossEntropyLoss(), data)
    kfac = hesse.KFACOperator(model, nn.CrossEntropyLoss(), data)
    dense = {
        "GGNOperator": ggn,
        "KFACOperator": kfac,
        "KFACInverse": kfac.inverse(1.0),
        "InverseOperator": hesse.InverseOperator(ggn, damping=1.0),
        "IdentityOperator": hesse.IdentityOperator.like(ggn),
        "LinearCombination": 0.1 * hesse.IdentityOperator.like(ggn) + ggn,
    }
    monkeypatch.setattr("hesse._memory.available_bytes", lambda device: 1000)  # 23 x 23 > 1 KB
    for name, op in dense.items():
        with pytest.raises(MemoryBudgetError, match=rf"{name}.to_dense: needs about"):
            op.to_dense()


def test_refusals_suggest_only_calls_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    model = nn.Linear(30, 20)
    x, y = torch.randn(4, 30), torch.randn(4, 20)
    monkeypatch.setattr("hesse._memory.available_bytes", lambda device: 2_000_000)
    with pytest.raises(MemoryBudgetError) as info:
        hesse.model_hessian_matrix(model, x)
    assert "(hesse.model_hessian_diagonal)" in str(info.value)
    # The dict form's blocks are planned one by one: the refusal names the block.
    with pytest.raises(MemoryBudgetError, match=r"model_hessian_dict, block 'weight': needs"):
        hesse.model_hessian_dict(model, x, diagonal_only=True)
    # No per-sample loss diagonal exists, and no diagonal gives a sharpness.
    for call in (
        lambda: hesse.per_sample_loss_hessian(model, nn.MSELoss(), x, y),
        lambda: hesse.model_sharpness(model, x),
    ):
        with pytest.raises(MemoryBudgetError) as info:
            call()
        assert "diagonal" not in str(info.value)

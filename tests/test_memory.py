"""Chunk planning and the memory guard."""

from __future__ import annotations

import pytest
import torch

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

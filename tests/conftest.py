from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from cases import CASES, Case
from torch import Tensor, nn

import hesse


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    """Relative agreement at the scale of the expected tensor (1e-10 in float64 per DESIGN)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0))


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {
            n: (p.grad, None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        },
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), f"parameter {n} changed"
    assert after["requires_grad"] == before["requires_grad"]
    for n, (obj, val) in before["grad"].items():
        now = dict(model.named_parameters())[n].grad
        assert now is obj, f".grad of {n} replaced"
        if val is not None:
            assert torch.equal(now, val), f".grad of {n} changed"
    for n, (obj, val) in before["buffers"].items():
        now = dict(model.named_buffers())[n]
        assert now is obj, f"buffer {n} replaced"
        assert torch.equal(now, val), f"buffer {n} changed"
    assert after["training"] == before["training"], "training flags changed"


@contextmanager
def state_preserved(model: nn.Module) -> Iterator[None]:
    before = snapshot(model)
    try:
        yield
    finally:
        assert_unchanged(model, before)


@contextmanager
def per_sample(case: Case) -> Iterator[None]:
    """Per-sample calls on a model vmap cannot batch over samples warn exactly once."""
    if case.vmaps_samples:
        yield
        return
    with pytest.warns(hesse.PerformanceWarning, match="loop over samples") as record:
        yield
    assert len(record) == 1


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    """A fresh copy of each registry case, with a .grad set to check it survives."""
    c = copy.deepcopy(CASES[request.param])
    c.model.train(c.train_mode)
    first = next(c.model.parameters())
    first.grad = torch.ones_like(first)
    return c

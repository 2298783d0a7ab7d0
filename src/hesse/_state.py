"""Evaluate a model in eval mode and leave it exactly as it was found."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["evaluation_mode"]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block, then restore every observable piece of state.

    Restored on success and on exception: each module's ``training`` flag, each parameter's
    ``requires_grad`` and ``.grad`` (the same tensor object), and each buffer's object and values
    (BatchNorm running statistics, ``num_batches_tracked``). Parameters are never written by hesse;
    buffers are snapshotted because a model may update them even in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    buffers = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    if any(training for _, training in flags):
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            if module.training != training:  # Module.__setattr__ is slow; skip no-ops
                module.training = training
        for p, requires_grad, grad in params:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        with torch.no_grad():
            for module, name, buf, saved in buffers:
                module._buffers[name] = buf
                if buf.shape != saved.shape:
                    buf.data = saved
                elif not torch.equal(buf, saved):
                    buf.copy_(saved)

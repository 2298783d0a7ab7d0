"""Evaluate a model in the requested mode and leave it exactly as it was found."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from hesse._compat import load_forward_ad

__all__ = ["check_training", "model_scope", "model_state"]


def check_training(training: object) -> bool:
    if not isinstance(training, bool):
        raise TypeError(
            f"training: expected True (the training-mode loss: batch statistics in BatchNorm) "
            f"or False (eval mode, the default), got {type(training).__name__} {training!r}."
        )
    return training


@contextmanager
def model_state(model: nn.Module, *, training: bool = False) -> Iterator[None]:
    """Put ``model`` in eval mode (or train mode) for the block, then restore all of its state.

    ``training=True`` puts every module in train mode except dropout, which stays off (a random
    mask would make every product a different matrix; functional dropout is switched off by
    `hesse._compat.second_order_safe`). Norm layers then normalise with the batch's statistics
    without tracking them (``track_running_stats`` is off for the block): an update of the
    running statistics or of ``num_batches_tracked`` inside a transform would fail, and would
    change the model.

    Restored on success and on exception: each module's ``training`` flag, each parameter object
    in its module's slot, each parameter's ``requires_grad``, ``.grad`` (the same tensor object)
    and values, and each buffer's object
    and values (BatchNorm running statistics, ``num_batches_tracked``). hesse never writes a
    parameter, but a model may in its forward (``nn.Embedding(max_norm=...)`` renormalises its
    weight in place), and may update buffers even in eval mode; both are snapshotted.
    """
    flags = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad, p.grad, p.detach().clone()) for p in model.parameters()]
    buffers = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    # The parameter objects in their slots: functional_call puts plain tensors there while it
    # runs and, for a module reachable under two names, does not put the Parameter back (torch
    # restores one name's slot from the other's, already swapped); restored here.
    slots = [
        (module, name, p)
        for module in model.modules(remove_duplicate=False)
        for name, p in module._parameters.items()
    ]
    tracking = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    for module, was in flags:
        wanted = training and not isinstance(module, _DropoutNd)
        if was != wanted:  # Module.__setattr__ is slow; skip no-ops
            module.training = wanted
    # Recurrent and attention layers apply dropout inside one kernel call, by their own
    # attribute, out of reach of hesse's F.dropout substitute (their training flag stays:
    # cuDNN's recurrent backward needs it).
    inner: list[tuple[nn.Module, object]] = [
        (m, m.dropout)
        for m in model.modules()
        if isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and m.dropout
    ]
    if training:
        for m in tracking:
            m.track_running_stats = False
        for layer, _ in inner:
            layer.dropout = 0.0  # type: ignore[assignment]
    try:
        yield
    finally:
        for layer, rate in inner:
            layer.dropout = rate  # type: ignore[assignment]
        for m in tracking:
            m.track_running_stats = True
        for module, was in flags:
            if module.training != was:
                module.training = was
        for module, name, slot in slots:
            if module._parameters.get(name) is not slot:
                module.__dict__.pop(name, None)
                module._parameters[name] = slot
        with torch.no_grad():
            for p, requires_grad, grad, saved in params:
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad
                if p.shape != saved.shape:
                    p.data = saved
                elif not torch.equal(p, saved):
                    p.copy_(saved)
            for module, name, buf, saved in buffers:
                module._buffers[name] = buf
                if buf.shape != saved.shape:
                    buf.data = saved
                elif not torch.equal(buf, saved):
                    buf.copy_(saved)


@contextmanager
def model_scope(model: nn.Module, *, training: bool = False) -> Iterator[None]:
    """Where hesse evaluates a model.

    Its state is restored afterwards, nothing is recorded by autograd unless a path asks for
    it, and ``torch.inference_mode`` is off (its tensors cannot take part in the derivatives
    hesse computes).
    """
    load_forward_ad()  # before any jvp: torch's own loading would warn at the user
    with torch.inference_mode(False), model_state(model, training=training), torch.no_grad():
        yield

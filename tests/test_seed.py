"""The seed README, verbatim, is the first acceptance test."""

from __future__ import annotations

import torch
from cases import MimoModel
from conftest import assert_close

import hesse


def test_seed_readme_shapes() -> None:
    torch.manual_seed(0)
    model = MimoModel(2)
    x = torch.Tensor(
        [
            [1.0, 2.0],
            [3.0, 4.0],
        ]
    )
    y = -1.0 * x
    hessian = hesse.model_hessian_matrix(model=model, inputs=(x, y))
    assert hessian.shape == (2, 4, 8, 8)
    hessian = hesse.model_hessian_matrix(model=model, inputs=(x, y), params=["A"])
    assert hessian.shape == (2, 4, 4, 4)

    criterion = torch.nn.MSELoss()
    target = torch.randn(2, 4)
    loss_hessian = hesse.loss_hessian_matrix(
        model=model,
        criterion=criterion,
        inputs=(x, y),
        target=target,
    )
    assert loss_hessian.shape == (8, 8)
    loss_hessian = hesse.loss_hessian_matrix(
        model=model,
        criterion=criterion,
        inputs=(x, y),
        target=target,
        params=["A"],
    )
    assert loss_hessian.shape == (4, 4)


def test_seed_model_closed_form() -> None:
    """Output [b, k] = tr(AᵀA) x[b, k] (k < m): its Hessian in A is 2 x[b, k] I, zero in B."""
    model = MimoModel(2).double()
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    y = -x
    h = hesse.model_hessian_matrix(model=model, inputs=(x, y))
    expected = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    for b in range(2):
        for k in range(2):
            expected[b, k, :4, :4] = 2 * x[b, k] * eye
            expected[b, 2 + k, 4:, 4:] = 2 * y[b, k] * eye
    assert_close(h, expected)
    # Largest |eigenvalue| of 2 x I is 2 |x|.
    assert_close(hesse.model_sharpness(model, (x, y)), 2 * torch.cat([x, y], 1).abs())


def test_seed_signatures_and_defaults() -> None:
    import inspect

    expected = {
        "model_hessian_matrix": "(model, inputs, params=None, diagonal_only=False, is_batch=True",
        "model_hessian_dict": "(model, inputs, params=None, diagonal_only=False, is_batch=True",
        "loss_hessian_matrix": "(model, criterion, inputs, target, params=None, "
        "diagonal_only=False",
        "loss_hessian_dict": "(model, criterion, inputs, target, params=None, diagonal_only=False",
        "model_sharpness": "(model, inputs, params=None, is_batch=True",
        "loss_sharpness": "(model, criterion, inputs, target, params=None",
    }
    for name, prefix in expected.items():
        sig = inspect.signature(getattr(hesse, name))
        text = "(" + ", ".join(
            str(p).split(":")[0] + ("" if p.default is inspect.Parameter.empty else f"={p.default}")
            for p in sig.parameters.values()
        )
        assert text.startswith(prefix), (name, text)
        assert sig.parameters["chunk_size"].kind is inspect.Parameter.KEYWORD_ONLY

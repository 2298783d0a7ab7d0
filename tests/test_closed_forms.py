"""Closed forms: linear and logistic regression, and per-sample Hessians of linear models."""

from __future__ import annotations

import torch
from conftest import assert_close
from torch import nn

import hesse

F64 = torch.float64


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_logistic_regression() -> None:
    g = _gen()
    x = torch.randn(20, 4, generator=g, dtype=F64)
    t = torch.randint(0, 2, (20, 1), generator=g).to(F64)
    model = nn.Linear(4, 1).to(F64)
    h = hesse.loss_hessian_matrix(model, nn.BCEWithLogitsLoss(), x, t)
    p = torch.sigmoid(model(x)).detach().squeeze(1)
    xt = torch.cat([x, torch.ones(20, 1, dtype=F64)], 1)  # [weight | bias] order
    expected = xt.T @ torch.diag(p * (1 - p)) @ xt / 20
    assert_close(h, expected)
    assert_close(hesse.loss_hessian_diagonal(model, nn.BCEWithLogitsLoss(), x, t), expected.diag())
    assert_close(
        hesse.loss_sharpness(model, nn.BCEWithLogitsLoss(), x, t),
        torch.linalg.eigvalsh(expected).abs().max(),
    )


def test_linear_regression_multi_output() -> None:
    g = _gen()
    x = torch.randn(10, 3, generator=g, dtype=F64)
    t = torch.randn(10, 2, generator=g, dtype=F64)
    model = nn.Linear(3, 2).to(F64)
    h = hesse.loss_hessian_dict(model, nn.MSELoss(), x, t)
    # loss = mean_{b,o} (W x_b + c - t)_o^2: d²/dW_{oi} dW_{pj} = 2/(B·O) δ_op Σ_b x_bi x_bj
    scale = 2 / (10 * 2)
    eye = torch.eye(2, dtype=F64)
    assert_close(h["weight"]["weight"], scale * torch.einsum("op,bi,bj->oipj", eye, x, x))
    assert_close(h["weight"]["bias"], scale * torch.einsum("op,bi->oip", eye, x))
    assert_close(h["bias"]["bias"], scale * 10 * eye)


def test_model_hessian_of_a_linear_model_is_zero() -> None:
    model = nn.Linear(3, 2).to(F64)
    x = torch.randn(4, 3, generator=_gen(), dtype=F64)
    h = hesse.model_hessian_matrix(model, x)
    assert h.shape == (4, 2, 8, 8)
    assert torch.count_nonzero(h) == 0
    assert torch.count_nonzero(hesse.model_sharpness(model, x)) == 0


def test_sharpness_for_one_and_two_parameters() -> None:
    class Tiny(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.arange(1.0, n + 1, dtype=F64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # f = x0 w0² - 3 w0 w1 (n=2): Hessian [[2 x0, -3], [-3, 0]]
            out = x[:, 0] * self.w[0] ** 2
            if self.w.numel() == 2:
                out = out - 3 * self.w[0] * self.w[1]
            return out

    x = torch.tensor([[-2.5], [0.5]], dtype=F64)
    assert_close(hesse.model_sharpness(Tiny(1), x), torch.tensor([5.0, 1.0], dtype=F64))
    two = hesse.model_sharpness(Tiny(2), x)
    expected = torch.stack(
        [
            torch.linalg.eigvalsh(torch.tensor([[2 * v, -3.0], [-3.0, 0.0]], dtype=F64)).abs().max()
            for v in (-2.5, 0.5)
        ]
    )
    assert_close(two, expected)  # the negative eigenvalue dominates for x0 = -2.5


def test_per_sample_loss_hessian_closed_form() -> None:
    g = _gen()
    x = torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.randn(5, 1, generator=g, dtype=F64)
    model = nn.Linear(3, 1, bias=False).to(F64)
    each = hesse.per_sample_loss_hessian(model, nn.MSELoss(), x, t)
    assert_close(each, 2 * torch.einsum("bi,bj->bij", x, x))  # MSE of one scalar: 2 x xᵀ

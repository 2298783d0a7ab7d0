"""Parameter selection and the layout that maps blocks to rows."""

from __future__ import annotations

import pytest
import torch
from cases import Embedder
from conftest import assert_close
from torch import nn

import hesse
from hesse._layout import select_parameters


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(2, 3), nn.Tanh()),  # "0.0.*"
        nn.Linear(3, 2),  # "1.*"
    ).double()


def test_none_selects_trainable_in_module_order() -> None:
    net = _net()
    net[0][0].bias.requires_grad_(False)
    names = [n for n, _ in select_parameters(net)]
    assert names == ["0.0.weight", "1.weight", "1.bias"]


def test_patterns_names_and_single_string() -> None:
    net = _net()
    assert [n for n, _ in select_parameters(net, "1.*")] == ["1.weight", "1.bias"]
    assert [n for n, _ in select_parameters(net, "1.bias")] == ["1.bias"]
    # Order follows the model, not the request; duplicates collapse.
    got = [n for n, _ in select_parameters(net, ["1.bias", "0.*", "1.bias"])]
    assert got == ["0.0.weight", "0.0.bias", "1.bias"]


def test_frozen_named_explicitly_is_included_but_not_by_pattern() -> None:
    net = _net()
    net[1].weight.requires_grad_(False)
    assert [n for n, _ in select_parameters(net, "1.*")] == ["1.bias"]
    assert [n for n, _ in select_parameters(net, ["1.weight"])] == ["1.weight"]
    # The Hessian with respect to a frozen parameter is still computed, and requires_grad stays.
    x = torch.randn(4, 2, dtype=torch.float64)
    h = hesse.loss_hessian_matrix(
        net, nn.MSELoss(), x, torch.zeros(4, 2, dtype=torch.float64), params="1.weight"
    )
    assert h.shape == (6, 6) and h.abs().sum() > 0
    assert not net[1].weight.requires_grad


def test_tied_weights_count_once_with_the_correct_hessian() -> None:
    tied = Embedder(tied=True).double()
    untied = Embedder(tied=False).double()
    untied.load_state_dict(
        {**tied.state_dict(), "decode.weight": tied.embed.weight.detach().clone()}
    )
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 1, 0]])
    target = torch.tensor([1, 4, 0])
    ce = nn.CrossEntropyLoss()
    layout = hesse.ParamLayout.from_module(tied)
    assert layout.names == ("embed.weight", "mix.weight", "mix.bias")
    h = hesse.loss_hessian_matrix(tied, ce, ids, target)
    # Independent oracle: the untied model's Hessian, with the two copies' rows and columns
    # added (chain rule for W_embed = W_decode = W).
    names = ["embed.weight", "mix.weight", "mix.bias", "decode.weight"]
    hu = hesse.loss_hessian_matrix(untied, ce, ids, target, params=names)
    ul = hesse.ParamLayout.from_module(untied, names)
    e, d = ul.slice("embed.weight"), ul.slice("decode.weight")
    rest = slice(e.stop, d.start)
    fold = torch.zeros(hu.shape[0], layout.numel, dtype=torch.float64)
    eye = torch.eye(18, dtype=torch.float64)
    fold[e, :18] = eye
    fold[d, :18] = eye
    fold[rest, 18:] = torch.eye(rest.stop - rest.start, dtype=torch.float64)
    assert_close(h, fold.T @ hu @ fold)
    # The alias selects its canonical parameter.
    alias = hesse.loss_hessian_matrix(tied, ce, ids, target, params=["decode.weight"])
    assert_close(alias, h[:18, :18])


def test_layout_flatten_unflatten_roundtrip() -> None:
    net = _net()
    layout = hesse.ParamLayout.from_module(net)
    theta = layout.gather(net)
    parts = layout.unflatten(theta)
    assert [tuple(v.shape) for v in parts.values()] == [tuple(s) for s in layout.shapes]
    assert torch.equal(layout.flatten(parts), theta)
    assert layout.offsets == (0, 6, 9, 15)
    assert layout.restrict(["1.bias", "0.0.weight"]).names == ("0.0.weight", "1.bias")


def test_mixed_dtypes_are_rejected() -> None:
    net = _net()
    net[1].float()
    with pytest.raises(ValueError, match="share one dtype"):
        hesse.ParamLayout.from_module(net)

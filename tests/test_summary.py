"""``block_summary``: per-parameter and per-module blocks against dense float64 references."""

from __future__ import annotations

import copy
import dataclasses
import io
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch
from cases import CASES, oracle_loss_hessian
from conftest import state_preserved
from torch import Tensor, nn

import hesse
from hesse._distributed import Shard
from hesse._protocol import Operator
from hesse._summary import BlockRow, BlockSummary, block_summary

DTYPE = torch.float64


def _problem(hidden: int = 16) -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    """An MLP 20-hidden-3 (CE): with hidden = 16 the first weight has 320 > 256 entries, so
    its block goes through Lanczos (and Hutch++ without a diagonal), the others densely."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 20, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.fixture(scope="module")
def mlp() -> tuple[hesse.HessianOperator, Tensor]:
    model, criterion, data = _problem()
    op = hesse.HessianOperator(model, criterion, data)
    return op, op.to_dense()


class NoDiagonal(Operator):
    """An operator over parameters with products only: no exact ``diagonal()``."""

    def __init__(self, op: hesse.CurvatureOperator) -> None:
        self.op, self.layout = op, op.layout

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def shard(self) -> Shard:
        return self.op.shard

    def session(self) -> AbstractContextManager[None]:
        return self.op.session()

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.op @ v


def _block(dense: Tensor, layout: hesse.ParamLayout, names: tuple[str, ...]) -> Tensor:
    index = torch.cat([torch.arange(layout.numel)[layout.slice(n)] for n in names])
    return dense[index][:, index]


def _check_against_dense(summary: BlockSummary, dense: Tensor, layout: hesse.ParamLayout) -> None:
    for row in summary:
        block = _block(dense, layout, row.params)
        assert row.numel == block.shape[0]
        assert row.trace_exact and row.trace_stderr == 0.0
        assert row.trace == pytest.approx(block.trace().item(), rel=1e-10, abs=1e-12)
        top = torch.linalg.eigvalsh(block)[-1].item()
        assert row.converged
        # Dense blocks exactly; Lanczos (the 320-entry block) to its default accuracy.
        assert row.top_eigenvalue == pytest.approx(top, rel=1e-7 if row.numel > 256 else 1e-10)
    assert summary.total_trace == pytest.approx(dense.trace().item(), rel=1e-10)
    assert sum(row.trace for row in summary) == pytest.approx(summary.total_trace, rel=1e-12)
    assert summary.total_stderr == 0.0


def test_blocks_per_parameter_match_the_dense_hessian(
    mlp: tuple[hesse.HessianOperator, Tensor],
) -> None:
    op, dense = mlp
    summary = block_summary(op, seed=0)
    assert summary.by == "parameter" and len(summary) == 4
    assert [r.name for r in summary] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [r.params for r in summary] == [(n,) for n in op.layout.names]
    assert [r.numel for r in summary] == [320, 16, 48, 3]
    _check_against_dense(summary, dense, op.layout)
    # Dense blocks cost one product per entry; the Lanczos block far fewer than its 320.
    assert [r.num_matvecs for r in summary][1:] == [16, 48, 3]
    assert 0 < summary["0.weight"].num_matvecs < 100
    assert summary.num_matvecs == sum(r.num_matvecs for r in summary)
    # The block's top eigenvalue is at most the operator's (interlacing).
    assert max(r.top_eigenvalue for r in summary) <= torch.linalg.eigvalsh(dense)[-1] + 1e-10


def test_blocks_per_module_match_the_dense_hessian(
    mlp: tuple[hesse.HessianOperator, Tensor],
) -> None:
    op, dense = mlp
    summary = block_summary(op, by="module", seed=0)
    assert summary.by == "module"
    assert [(r.name, r.params, r.numel) for r in summary] == [
        ("0", ("0.weight", "0.bias"), 336),
        ("2", ("2.weight", "2.bias"), 51),
    ]
    _check_against_dense(summary, dense, op.layout)
    assert summary["2"].trace_per_numel == pytest.approx(summary["2"].trace / 51)


def test_against_autograd_on_a_nested_model() -> None:
    """Module paths of a nested model (attention inside a wrapper), against
    torch.autograd.functional.hessian; the GGN and a parameter subset too."""
    case = copy.deepcopy(CASES["attention"])
    h = hesse.HessianOperator(case.model, case.criterion, (case.inputs, case.target))
    summary = block_summary(h, by="module", seed=0)
    assert [(r.name, r.params) for r in summary] == [
        ("attn", ("attn.in_proj_weight", "attn.in_proj_bias")),
        ("attn.out_proj", ("attn.out_proj.weight", "attn.out_proj.bias")),
        ("head", ("head.weight", "head.bias")),
    ]
    _check_against_dense(summary, oracle_loss_hessian(case), h.layout)

    params = ["attn.out_proj.bias", "head.weight"]
    subset = hesse.HessianOperator(case.model, case.criterion, (case.inputs, case.target), params)
    rows = block_summary(subset, by="module", seed=0).rows
    assert [(r.name, r.params) for r in rows] == [
        ("attn.out_proj", ("attn.out_proj.bias",)),
        ("head", ("head.weight",)),
    ]
    _check_against_dense(
        block_summary(subset, by="module"), oracle_loss_hessian(case, params), subset.layout
    )

    ggn = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
    _check_against_dense(block_summary(ggn, by="parameter", seed=0), ggn.to_dense(), ggn.layout)


def test_root_parameters_and_tied_weights() -> None:
    """Parameters of the root module form a row named "" (its path in named_modules()); a
    tied weight counts once, under its first name."""
    mimo = copy.deepcopy(CASES["multi_input"])
    op = hesse.HessianOperator(mimo.model, mimo.criterion, (mimo.inputs, mimo.target))
    summary = block_summary(op, by="module")
    assert [(r.name, r.params) for r in summary] == [("", ("A", "B"))]
    assert summary.table().splitlines()[1].startswith("(root) ")
    _check_against_dense(summary, op.to_dense(), op.layout)

    tied = copy.deepcopy(CASES["tied"])
    op = hesse.HessianOperator(tied.model, tied.criterion, (tied.inputs, tied.target))
    rows = block_summary(op, by="module").rows
    assert [(r.name, r.params) for r in rows] == [
        ("embed", ("embed.weight",)),
        ("mix", ("mix.weight", "mix.bias")),
    ]


def test_without_an_exact_diagonal_large_blocks_are_estimated(
    mlp: tuple[hesse.HessianOperator, Tensor],
) -> None:
    """Hutch++ on the 320-entry block, within 4 standard errors; the blocks of at most 256
    entries exact from their dense block; a budget of 320 products exact again."""
    op, dense = mlp
    layout = op.layout
    combination = op + NoDiagonal(op) - NoDiagonal(op)  # = op, but without a diagonal
    with pytest.raises(NotImplementedError):
        combination.diagonal()  # what block_summary catches
    assert not hasattr(NoDiagonal(op), "diagonal")
    for a in (NoDiagonal(op), combination):
        summary = block_summary(a, seed=1)
        big = summary["0.weight"]
        exact = _block(dense, layout, ("0.weight",)).trace().item()
        assert not big.trace_exact and big.trace_stderr > 0
        assert abs(big.trace - exact) < 4 * big.trace_stderr
        for row in summary.rows[1:]:
            assert row.trace_exact and row.trace_stderr == 0.0
            assert row.trace == pytest.approx(
                _block(dense, layout, row.params).trace().item(), rel=1e-10
            )
        assert summary.total_stderr == pytest.approx(big.trace_stderr)
        assert summary.total_trace == pytest.approx(sum(r.trace for r in summary), rel=1e-12)
        assert "± " in summary.table().splitlines()[1]
    # Reproducible from the seed, and a generator works as well.
    again = block_summary(NoDiagonal(op), seed=1)
    assert again == block_summary(NoDiagonal(op), seed=torch.Generator().manual_seed(1))
    assert again["0.weight"].trace == block_summary(NoDiagonal(op), seed=1)["0.weight"].trace
    # A budget that reaches the block's size: its exact trace.
    full = block_summary(NoDiagonal(op), num_matvecs=320, seed=0)["0.weight"]
    assert full.trace_exact and full.trace_stderr == 0.0
    assert full.trace == pytest.approx(exact, rel=1e-10)


def test_a_parameter_with_no_entries_gets_a_row() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, dtype=DTYPE)))
    x = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    op = hesse.HessianOperator(model, nn.MSELoss(), (x, torch.zeros(4, 2, dtype=DTYPE)))
    assert op.layout.names[0] == "empty"
    summary = block_summary(NoDiagonal(op), by="module", seed=0)
    assert [(r.name, r.numel) for r in summary] == [("", 0), ("0", 8), ("2", 6)]
    empty = summary[""]
    assert empty.trace == 0.0 and empty.trace_exact and empty.num_matvecs == 0
    assert torch.isnan(torch.tensor([empty.top_eigenvalue, empty.trace_per_numel])).all()
    _check_against_dense(
        BlockSummary(summary.rows[1:], "module", summary.total_trace, 0.0, 0),
        op.to_dense(),
        op.layout,
    )
    assert "(root)" in summary.table()


def test_one_session_for_the_whole_summary(
    mlp: tuple[hesse.HessianOperator, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parameters are resolved once (one outermost session): every product reuses it."""
    op, _ = mlp
    calls = []
    resolve = op._resolve_parameters

    def counting() -> dict[str, Tensor]:
        calls.append(1)
        return resolve()

    monkeypatch.setattr(op, "_resolve_parameters", counting)
    for a in (op, NoDiagonal(op)):
        calls.clear()
        block_summary(a, by="module", seed=0)
        assert len(calls) == 1


def test_model_state_is_preserved() -> None:
    case = copy.deepcopy(CASES["batchnorm"])  # in train mode, with running statistics
    case.model.train(case.train_mode)
    first = next(case.model.parameters())
    first.grad = torch.ones_like(first)
    op = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
    with state_preserved(case.model):
        block_summary(op, by="module", seed=0)
        block_summary(NoDiagonal(op), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"by": "layer"}, ValueError, r"by: expected 'parameter' .* or 'module'"),
        ({"by": None}, ValueError, "by: expected"),
        ({"seed": "0"}, TypeError, "seed: expected an int"),
        ({"seed": 1.5}, TypeError, "seed: expected an int"),
        ({"num_matvecs": 2}, ValueError, "num_matvecs: expected an int >= 3"),
        ({"num_matvecs": 3.0}, TypeError, "num_matvecs: expected an int"),
    ],
)
def test_bad_arguments(
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
    mlp: tuple[hesse.HessianOperator, Tensor],
) -> None:
    with pytest.raises(error, match=match):
        block_summary(mlp[0], **kwargs)


def test_operators_without_a_layout_are_refused(
    mlp: tuple[hesse.HessianOperator, Tensor],
) -> None:
    op, dense = mlp
    with pytest.raises(TypeError, match="A: expected an operator over parameters"):
        block_summary(dense)
    with pytest.raises(TypeError, match="got list"):
        block_summary([[1.0]])
    identity = hesse.IdentityOperator(3, dtype=DTYPE)
    with pytest.raises(TypeError, match=r"knows its parameter layout .* has none"):
        block_summary(identity)
    with pytest.raises(TypeError, match="knows its parameter layout"):
        block_summary(2 * identity)
    # A sum with a part over parameters knows the layout: it works, exactly.
    damped = op + 0.5 * hesse.IdentityOperator.like(op)
    summary = block_summary(damped, seed=0)
    assert summary["0.bias"].trace == pytest.approx(
        _block(dense, op.layout, ("0.bias",)).trace().item() + 0.5 * 16, rel=1e-10
    )
    wrong = NoDiagonal(op)
    wrong.layout = op.layout.restrict(["0.bias"])
    with pytest.raises(ValueError, match="its layout has 16 entries but the operator is 387"):
        block_summary(wrong)


def test_results_are_frozen_and_table_lists_every_row(
    mlp: tuple[hesse.HessianOperator, Tensor],
) -> None:
    summary = block_summary(mlp[0], by="module", seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.by = "parameter"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.rows[0].trace = 0.0  # type: ignore[misc]
    assert isinstance(summary.rows, tuple) and isinstance(summary.rows[0], BlockRow)
    with pytest.raises(KeyError, match="'nope': no such row; rows are"):
        summary["nope"]
    lines = summary.table().splitlines()
    header = "name numel trace ± stderr trace/numel top eigenvalue"
    assert lines[0].split() == header.split()
    assert [line.split()[0] for line in lines[1:]] == ["0", "2", "total"]
    assert f"{summary['0'].top_eigenvalue:.6e}" in lines[1]
    assert f"{summary.total_trace:.6e}" in lines[-1] and "±" not in "".join(lines[1:])


def test_per_layer_figure_draws_estimates_and_negative_values(tmp_path: Any) -> None:
    """Error bars for estimated traces; negative values (linear axes); a log axis; NaN."""
    pytest.importorskip("matplotlib")
    from hesse.cli._figures import per_layer_bars

    def row(name: str, trace: float, stderr: float, top: float) -> BlockRow:
        return BlockRow(name, (name,), 10, trace, stderr, stderr == 0, top, True, 10)

    rows = (row("a", -0.5, 0.1, 2.0), row("b", 300.0, 0.0, 1e-3), row("", 1.0, 0.0, -1.0))
    empty = BlockRow("e", ("e",), 0, 0.0, 0.0, True, float("nan"), True, 0)  # no entries
    for summary in (
        BlockSummary(rows, "module", 300.5, 0.1, 30),  # signs differ: linear, error bars
        BlockSummary((*rows[1:2], empty), "module", 300.0, 0.0, 10),  # a log axis, NaN
    ):
        buffer = io.BytesIO()
        per_layer_bars(summary, buffer, "title")
        assert buffer.getvalue()[:4] == b"\x89PNG"

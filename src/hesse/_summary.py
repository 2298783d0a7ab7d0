"""Per-parameter and per-module curvature: one row per block of the parameter layout.

`block_summary` restricts an operator over parameters to the diagonal block of each parameter
tensor (or of each module's parameters together), ``Aᵦ = Pᵦᵀ A Pᵦ`` with ``Pᵦ`` the columns of
the identity that select the block, and reports its trace and its largest eigenvalue. The
block is never formed for large blocks: a product ``Aᵦ @ V`` zero-pads ``V`` to the full
length, takes one product with ``A`` and keeps the block's rows. All products of one call run
inside one ``A.session()``, so an operator's kept gradient graph serves every block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hesse._distributed import Shard
from hesse._layout import ParamLayout
from hesse._memory import TARGET_COLUMNS
from hesse._protocol import Operator, SymmetricOperator
from hesse._spectral import DENSE_LIMIT, Seed, _generator, _linear, eigsh, trace
from hesse._validate import check_seed, integer

__all__ = ["BlockRow", "BlockSummary", "block_summary"]

_BY = ("parameter", "module")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockRow:
    """The curvature of one block: a parameter tensor, or the parameters of one module.

    Attributes:
        name: The parameter's name as in ``model.named_parameters()`` (``by="parameter"``), or
            the module's path as in ``model.named_modules()`` (``by="module"``: ``"0"``,
            ``"encoder.layer.0.attn"``; ``""`` for parameters of the root module itself).
        params: The names of the parameters in the block, in layout order.
        numel: Entries of the block: its side length.
        trace: The block's trace, exact or a Hutch++ estimate (see ``trace_exact``).
        trace_stderr: The standard error of ``trace``; 0.0 when it is exact.
        trace_exact: Whether ``trace`` is exact (from the operator's exact diagonal, or from
            the dense block when it has at most 256 entries) rather than estimated.
        top_eigenvalue: The block's largest algebraic eigenvalue: exact from the dense block
            up to 256 entries, by Lanczos above (NaN for a parameter with no entries).
        converged: Whether ``top_eigenvalue`` met Lanczos's stopping rule (always true for a
            block solved densely).
        num_matvecs: Products with the operator spent on this block (columns of ``A @ V``).
    """

    name: str
    params: tuple[str, ...]
    numel: int
    trace: float
    trace_stderr: float
    trace_exact: bool
    top_eigenvalue: float
    converged: bool
    num_matvecs: int

    @property
    def trace_per_numel(self) -> float:
        """``trace / numel``: the block's mean eigenvalue, comparable across block sizes.

        NaN for a parameter with no entries.
        """
        return self.trace / self.numel if self.numel else math.nan


@dataclass(frozen=True)
class BlockSummary:
    """`block_summary`'s result: one `BlockRow` per block, in layout order.

    Iterating over it gives the rows; ``summary["0.weight"]`` finds a row by name.

    Attributes:
        rows: The blocks, in the order of the operator's parameter layout.
        by: ``"parameter"`` or ``"module"``: what a block is.
        total_trace: The sum of the blocks' traces: the operator's trace.
        total_stderr: Its standard error (the blocks' estimates are independent); 0.0 when
            every block's trace is exact.
        num_matvecs: Products with the operator spent on all blocks (columns of ``A @ V``),
            besides one ``A.diagonal()`` call when the operator has an exact diagonal.
    """

    rows: tuple[BlockRow, ...]
    by: str
    total_trace: float
    total_stderr: float
    num_matvecs: int

    def __iter__(self) -> Iterator[BlockRow]:
        """The rows, in layout order."""
        return iter(self.rows)

    def __len__(self) -> int:
        """The number of rows."""
        return len(self.rows)

    def __getitem__(self, name: str) -> BlockRow:
        """The row named ``name``.

        Raises:
            KeyError: No row has that name.
        """
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{name!r}: no such row; rows are {[r.name for r in self.rows]}")

    def table(self) -> str:
        """The rows as a text table: name, numel, trace, ± stderr, trace/numel, top eigenvalue.

        Returns:
            Lines joined by newlines, a header first and a total last. An exact trace has
            no ``±``; a top eigenvalue that did not converge is marked ``(not converged)``.
        """
        names = [_display(row.name) for row in self.rows]
        width = max(len("name"), len("total"), *(len(n) for n in names))
        header = (
            f"{'name':<{width}}  {'numel':>10}  {'trace':>13}  {'± stderr':>9}  "
            f"{'trace/numel':>12}  {'top eigenvalue':>14}"
        )
        lines = [header]
        for name, row in zip(names, self.rows):
            lines.append(
                _line(name, width, row.numel, row.trace, row.trace_stderr, row.trace_exact)
                + f"  {row.top_eigenvalue:>14.6e}"
                + ("" if row.converged else "  (not converged)")
            )
        numel = sum(row.numel for row in self.rows)
        exact = all(row.trace_exact for row in self.rows)
        lines.append(_line("total", width, numel, self.total_trace, self.total_stderr, exact))
        return "\n".join(lines)


def _display(name: str) -> str:
    return name if name else "(root)"


def _line(name: str, width: int, numel: int, value: float, stderr: float, exact: bool) -> str:
    error = "" if exact else f"± {stderr:.1e}"
    per_entry = value / numel if numel else math.nan
    return f"{name:<{width}}  {numel:>10,}  {value:>13.6e}  {error:>9}  {per_entry:>12.4e}"


class _Block(Operator):
    """``Pᵀ A P``: the diagonal block of ``A`` on the flat indices ``index``.

    ``(n,)`` or ``(n, K)`` in, zero-padded to ``(N, K)``, one product with ``A``, the block's
    rows out. It shares ``A``'s sessions (the kept graph) and shard (common random draws
    under ``torch.distributed``), and counts the columns it multiplies.
    """

    def __init__(self, a: Any, index: Tensor | slice, numel: int) -> None:
        self.a, self.index, self.numel = a, index, numel
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.numel, self.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self.a.device)

    @property
    def shard(self) -> Shard:
        shard = getattr(self.a, "shard", None)
        return shard if isinstance(shard, Shard) else Shard()

    def session(self) -> AbstractContextManager[Any]:
        return _session(self.a)

    def __matmul__(self, other: Any) -> Tensor:
        matrix = other if other.ndim == 2 else other[:, None]
        padded = matrix.new_zeros(self.a.shape[0], matrix.shape[1])
        padded[self.index] = matrix
        out = (self.a @ padded)[self.index]
        self.num_matvecs += matrix.shape[1]
        return out if other.ndim == 2 else out[:, 0]

    def to_dense(self) -> Tensor:
        """The ``(n, n)`` block from identity columns, a chunk of columns per product.

        The padded columns ``(N, chunk)`` stay small next to ``N``.
        """
        out = torch.empty(self.numel, self.numel, dtype=self.dtype, device=self.device)
        with self.session():
            for start in range(0, self.numel, TARGET_COLUMNS):
                stop = min(start + TARGET_COLUMNS, self.numel)
                eye = torch.zeros(self.numel, stop - start, dtype=self.dtype, device=self.device)
                eye[start:stop] = torch.eye(stop - start, dtype=self.dtype, device=self.device)
                out[:, start:stop] = self @ eye
        return out


def _session(a: Any) -> AbstractContextManager[Any]:
    session = getattr(a, "session", None)
    return session() if callable(session) else nullcontext()


def _blocks(layout: ParamLayout, by: str) -> list[tuple[str, list[int]]]:
    """``(row name, indices of its parameters in the layout)``, in layout order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(layout.names):
        key = name if by == "parameter" else name.rpartition(".")[0]
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def _index(layout: ParamLayout, members: list[int]) -> Tensor | slice:
    """The flat rows of the parameters ``members``: a slice when they are contiguous."""
    ranges = [(layout.offsets[i], layout.offsets[i] + layout.numels[i]) for i in members]
    if all(ranges[j][1] == ranges[j + 1][0] for j in range(len(ranges) - 1)):
        return slice(ranges[0][0], ranges[-1][1])
    return torch.cat([torch.arange(lo, hi, device=layout.device) for lo, hi in ranges])


def _exact_diagonal(a: Any) -> Tensor | None:
    """``A.diagonal()`` when ``A`` has an exact one (a sum with a part lacking one: None)."""
    exact = getattr(a, "diagonal", None)
    if not callable(exact):
        return None
    with suppress(NotImplementedError):
        return exact()
    return None


def block_summary(
    A: Any,  # noqa: N803
    *,
    by: Literal["parameter", "module"] = "parameter",
    num_matvecs: int = 30,
    seed: Seed = None,
) -> BlockSummary:
    r"""Trace and top eigenvalue of each diagonal block of ``A``: per parameter or per module.

    A block is the square sub-matrix $A_b = P_b^\top A P_b$ of the rows and columns of one
    parameter tensor (``by="parameter"``), or of all parameters of one module together
    (``by="module"``: a linear layer's weight and bias). Its trace sums the curvature of the
    block's entries; ``trace / numel`` compares blocks of different sizes; its largest
    eigenvalue is the sharpest direction inside the block (at most the largest eigenvalue of
    ``A``, by interlacing).

    - ``trace``: exact when ``A`` has an exact ``diagonal()`` (one call for all blocks; hesse's
      operators and sums of them), else exact from the dense block up to 256 entries, else a
      Hutch++ estimate from ``num_matvecs`` products with its standard error.
    - ``top_eigenvalue``: blocks of at most 256 entries are formed (one product per entry,
      vectorised) and solved exactly; larger ones by Lanczos (`eigsh` with ``which="LA"``)
      on products with the block.

    A product with a block is one product with ``A`` of a zero-padded vector. Every product
    runs inside one ``A.session()``, so a one-batch operator keeps its gradient graph for the
    whole summary. The blocks' traces add up to the trace of ``A``.

    Args:
        A: An operator that knows its parameter layout: a `HessianOperator`,
            `GGNOperator`, `EmpiricalFisherOperator`, a sum of them (``G + λ * I``), or any
            object of the operator protocol (`SymmetricOperator`) with a ``layout`` attribute
            that is a `ParamLayout` of its size.
        by: ``"parameter"``: one row per parameter tensor, named as in
            ``model.named_parameters()``. ``"module"``: one row per module owning selected
            parameters, named by its path as in ``model.named_modules()`` (the parameter name
            without its last component: ``"0"``, ``"encoder.layer.0.attn"``; ``""`` for the
            root module's own parameters).
        num_matvecs: Products per Hutch++ trace estimate, at least 3; used only for blocks
            of more than 256 entries of an operator without an exact diagonal (a budget that
            reaches the block's size gives its exact trace). With 3, Hutch++ has one probe
            left for its residual, and such a block's ``trace_stderr`` (and the total's) is
            NaN, as `trace` reports it; 4 or more give a standard error.
        seed: An int or a ``torch.Generator`` for the random vectors (Lanczos start vectors,
            Hutch++ probes); ``None`` draws a seed from torch's global generator.

    Returns:
        A `BlockSummary`: ``rows`` in layout order, each a `BlockRow` with ``name``,
        ``params``, ``numel``, ``trace``, ``trace_stderr`` (0.0 when exact), ``trace_exact``,
        ``top_eigenvalue``, ``converged`` and ``num_matvecs``; ``total_trace``,
        ``total_stderr`` and the products spent, ``num_matvecs``. ``summary.table()`` formats
        it as text.

    Raises:
        TypeError: ``A`` is not an operator of the protocol or has no ``layout`` (a dense
            tensor, an operator without parameters); ``seed`` is not an int, a generator or
            None; ``num_matvecs`` is not an int.
        ValueError: ``by`` is not ``"parameter"`` or ``"module"``; ``A.layout`` does not
            match ``A``'s size; ``num_matvecs`` is below 3; ``A`` itself refuses a product
            (a parameter changed, see `CurvatureOperator.session`).

    Examples:
        For least squares $\sum_i (w \cdot x_i + b - y_i)^2$ the Hessian is
        $2\,[X^\top X,\ X^\top 1;\ 1^\top X,\ B]$: here the weight block is
        $\operatorname{diag}(2, 8)$ and the bias block $2B = 4$:

        >>> import hesse
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1)).double()
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> H = hesse.HessianOperator(model, torch.nn.MSELoss(reduction="sum"), (X, y))
        >>> summary = block_summary(H)
        >>> [(r.name, r.numel, round(r.trace, 8), round(r.top_eigenvalue, 8)) for r in summary]
        [('0.weight', 2, 10.0, 8.0), ('0.bias', 1, 4.0, 4.0)]

        Per module, the weight and bias of layer ``"0"`` form one block of trace 10 + 4:

        >>> row = block_summary(H, by="module")["0"]
        >>> row.params, round(row.trace, 8), row.trace_exact
        (('0.weight', '0.bias'), 14.0, True)
    """
    if not isinstance(A, SymmetricOperator) or isinstance(A, Tensor):
        raise TypeError(
            "A: expected an operator over parameters (hesse.HessianOperator, GGNOperator, "
            f"EmpiricalFisherOperator or a sum of them), got {type(A).__name__}; a dense "
            "matrix has no parameter layout to split into blocks."
        )
    layout = getattr(A, "layout", None)
    if not isinstance(layout, ParamLayout):
        raise TypeError(
            f"A: block_summary needs an operator that knows its parameter layout (an A.layout "
            f"that is a hesse.ParamLayout, as hesse's curvature operators have); "
            f"{type(A).__name__} has {'none' if layout is None else type(layout).__name__}. "
            "Build the operator with hesse.HessianOperator(model, criterion, data), or set "
            "A.layout = hesse.ParamLayout.from_module(model)."
        )
    if not isinstance(by, str) or by not in _BY:
        raise ValueError(
            f"by: expected 'parameter' (one row per parameter tensor) or 'module' (one row "
            f"per module), got {by!r}."
        )
    m = integer("num_matvecs", num_matvecs, 3)
    seed = check_seed(seed)
    lin = _linear(A)
    if lin.n != layout.numel:
        raise ValueError(
            f"A: its layout has {layout.numel} entries but the operator is {lin.n} x {lin.n}; "
            "the layout must describe the operator's rows."
        )
    work = torch.float32 if A.dtype in _HALF else A.dtype
    g = _generator(seed, lin)
    rows = []
    with _session(A):
        diagonal = _exact_diagonal(A)
        for name, members in _blocks(layout, by):
            numel = sum(layout.numels[i] for i in members)
            index = _index(layout, members)
            block = _Block(A, index, numel)
            if numel <= DENSE_LIMIT:  # formed: an exact eigenvalue, and an exact trace
                dense = block.to_dense().to(work)
                values = torch.linalg.eigvalsh((dense + dense.mT) / 2)
                top = values[-1] if numel else torch.tensor(math.nan)
                value, stderr, exact, converged = dense.diagonal().sum(), 0.0, True, True
            else:
                result = eigsh(block, k=1, which="LA", seed=g)
                top, converged = result.eigenvalues[-1], bool(result.converged.all())
                if diagonal is None:
                    estimate = trace(block, num_matvecs=m, seed=g)  # exact if m >= numel
                    value, stderr, exact = estimate.estimate, float(estimate.stderr), m >= numel
            if diagonal is not None:  # the blocks' traces add up to diagonal.sum()
                value, stderr, exact = diagonal[index].to(work).sum(), 0.0, True
            rows.append(
                BlockRow(
                    name=name,
                    params=tuple(layout.names[i] for i in members),
                    numel=numel,
                    trace=float(value),
                    trace_stderr=stderr,
                    trace_exact=exact,
                    top_eigenvalue=float(top),
                    converged=converged,
                    num_matvecs=block.num_matvecs,
                )
            )
    return BlockSummary(
        rows=tuple(rows),
        by=by,
        total_trace=math.fsum(row.trace for row in rows),
        total_stderr=math.sqrt(math.fsum(row.trace_stderr**2 for row in rows)),
        num_matvecs=sum(row.num_matvecs for row in rows),
    )

"""``hesse analyze FILE.py:FUNC``: the curvature of a user's own model, loss and data.

``FUNC()`` returns ``(model, criterion, data)``; the command builds the requested operator over
``data``, runs the spectral tools on it with one progress bar per step, prints a report and
writes ``report.json`` and figures (their paths in it relative to ``--out``). At N <= 256 the
dense matrix is built once (N products) and every analysis runs on it: the eigenvalues, the
trace, the density and the per-layer blocks are then exact. ``--out`` is checked before
anything is imported, and filled all at once (`hesse.cli._output`). Under ``torchrun`` it
joins the process group before calling ``FUNC`` (which then gives each rank its shard), the
operator all-reduces its products, and only rank 0 prints and writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

import hesse
from hesse._distributed import Shard
from hesse._operators import CurvatureOperator
from hesse._protocol import Operator
from hesse._summary import BlockSummary, block_summary
from hesse.cli._figures import (
    NO_MATPLOTLIB,
    Drawing,
    have_matplotlib,
    hessian_heatmap,
    per_layer_bars,
)
from hesse.cli._output import CommandError, check, staged

__all__ = ["CommandError", "Request", "run"]

OPERATORS: dict[str, tuple[type[CurvatureOperator], str]] = {
    "hessian": (hesse.HessianOperator, "Hessian of the loss"),
    "ggn": (hesse.GGNOperator, "generalised Gauss-Newton"),
    "fisher": (hesse.EmpiricalFisherOperator, "empirical Fisher"),
}
# Below this size the whole matrix is built once (N products): it is drawn as a heat map and
# every analysis runs on it, exactly.
HEATMAP_LIMIT = 256
# What runs when no analysis flag is named. --per-layer is never among them: it costs the
# exact diagonal and a dense block or a Lanczos run per layer.
DEFAULT_ANALYSES = "top-5, trace, density"


_HINT = " (run again with --traceback to see where)"
_PACKAGE = Path(hesse.__file__).resolve().parent


@dataclass(frozen=True)
class Request:
    """What ``hesse analyze`` was asked to do (the parsed command line)."""

    target: str
    out: Path
    params: list[str] | None = None
    top_k: int = 0
    bottom_k: int = 0
    trace: bool = False
    density: bool = False
    per_layer: bool = False
    per_layer_by: Literal["parameter", "module"] = "module"
    curvature: str = "hessian"
    seed: int = 0
    trace_matvecs: int = 90
    progress: bool = True
    traceback: bool = False
    defaults: bool = False  # set by with_defaults: no analysis was named, the defaults run

    def with_defaults(self) -> Request:
        """Top-5 eigenvalues, the trace and the density when no analysis was named; only the
        named ones otherwise (``--per-layer`` is named or not run)."""
        if self.top_k or self.bottom_k or self.trace or self.density or self.per_layer:
            return self
        return replace(self, top_k=5, trace=True, density=True, defaults=True)

    def analyses(self) -> list[str]:
        """The analyses to run, as the report names them: ``["top-5", "trace", ...]``."""
        names = [f"top-{self.top_k}"] if self.top_k else []
        names += [f"bottom-{self.bottom_k}"] if self.bottom_k else []
        named = (("trace", self.trace), ("density", self.density), ("per-layer", self.per_layer))
        return names + [name for name, on in named if on]


# --------------------------------------------------------------------------------- loading


def load_target(target: str) -> tuple[nn.Module, Any, Any]:
    """Import ``FUNC`` from ``FILE.py`` and check what it returns: ``(model, criterion, data)``."""
    file, sep, name = target.rpartition(":")
    if not sep or not file or not name:
        raise CommandError(
            f"expected FILE.py:FUNC (a Python file and the function in it that returns "
            f"(model, criterion, data)), got {target!r}; e.g. examples/analyze_mlp.py:setup"
        )
    path = Path(file)
    if not path.is_file():
        raise CommandError(f"no such file: {file} (from {target!r})")
    spec = importlib.util.spec_from_file_location(f"hesse_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise CommandError(f"{file} is not a Python file that can be imported")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the user's file may import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise CommandError(f"importing {file} raised {_describe(err)}{_HINT}") from err
    finally:
        sys.path.remove(folder)
    func = getattr(module, name, None)
    if func is None:
        defined = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and getattr(v, "__module__", None) == module.__name__
        )
        listing = ", ".join(defined) if defined else "none"
        raise CommandError(f"{file} has no function {name!r} (functions defined there: {listing})")
    if not callable(func):
        raise CommandError(f"{file}:{name} is of type {type(func).__name__}, not a function")
    try:
        result = func()
    except Exception as err:
        raise CommandError(f"{name}() raised {_describe(err)}{_HINT}") from err
    return _check_result(name, result)


def _check_result(name: str, result: Any) -> tuple[nn.Module, Any, Any]:
    expected = "(model, criterion, data), data an (inputs, target) pair or a DataLoader"
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = f"{len(result)} values" if isinstance(result, (tuple, list)) else _kind(result)
        raise CommandError(f"{name}() must return {expected}; it returned {got}")
    model, criterion, data = result
    if not isinstance(model, nn.Module):
        raise CommandError(f"{name}() must return an nn.Module first; got {_kind(model)}")
    if not callable(criterion):
        raise CommandError(
            f"{name}() must return a loss second (such as nn.CrossEntropyLoss()); "
            f"got {_kind(criterion)}"
        )
    return model, criterion, data


def _kind(value: Any) -> str:
    return f"a {type(value).__name__}" if value is not None else "None"


def _explain(err: BaseException) -> str:
    """hesse's own checks say what to fix in their first line; an error raised in the user's
    model or data (or in torch) is easier to place with its traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    if frames and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE):
        return str(err).splitlines()[0]
    return _describe(err) + _HINT


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


# ----------------------------------------------------------------------------- distribution


def writes_results() -> bool:
    """Whether this process writes the results: rank 0 of a torchrun launch, or the only one."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def process_group() -> Iterator[int]:
    """Join the ``torchrun`` process group (if launched by it) and yield this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    # One backend per device type: gloo for CPU tensors, NCCL for CUDA ones.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- analysis


class _Counted(Operator):
    """An operator that advances a progress bar by the columns of each product (by N for its
    dense matrix or its diagonal); it passes on the operator's shard (the ranks' common probes)
    and sessions (its kept graph). The operator itself is built without ``progress=``: one bar
    per step of the analysis, never one per product."""

    def __init__(self, op: CurvatureOperator, bar: Any) -> None:
        self.op, self.bar = op, bar
        self.layout = op.layout  # what block_summary splits into blocks

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
        out = self.op @ v
        self._advance(1 if v.ndim == 1 else v.shape[1])
        return out

    def _advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def to_dense(self) -> Tensor:
        out = self.op.to_dense()
        self._advance(self.op.shape[0])
        if not bool(torch.isfinite(out).all()):
            # What the products meet past N = 256, said here too (not as eigsh's argument A).
            raise CommandError(
                "the curvature matrix has NaN or infinite entries: check the data for NaN or "
                "infinite values and that the model's loss and parameters are finite"
            )
        return out

    def diagonal(self) -> Tensor:
        out = self.op.diagonal()
        self._advance(self.op.shape[0])
        return out


class _Progress:
    """Progress bars on stderr (tqdm, the ``progress`` extra) for each step of the analysis."""

    def __init__(self, enabled: bool) -> None:
        self.tqdm: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm
            except ImportError:
                print("(pip install 'hesse[progress]' for progress bars)", file=sys.stderr)

    @contextmanager
    def products(self, op: CurvatureOperator, desc: str, total: int | None) -> Iterator[_Counted]:
        """One bar for one step of the analysis, advanced by each product with ``op``."""
        bar = None
        if self.tqdm is not None:
            bar = self.tqdm(total=total, desc=desc, unit=" products", leave=False)
        try:
            yield _Counted(op, bar)
        finally:
            if bar is not None:
                bar.close()

    @contextmanager
    def counting(
        self, a: Tensor | CurvatureOperator, desc: str, total: int | None
    ) -> Iterator[Tensor | _Counted]:
        """`products` for an operator; a dense matrix as it is (its products cost no time)."""
        if isinstance(a, Tensor):
            yield a
            return
        with self.products(a, desc, total) as counted:
            yield counted


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _eigen_section(
    result: hesse.EigenResult, largest: bool, exact: bool, seconds: float
) -> dict[str, Any]:
    """The eigenpairs, the most extreme first (largest first for the top ones), whatever
    order `hesse.eigsh` returns them in."""
    order = torch.argsort(result.eigenvalues, descending=largest)
    return {
        "method": "exact" if exact else "lanczos",
        "eigenvalues": result.eigenvalues[order].tolist(),
        "residuals": result.residuals[order].tolist(),
        "converged": result.converged[order].tolist(),
        "num_matvecs": result.num_matvecs,
        "seconds": seconds,
    }


def _print_eigen(title: str, section: dict[str, Any], say: Callable[[str], None]) -> None:
    if section["method"] == "exact":
        how = "exact: eigendecomposition of the dense matrix"
    else:
        how = f"Lanczos, {section['num_matvecs']} products"
    say(f"\n{title} ({how}, {section['seconds']:.2f} s)")
    for i, (value, residual, ok) in enumerate(
        zip(section["eigenvalues"], section["residuals"], section["converged"]), 1
    ):
        state = "converged" if ok else "NOT converged"
        say(f"  {i:3d}  {value: .6e}   residual {residual:.1e}  {state}")


def _analyses_line(request: Request) -> str:
    if request.defaults:
        return (
            f"{DEFAULT_ANALYSES} (the defaults: no analysis was named); --per-layer adds a "
            "table per layer"
        )
    return (
        f"{', '.join(request.analyses())} (named; the defaults {DEFAULT_ANALYSES} apply only "
        "when none is named)"
    )


def _trace_section(
    request: Request, target: Tensor | CurvatureOperator, n: int, progress: _Progress
) -> dict[str, Any]:
    """The trace: exact from N products when the budget covers N (always at N <= 256, where
    ``target`` is the dense matrix), else Hutch++ with ``--trace-matvecs`` products."""
    budget = max(request.trace_matvecs, n) if n <= HEATMAP_LIMIT else request.trace_matvecs
    with progress.counting(target, "trace", min(budget, n)) as a:
        tr, seconds = _timed(partial(hesse.trace, a, budget, seed=request.seed))
    # Exact when the budget reached N: from N products (none further for a dense matrix).
    exact = budget >= n and tr.num_matvecs in (0, n) and tr.stderr.item() == 0
    return {
        "estimate": tr.estimate.item(),
        "stderr": tr.stderr.item(),
        "method": "exact" if exact else "hutch++",
        "num_matvecs": n if exact else tr.num_matvecs,
        "seconds": seconds,
    }


def _print_trace(section: dict[str, Any], dense: bool, say: Callable[[str], None]) -> None:
    products = f"{section['num_matvecs']} products, {section['seconds']:.2f} s"
    if section["method"] == "exact":
        source = f"of the dense matrix, {section['seconds']:.2f} s" if dense else products
        say(f"\ntrace       {section['estimate']:.6e} (exact, {source})")
    else:
        say(
            f"\ntrace       {section['estimate']:.6e} ± {section['stderr']:.2e} (standard error; "
            f"Hutch++, {products})"
        )


class _DenseLayout:
    """The dense matrix (N <= 256) as an operator that knows its parameter layout, so that
    `block_summary` takes its blocks from it: exact, and no product with the model."""

    def __init__(self, matrix: Tensor, layout: hesse.ParamLayout) -> None:
        self.matrix, self.layout = matrix, layout
        self.shape, self.dtype, self.device = tuple(matrix.shape), matrix.dtype, matrix.device

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal()


def _per_layer_section(
    request: Request, op: CurvatureOperator, dense: Tensor | None, progress: _Progress
) -> tuple[dict[str, Any], BlockSummary]:
    """`block_summary` by module (or parameter): of the dense matrix at N <= 256 (its products
    cost nothing: 0 in the report), else of the operator, whose exact diagonal gives the
    traces."""
    summarise = partial(
        block_summary, by=request.per_layer_by, num_matvecs=request.trace_matvecs, seed=request.seed
    )
    if dense is not None:
        summary, seconds = _timed(partial(summarise, _DenseLayout(dense, op.layout)))
    else:
        with progress.products(op, "per-layer", None) as counted:
            summary, seconds = _timed(partial(summarise, counted))
    rows = [
        {
            "name": row.name,
            "params": list(row.params),
            "numel": row.numel,
            "trace": row.trace,
            "trace_stderr": row.trace_stderr,
            "trace_exact": row.trace_exact,
            "trace_per_numel": row.trace_per_numel,
            "top_eigenvalue": row.top_eigenvalue,
            "converged": row.converged,
            "num_matvecs": row.num_matvecs if dense is None else 0,
        }
        for row in summary.rows
    ]
    section = {
        "by": summary.by,
        "source": "dense matrix" if dense is not None else "operator",
        "rows": rows,
        "total_trace": summary.total_trace,
        "total_stderr": summary.total_stderr,
        "num_matvecs": summary.num_matvecs if dense is None else 0,
        "seconds": seconds,
    }
    return section, summary


def _print_per_layer(
    section: dict[str, Any], summary: BlockSummary, say: Callable[[str], None]
) -> None:
    if section["source"] == "dense matrix":
        how = f"exact: blocks of the dense matrix, {section['seconds']:.2f} s"
    else:
        exact = all(row["trace_exact"] for row in section["rows"])
        traces = "exact traces from the diagonal" if exact else "Hutch++ traces above 256 entries"
        how = (
            f"{traces}; top eigenvalues by Lanczos above 256 entries; "
            f"{section['num_matvecs']} products, {section['seconds']:.2f} s"
        )
    say(f"\nper-layer   by {section['by']} ({how})")
    for line in summary.table().splitlines():
        say(f"  {line}")


def analyze(request: Request, rank: int) -> tuple[dict[str, Any], list[Drawing]]:
    """Run the analysis; print (on rank 0) and return the report and its figures."""
    say: Callable[[str], None] = print if rank == 0 else (lambda _: None)
    progress = _Progress(request.progress and rank == 0)
    model, criterion, data = load_target(request.target)
    operator, description = OPERATORS[request.curvature]
    op = operator(model, criterion, data, params=request.params)  # no progress=: bars per step
    layout = op.layout
    n = layout.numel
    world = op.shard.world_size
    report: dict[str, Any] = {
        "hesse": hesse.__version__,
        "torch": torch.__version__,
        "target": request.target,
        "curvature": request.curvature,
        "operator": type(op).__name__,
        "parameters": n,
        "param_names": list(layout.names),
        "samples": op.num_samples,
        "reduction": op.reduction,
        "dtype": str(op.dtype).removeprefix("torch."),
        "device": str(op.device),
        "world_size": world,
        "seed": request.seed,
        "analyses": request.analyses(),
        "analyses_named": not request.defaults,
    }
    figures: list[Drawing] = []
    total = sum(p.numel() for p in model.parameters())
    say(f"hesse analyze {request.target}")
    say(
        f"model       {type(model).__name__}: {n:,} of {total:,} parameters "
        f"in {len(layout.names)} tensors"
    )
    ranks = f" over {world} ranks" if world > 1 else ""
    say(f"data        {op.num_samples:,} samples{ranks}, reduction {op.reduction!r}")
    say(f"curvature   {description} ({type(op).__name__}), {report['dtype']} on {op.device}")
    say(f"analyses    {_analyses_line(request)}")

    for key, k in (("top", request.top_k), ("bottom", request.bottom_k)):
        if k >= n:
            raise CommandError(
                f"--{key}-k {k}: must be smaller than N = {n}, the number of parameters analysed"
            )

    # At N <= 256 the dense matrix (N products) serves the heat map and every analysis: the
    # eigenvalues, the trace and the density then come out exact, for no further products.
    dense: Tensor | None = None
    if n <= HEATMAP_LIMIT:
        with progress.products(op, "dense matrix", n) as counted:
            dense, seconds = _timed(counted.to_dense)
        report["dense"] = {"num_matvecs": n, "seconds": seconds}
        say(
            f"dense       the {n} x {n} matrix from {n} products ({seconds:.2f} s; N <= "
            f"{HEATMAP_LIMIT}: the analyses below use it)"
        )

    searches: tuple[tuple[str, int, Literal["LA", "SA"]], ...] = (
        ("top", request.top_k, "LA"),
        ("bottom", request.bottom_k, "SA"),
    )
    for key, k, which in searches:
        if not k:
            continue
        title = f"{key}-{k} eigenvalues"
        with progress.counting(dense if dense is not None else op, title, None) as a:
            result, seconds = _timed(partial(hesse.eigsh, a, k=k, which=which, seed=request.seed))
        exact = dense is not None and result.num_matvecs == 0  # solved directly
        report[key] = _eigen_section(result, key == "top", exact, seconds)
        _print_eigen(title, report[key], say)

    if request.trace:
        report["trace"] = _trace_section(request, dense if dense is not None else op, n, progress)
        _print_trace(report["trace"], dense is not None, say)

    if request.density:
        probes, steps = 8, min(60, n)
        exact_budget = probes * steps >= n
        with progress.counting(
            dense if dense is not None else op,
            "spectral density",
            n if exact_budget else probes * steps,
        ) as a:
            density, seconds = _timed(
                partial(
                    hesse.spectral_density,
                    a,
                    num_probes=probes,
                    lanczos_steps=steps,
                    seed=request.seed,
                )
            )
        exact = (
            exact_budget
            and density.num_matvecs in (0, n)  # none further for a dense matrix
            and tuple(density.nodes.shape) == (1, n)
        )
        report["density"] = {
            "method": "exact" if exact else "SLQ",
            "range": [density.nodes.min().item(), density.nodes.max().item()],
            "num_probes": probes,
            "lanczos_steps": steps,
            "sigma": density.sigma,
            "nodes": density.nodes.tolist(),
            "weights": density.weights.tolist(),
            "num_matvecs": n if exact else density.num_matvecs,
            "seconds": seconds,
        }
        low, high = report["density"]["range"]
        if not exact:
            how = f"SLQ, {probes} probes x {steps} steps"
        elif dense is not None:
            how = f"exact: all {n} eigenvalues of the dense matrix"
        else:
            how = f"exact: all {n} eigenvalues, {n} products"
        say(f"\ndensity     eigenvalues in [{low:.4e}, {high:.4e}] ({how}, {seconds:.2f} s)")
        figures.append(("spectral_density.png", density.plot))

    if request.per_layer:
        report["per_layer"], summary = _per_layer_section(request, op, dense, progress)
        _print_per_layer(report["per_layer"], summary, say)
        blocks = f"{description}, per {summary.by}"
        figures.append(("per_layer.png", lambda path: per_layer_bars(summary, path, blocks)))

    if dense is not None:
        matrix, title = dense, f"{description}, blocks per parameter"
        figures.append(
            ("curvature_heatmap.png", lambda path: hessian_heatmap(matrix, layout, path, title))
        )
    return report, figures


def _write(out: Path, report: dict[str, Any], figures: list[Drawing]) -> list[Path]:
    """Write the report and figures into ``out``, all or nothing; return the paths.

    ``report.json`` names its figures relative to ``out`` (their file names): the folder can be
    moved or copied and the report still finds them.
    """
    if figures and not have_matplotlib():
        print(NO_MATPLOTLIB)
        figures = []
    report["figures"] = [name for name, _ in figures]
    with staged(out) as folder:
        for name, draw in figures:
            draw(folder / name)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return [out / "report.json", *(out / name for name, _ in figures)]


def run(request: Request) -> int:
    """Run ``hesse analyze``; a `CommandError` carries a one-line message for the user."""
    request = request.with_defaults()
    if writes_results():
        check(request.out)  # before the user's file is imported: nothing spent on a bad --out
    with process_group() as rank:
        try:
            report, figures = analyze(request, rank)
            if rank == 0:
                written = _write(request.out, report, figures)
                print("\nwrote " + ", ".join(str(p) for p in written))
        except CommandError:
            raise
        except Exception as err:
            if request.traceback:
                raise
            raise CommandError(_explain(err)) from err
    return 0


def parse_params(values: Sequence[str] | None) -> list[str] | None:
    """``--params a b`` or ``--params a,b``: names or glob patterns, ``None`` for all."""
    if not values:
        return None
    return [p for v in values for p in v.split(",") if p]

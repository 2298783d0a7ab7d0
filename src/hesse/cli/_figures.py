"""Figures shared by the command line and the docs build (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from hesse._layout import ParamLayout

if TYPE_CHECKING:
    from hesse._summary import BlockSummary

__all__ = ["NO_MATPLOTLIB", "Drawing", "have_matplotlib", "hessian_heatmap", "per_layer_bars"]

NO_MATPLOTLIB = "(matplotlib is not installed: pip install 'hesse[plot]' for the PNG figures)"

Drawing = tuple[str, Callable[[Any], Any]]  # a file name and what draws it at a given path


def have_matplotlib() -> bool:
    """Whether matplotlib imports (the figures need nothing else: no backend is selected)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def hessian_heatmap(h: Tensor, layout: ParamLayout, path: Any, title: str) -> Any:
    """Save a heat map of a square matrix with its parameter blocks outlined and named.

    Colours are symmetric-logarithmic: a few large entries would otherwise wash out the
    structure of the rest. ``path``: a file name or a binary file object (PNG). Drawn on a
    `matplotlib.figure.Figure` of its own, without pyplot: the process's backend (a notebook's
    inline one, say) and pyplot's current figure are left alone.
    """
    from matplotlib.colors import SymLogNorm
    from matplotlib.figure import Figure

    matrix: Any = h.detach().cpu().double().numpy()
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    limit = float(abs(matrix).max()) or 1.0
    norm = SymLogNorm(linthresh=limit * 1e-3, vmin=-limit, vmax=limit)
    image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, interpolation="nearest")
    for offset in layout.offsets[1:]:
        ax.axhline(offset - 0.5, color="k", lw=0.5)
        ax.axvline(offset - 0.5, color="k", lw=0.5)
    centres = [o + n / 2 for o, n in zip(layout.offsets, layout.numels)]
    ax.set_xticks(centres, layout.names, rotation=90, fontsize=7)
    ax.set_yticks(centres, layout.names, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a Figure's own Agg canvas
    return path


def _scale(ax: Any, values: Sequence[float]) -> str:
    """A logarithmic x axis where the values are all positive and span more than a factor of
    10, else a linear one (negative curvature has no logarithm; symmetric-log tick labels
    crowd around zero). Returns the scale's name."""
    from matplotlib.ticker import NullFormatter

    finite = [v for v in values if math.isfinite(v)]  # NaN: a parameter with no entries
    if not finite or min(finite) <= 0 or max(finite) <= 10 * min(finite):
        return "linear"
    ax.set_xscale("log")
    # Bars start at the left edge: a decade below the smallest, so that it shows.
    ax.set_xlim(left=10 ** math.floor(math.log10(min(finite) / 2)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks would overlap
    return "log"


def per_layer_bars(summary: BlockSummary, path: Any, title: str) -> Any:
    """Save two bar charts side by side, one bar per row of ``summary``: the trace per entry
    (the block's mean eigenvalue, with its standard error when estimated) and the top
    eigenvalue, first row at the top, on a logarithmic axis where a panel's values are
    all positive and span decades.

    ``path``: a file name or a binary file object (PNG). Drawn on a `Figure` of its own, as
    `hessian_heatmap`, without pyplot.
    """
    from matplotlib.figure import Figure

    rows = summary.rows
    names = [row.name if row.name else "(root)" for row in rows]
    per_entry = [row.trace_per_numel for row in rows]
    errors = [row.trace_stderr / row.numel if row.numel else 0.0 for row in rows]
    top = [row.top_eigenvalue for row in rows]
    fig = Figure(figsize=(9, max(2.5, 0.32 * len(rows) + 1.3)))
    left, right = fig.subplots(1, 2, sharey=True)
    positions = list(range(len(rows)))
    panels = (
        (left, per_entry, "trace / numel (mean eigenvalue)", errors),
        (right, top, "top eigenvalue of the block", None),
    )
    for ax, values, label, xerr in panels:
        colours = ["tab:blue" if v >= 0 else "tab:red" for v in values]
        estimated = xerr is not None and any(e > 0 for e in xerr)
        ax.barh(positions, values, xerr=xerr if estimated else None, color=colours, ecolor="k")
        if _scale(ax, values) != "log":
            ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    left.set_yticks(positions, names, fontsize=8)
    left.invert_yaxis()  # layout order, top down
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # a Figure's own Agg canvas
    return path

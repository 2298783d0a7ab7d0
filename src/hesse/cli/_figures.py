"""Figures shared by the command line and the docs build (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from hesse._layout import ParamLayout

__all__ = ["NO_MATPLOTLIB", "Drawing", "have_matplotlib", "hessian_heatmap"]

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

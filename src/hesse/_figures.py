"""Figures shared by the command line and the docs build (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from hesse._layout import ParamLayout

__all__ = ["NO_MATPLOTLIB", "have_matplotlib", "hessian_heatmap"]

NO_MATPLOTLIB = "(matplotlib is not installed: pip install 'hesse[plot]' for the PNG figures)"


def have_matplotlib() -> bool:
    """Whether matplotlib imports; selects the file-only Agg backend when it does."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg", force=False)
    return True


def hessian_heatmap(h: Tensor, layout: ParamLayout, path: Any, title: str) -> Any:
    """Save a heat map of a square matrix with its parameter blocks outlined and named.

    Colours are symmetric-logarithmic: a few large entries would otherwise wash out the
    structure of the rest. ``path``: a file name or a binary file object (PNG).
    """
    import matplotlib
    import matplotlib.pyplot as plt

    matrix: Any = h.detach().cpu().double().numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    limit = float(abs(matrix).max()) or 1.0
    norm = matplotlib.colors.SymLogNorm(linthresh=limit * 1e-3, vmin=-limit, vmax=limit)
    image = ax.imshow(matrix, cmap="RdBu_r", norm=norm, interpolation="nearest")
    for offset in layout.offsets[1:]:
        ax.axhline(offset - 0.5, color="k", lw=0.5)
        ax.axvline(offset - 0.5, color="k", lw=0.5)
    centres = [o + n / 2 for o, n in zip(layout.offsets, layout.numels)]
    ax.set_xticks(centres, layout.names, rotation=90, fontsize=7)
    ax.set_yticks(centres, layout.names, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

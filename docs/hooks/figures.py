"""MkDocs hook: the docs' pictures are drawn by the build from hesse itself, so they never rot.

Pages link to ``img/generated/*.png``; this hook computes the demo network's loss Hessian and
spectral density and adds the PNGs to the site as generated files (nothing is written into
``docs/``). Deterministic: seeds are fixed.
"""

from __future__ import annotations

import io
from typing import Any

from mkdocs.structure.files import File, Files

import hesse
from hesse.cli._demo import trained_classifier
from hesse.cli._figures import have_matplotlib, hessian_heatmap


def _png(draw: Any) -> bytes:
    buffer = io.BytesIO()
    draw(buffer)
    return buffer.getvalue()


def on_files(files: Files, config: Any) -> Files:
    if not have_matplotlib():
        raise RuntimeError("the docs build draws figures with matplotlib: pip install -e .[docs]")
    model, criterion, x, target = trained_classifier()
    op = hesse.HessianOperator(model, criterion, (x, target))
    density = hesse.spectral_density(op, num_probes=8, lanczos_steps=60, seed=0)
    h = hesse.loss_hessian_matrix(model, criterion, x, target)
    layout = hesse.ParamLayout.from_module(model)
    figures = {
        "img/generated/spectral_density.png": _png(lambda f: density.plot(f)),
        "img/generated/hessian_heatmap.png": _png(
            lambda f: hessian_heatmap(h, layout, f, "Loss Hessian of the demo network")
        ),
    }
    for uri, content in figures.items():
        files.append(File.generated(config, uri, content=content))
    return files

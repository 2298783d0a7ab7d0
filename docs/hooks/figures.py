"""MkDocs hook: the docs' pictures are drawn by the build from hesse itself, so they never rot.

Pages link to ``img/generated/*.png``; this hook computes the demo network's loss Hessian and
spectral density, runs the code of pages that draw a figure of their own (the sharpness
how-to), and adds the PNGs to the site as generated files (nothing is written into
``docs/``). Deterministic: seeds are fixed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from mkdocs.structure.files import File, Files

import hesse
from hesse.cli._demo import trained_classifier
from hesse.cli._figures import have_matplotlib, hessian_heatmap


def _png(draw: Any) -> bytes:
    buffer = io.BytesIO()
    draw(buffer)
    return buffer.getvalue()


# The same fences as tests/test_docs.py: a page's python blocks run in order, in one namespace.
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", flags=re.S | re.M)
# Pages whose own code saves a figure: page -> (file it saves, where the site serves it).
PAGE_FIGURES = {"how-to/sharpness.md": ("sharpness.png", "img/generated/sharpness.png")}


def _page_figure(page: Path, saved: str) -> bytes:
    """Run ``page``'s python blocks in a temporary folder; return the PNG they save."""
    blocks = [code for lang, code in FENCE.findall(page.read_text()) if lang == "python"]
    namespace: dict[str, object] = {"__name__": "docs"}
    cwd, dtype = os.getcwd(), torch.get_default_dtype()
    with (
        tempfile.TemporaryDirectory() as folder,
        torch.random.fork_rng(),
        contextlib.redirect_stdout(io.StringIO()),  # what the page prints is for its readers
    ):
        os.chdir(folder)
        try:
            for i, block in enumerate(blocks, 1):
                exec(compile(block, f"{page.name}, block {i}", "exec"), namespace)
            return (Path(folder) / saved).read_bytes()
        finally:
            os.chdir(cwd)
            torch.set_default_dtype(dtype)


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
    for page, (saved, uri) in PAGE_FIGURES.items():
        figures[uri] = _page_figure(Path(config["docs_dir"]) / page, saved)
    for uri, content in figures.items():
        files.append(File.generated(config, uri, content=content))
    return files

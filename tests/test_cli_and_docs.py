"""The README's two commands, and the demo command's output (the docs' code: test_docs.py)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import hesse
from hesse.cli import _demo, main
from hesse.cli._figures import have_matplotlib, hessian_heatmap

ROOT = Path(__file__).resolve().parents[1]


def test_readme_gives_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "hesse demo" in text
    assert "python -m pytest" in text
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_demo_prints_and_writes_its_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "(2, 4, 8, 8)" in out and "(2, 4, 4, 4)" in out and "(8, 8)" in out
    assert "top-5 eigenvalues (Lanczos)" in out and "trace (Hutch++" in out
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["seed_example"]["model_hessian_shape"] == [2, 4, 8, 8]
    network = report["network"]
    # Lanczos over the DataLoader agrees with the dense eigenvalues of the one-batch Hessian.
    for a, b in zip(network["top_eigenvalues"], network["dense_top_eigenvalues"]):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert abs(network["trace_estimate"] - network["trace_exact"]) < 5 * network["trace_stderr"]
    assert str(tmp_path / "demo" / "report.json") in out
    pytest.importorskip("matplotlib")
    for name in ("spectral_density.png", "hessian_heatmap.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:4] == b"\x89PNG"


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


@pytest.mark.parametrize("under", [False, True])
def test_demo_refuses_a_file_as_out_before_any_work(
    under: bool, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "report.txt"
    file.write_text("mine")
    out = file / "demo" if under else file
    assert main(["demo", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the seed example and the training
    assert captured.err.startswith(f"hesse demo: error: --out {out}: ")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert file.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def test_demo_writes_nothing_when_a_figure_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def network(report: dict[str, Any]) -> list[Any]:  # the demo's figures, without the work
        report["network"] = {}

        def broken(path: Any) -> None:
            raise RuntimeError("no room for the colour bar")

        return [
            ("spectral_density.png", lambda path: Path(path).write_bytes(b"PNG")),
            ("hessian_heatmap.png", broken),
        ]

    monkeypatch.setattr(_demo, "_network_example", network)
    monkeypatch.setattr(_demo, "have_matplotlib", lambda: True)
    with pytest.raises(RuntimeError, match="colour bar"):
        main(["demo", "--out", str(tmp_path / "demo")])
    assert list(tmp_path.iterdir()) == []  # no spectral_density.png without its report


def test_heatmap_leaves_the_matplotlib_backend_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heat map draws on a Figure of its own: no pyplot, no backend switch (a notebook's
    inline backend must survive ``hesse.cli``'s figures)."""
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    other = "svg" if before.lower() != "svg" else "pdf"  # not Agg, like a notebook's
    matplotlib.use(other)
    try:
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing it would fail
        assert have_matplotlib()
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        layout = hesse.ParamLayout.from_module(model)
        buffer = io.BytesIO()
        hessian_heatmap(torch.randn(layout.numel, layout.numel), layout, buffer, "title")
        assert buffer.getvalue()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == other
    finally:
        monkeypatch.undo()
        matplotlib.use(before)

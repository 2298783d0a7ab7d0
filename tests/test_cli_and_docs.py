"""The README's two commands, and the demo command's output (the docs' code: test_docs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hesse.cli import main

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

"""The README's code runs as written, and the demo command works."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hesse.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run() -> None:
    blocks = _python_blocks(ROOT / "README.md")
    assert blocks, "the README shows code"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_readme_gives_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "hesse demo" in text
    assert "python -m pytest" in text
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_demo_prints_seed_shapes_and_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "(2, 4, 8, 8)" in out and "(2, 4, 4, 4)" in out and "(8, 8)" in out
    assert "top-5 eigenvalues" in out and "trace" in out


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2

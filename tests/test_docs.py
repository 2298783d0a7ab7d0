"""Every code block of the README and the docs runs as written, so examples never rot.

Python blocks of one page run in order in one namespace (a page may build on its earlier
blocks), in a temporary folder; ``hesse`` command lines in shell blocks must parse.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from hesse.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", flags=re.S | re.M)


def _blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == language]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p, "python")], ids=_name)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(page, "python")
    monkeypatch.chdir(tmp_path)  # blocks that save a figure write here
    namespace: dict[str, object] = {"__name__": "docs"}
    default = torch.get_default_dtype()
    try:
        for i, block in enumerate(blocks, 1):
            exec(compile(block, f"{_name(page)}, block {i}", "exec"), namespace)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_hesse_command_lines_parse(page: Path) -> None:
    commands = [
        line.strip()
        for lang in ("bash", "console", "sh")
        for block in _blocks(page, lang)
        for line in block.splitlines()
        if re.match(r"^\s*(\$ )?hesse ", line)
    ]
    for command in commands:
        words = shlex.split(command.removeprefix("$ "), comments=True)[1:]
        _parser().parse_args(words)  # argparse exits (code 2) on an unknown flag or value


def test_docs_pages_are_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES[1:]:
        assert str(page.relative_to(ROOT / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"


def test_api_reference_covers_the_public_surface() -> None:
    import hesse

    documented = "".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
    missing = [
        n for n in hesse.__all__ if n != "__version__" and f"::: hesse.{n}\n" not in documented
    ]
    assert not missing, f"not in docs/reference/*.md: {missing}"

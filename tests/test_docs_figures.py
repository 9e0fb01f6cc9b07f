"""The pictures of the docs: every docs/figures/*.dot renders with graphviz's ``dot``, the SVG
committed beside it is that rendering (the same nodes, edges and labels: ``make figures``
re-renders them all), and every picture is shown by some page."""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

FIGURES = REPO / "docs" / "figures"
SOURCES = sorted(FIGURES.glob("*.dot"))
# What a drawing says: its nodes' and edges' titles and every text, in order. The geometry
# follows the fonts installed (fontconfig picks a substitute when the named one is missing),
# so it is not compared.
_WORDS = re.compile(r"<(title|text)\b[^>]*>([^<]*)</\1>")


def _says(svg: str) -> list[str]:
    return [f"{kind}: {html.unescape(body)}" for kind, body in _WORDS.findall(svg)]


def _render(source_name: str) -> str:
    dot = require_tool("dot")
    done = subprocess.run(
        [dot, "-Tsvg", source_name],
        cwd=FIGURES,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{source_name}: dot failed: {done.stderr.strip()}"
    return done.stdout


def test_there_are_figures() -> None:
    assert {p.stem for p in SOURCES} >= {"netfilter-paths", "bridge-namespaces", "proxy-processes"}


@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_committed_svg_is_the_rendering(source: Path) -> None:
    svg = source.with_suffix(".svg")
    assert svg.exists(), f"{svg.name} is missing: make figures"
    rendered = _render(source.name)
    assert _says(svg.read_text()) == _says(rendered), (
        f"docs/figures/{svg.name} is not the rendering of {source.name}: make figures"
    )


@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_every_figure_is_on_a_page(source: Path) -> None:
    pages = "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    pages += (REPO / "README.md").read_text()
    assert f"figures/{source.stem}.svg" in pages, f"no page shows {source.stem}.svg"

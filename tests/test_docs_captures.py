"""The captured listings of docs/*.md are what the project prints today.

Every ``<!-- capture: NAME -->`` block of a page is compared with what its recipe in
docs/capture.py produces on this machine now, after both are normalised
(docs/capture_check.py); a page edited by hand, or code that changed what a listing shows,
fails here with a diff naming the page and the recipe. ``sudo .venv/bin/python
docs/capture.py`` rewrites the listings.

The recipes run against the namespace lab with its default names (lab directory
/var/lib/pyengine-lab, links ``pyelab-*``, ports 8081–8083), since those are the names the
pages show; one lab is brought up per firewall backend for all the recipes (~1 minute).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO, require_root, require_tool

DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS))
capture_check = importlib.import_module("capture_check")

PAGES = sorted(p for p in DOCS.glob("*.md") if capture_check.MARKER.search(p.read_text()))
LISTINGS = [
    (page.name, name) for page in PAGES for name, _body in capture_check.listings(page.read_text())
]
LAB_TOOLS = ("ip", "runc", "curl", "tcpdump", "conntrack", "ab", "ss", "nft", "iptables-save")


def _capture() -> ModuleType:
    return importlib.import_module("capture")


def _listing(page: str, name: str) -> str:
    return dict(capture_check.listings((DOCS / page).read_text()))[name]


# -- the check itself, on the pages as they are (no lab) -------------------------------------


def test_every_listing_has_a_recipe() -> None:
    recipes = set(_capture().RECIPES) | {"lab-down"}
    assert LISTINGS, "no captured listings found in docs/"
    assert {name for _page, name in LISTINGS} <= recipes


def test_normalising_hides_what_differs_between_runs() -> None:
    one = (
        "LISTEN 0 4096 0.0.0.0:8081 0.0.0.0:* "
        'users:(("pyengine-proxy",pid=812,fd=3))\n'
        "LISTEN 0 4096 [::]:8081 [::]:* "
        'users:(("pyengine-proxy",pid=813,fd=3))\n'
        "        counter packets 12 bytes 720 jump raw_drop\n"
        " 9999  9998  9999 .venv/bin/python3 .venv/bin/pyengined\n"
        f"ID   6172   running   /var/lib/x/containers/{'3f4e5d6c' * 8}/bundle\n"
    )
    # the other run: other pids (of another width), counters and ids, the sockets listed in
    # another order and held by one process instead of two
    two = (
        "LISTEN 0 4096 [::]:8081 [::]:* "
        'users:(("pyengine-proxy",pid=90,fd=4))\n'
        "LISTEN 0 4096 0.0.0.0:8081 0.0.0.0:* "
        'users:(("pyengine-proxy",pid=90,fd=3))\n'
        "        counter packets 3 bytes 180 jump raw_drop\n"
        "10000  9998 10000 .venv/bin/python3 .venv/bin/pyengined\n"
        f"ID   7407   running   /var/lib/x/containers/{'0a1b2c3d' * 8}/bundle\n"
    )
    assert capture_check.normalise(one) == capture_check.normalise(two)
    # what the page teaches is not normalised away: a port, a chain, a priority
    for changed in (
        one.replace("8081", "8082"),
        one.replace("raw_drop", "raw_accept"),
        one.replace("[::]:8081 [::]:* ", ""),
    ):
        assert capture_check.normalise(one) != capture_check.normalise(changed)


@pytest.mark.parametrize(
    ("page", "name"),
    [("networking.md", "net-nft-dnat"), ("api.md", "api-cli"), ("lab.md", "lab-up")],
)
def test_a_hand_edited_listing_is_caught(page: str, name: str) -> None:
    """The page's own listing passes against itself; one line dropped from it (as when a
    rule, a command or a line of output goes missing from a page) is a drift naming the
    page and the recipe."""
    text = (DOCS / page).read_text()
    body = _listing(page, name)
    assert capture_check.drift(page, text, {name: body}) == []
    lines = body.splitlines()
    edited = text.replace(body, "\n".join(lines[:3] + lines[4:]) + "\n")
    found = capture_check.drift(page, edited, {name: body})
    assert [(d.page, d.name) for d in found] == [(page, name)]
    assert f"{page} [{name}]" in found[0].diff


# -- the pages against a real run -------------------------------------------------------------


@pytest.fixture(scope="module")
def this_run() -> dict[str, str]:
    require_root()
    for tool in LAB_TOOLS:
        require_tool(tool)
    capture = _capture()
    capture.prepare()
    return dict(capture.collect(PAGES))


@pytest.mark.docs
@pytest.mark.privileged
@pytest.mark.parametrize(("page", "name"), LISTINGS, ids=[f"{p}:{n}" for p, n in LISTINGS])
def test_listing_matches_this_run(this_run: dict[str, str], page: str, name: str) -> None:
    text = (DOCS / page).read_text()
    found = capture_check.drift(f"docs/{page}", text, {name: this_run[name]})
    assert not found, (
        f"docs/{page}: the listing of recipe {name!r} drifted from what the project prints "
        "now (sudo .venv/bin/python docs/capture.py rewrites it):\n" + found[0].diff
    )

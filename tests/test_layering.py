"""The layering of the project's packages, read from the source with ``ast`` (pure Python, no
root, no imports of the code under test).

Which package may import which (every ``import`` and ``from ... import`` counts, at module
level, inside functions or under ``if TYPE_CHECKING``; relative imports are resolved; so are
``importlib.import_module("...")`` and ``__import__("...")`` with a literal name):

* ``common`` — the shared base: none of engine, netd, proxy, client, lab, bench;
* ``netd`` — none of engine, client, lab, bench, proxy;
* ``proxy`` — none of engine, netd, client, lab, bench;
* ``client`` — only ``client`` and ``common`` of the project (it speaks HTTP to the daemon);
* ``engine`` — none of client, lab, bench; netd only through its facade (``netd/__init__.py``),
  none of its modules;
* ``engine/api`` — neither netd nor proxy: the API calls the engine, the engine the rest;
* nothing outside ``tests/`` imports ``tests``.

And no module of the packages is longer than ``MAX_LINES`` lines: a module that grows past it
is split along its ideas. Each rule is its own test, so a failure names the rule and lists
every offending module and import.
"""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "engine", "client", "lab", "netd", "proxy", "bench")
PROJECT = frozenset((*PACKAGES, "tests"))
MAX_LINES = 600
# Directories that are not the project's source (virtualenvs, build output, caches).
SKIP_DIRS = frozenset(("build", "dist", "node_modules", "__pycache__"))


@dataclass(frozen=True)
class Rule:
    """Modules under ``scope`` (a package directory, or every module outside ``tests/`` when
    None) import nothing ``forbidden`` names: a module and everything under it (``"netd"``), or
    with a trailing dot only the modules under it (``"netd."``: the package itself is allowed)."""

    name: str
    scope: str | None
    forbidden: frozenset[str]

    def __str__(self) -> str:
        return self.name


def _only(*allowed: str) -> frozenset[str]:
    return PROJECT - frozenset(allowed)


RULES = (
    Rule("common", "common", frozenset(("engine", "netd", "proxy", "client", "lab", "bench"))),
    Rule("netd", "netd", frozenset(("engine", "client", "lab", "bench", "proxy"))),
    Rule("proxy", "proxy", frozenset(("engine", "netd", "client", "lab", "bench"))),
    Rule("client", "client", _only("client", "common")),
    Rule("engine", "engine", frozenset(("client", "lab", "bench"))),
    Rule("engine-netd-facade", "engine", frozenset(("netd.",))),
    Rule("api", "engine/api", frozenset(("netd", "proxy"))),
    Rule("tests", None, frozenset(("tests",))),
)


# -- the checker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    line: int
    target: str  # the imported module, dotted and absolute
    text: str  # the statement as written

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.text}"


def python_files(root: Path, under: str | None = None) -> Iterator[Path]:
    """The .py files of package ``under`` of ``root``, or, when None, every .py file of
    ``root`` outside ``tests/`` (hidden directories, virtualenvs and build output skipped)."""
    top = root / under if under else root
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d not in SKIP_DIRS
            and not d.endswith(".egg-info")
            and not (under is None and here == root and d == "tests")
        )
        yield from (here / f for f in sorted(filenames) if f.endswith(".py"))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """``from <level dots><name> import ...`` written in ``module``, made absolute."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, *([name] if name else [])])


@functools.cache
def imports_of(root: Path, path: Path) -> tuple[Import, ...]:
    """Every import in ``path``, wherever it is written in the file."""
    module = module_name(root, path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_bytes(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            targets = [base]
        elif (
            isinstance(node, ast.Call)
            and _is_dynamic_import(node.func)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            targets = [node.args[0].value]
        else:
            continue
        text = ast.unparse(node)
        found += [Import(module, getattr(node, "lineno", 0), t, text) for t in targets]
    return tuple(found)


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id == "__import__"
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "import_module"
        and isinstance(func.value, ast.Name)
        and func.value.id == "importlib"
    )


def violations(root: Path, rule: Rule) -> list[Import]:
    """The imports under ``root`` that break ``rule``."""
    found = []
    for path in python_files(root, rule.scope):
        for imp in imports_of(root, path):
            if any(_matches(imp.target, f) for f in rule.forbidden):
                found.append(imp)
    return found


def _matches(target: str, forbidden: str) -> bool:
    if forbidden.endswith("."):
        return target.startswith(forbidden)
    return target == forbidden or target.startswith(forbidden + ".")


def line_count(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def oversize(root: Path, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """The modules of the packages under ``root`` longer than ``limit`` lines, with counts."""
    found = []
    for package in PACKAGES:
        for path in python_files(root, package):
            count = line_count(path)
            if count > limit:
                found.append((str(path.relative_to(root)), count))
    return found


# -- the project ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_imports_go_the_right_way(rule: Rule) -> None:
    found = violations(REPO, rule)
    scope = f"{rule.scope}/" if rule.scope else "modules outside tests/"
    banned = ", ".join(sorted(rule.forbidden))
    if found:
        listed = "\n".join(f"  {imp}" for imp in found)
        pytest.fail(f"rule {rule.name!r}: {scope} must not import {banned}:\n{listed}")


def test_no_module_is_longer_than_the_limit() -> None:
    found = oversize(REPO)
    if found:
        listed = "\n".join(f"  {path}: {count} lines" for path, count in found)
        pytest.fail(f"modules longer than {MAX_LINES} lines (split along their ideas):\n{listed}")


def test_the_packages_are_there() -> None:
    """The checker reads real files: every package has modules, and imports are found."""
    for package in PACKAGES:
        files = list(python_files(REPO, package))
        assert files, f"no .py files under {package}/"
    assert any(imports_of(REPO, p) for p in python_files(REPO, "engine"))


# -- the checker can fail ------------------------------------------------------------------------

# Per rule, a module it covers and an import that breaks it, hidden in a function body.
WRONG_WAY = {
    "common": ("common/util.py", "from engine.api import app"),
    "netd": ("netd/sub/mod.py", "import proxy.tcp"),
    "proxy": ("proxy/x.py", "from netd.portspec import PortSpec"),
    "client": ("client/cli.py", "from netd import portspec"),
    "engine": ("engine/lifecycle/x.py", "import importlib; importlib.import_module('lab.lab')"),
    "engine-netd-facade": ("engine/daemon.py", "from netd.controller import NetworkController"),
    "api": ("engine/api/networks.py", "from proxy.supervisor import ProxySpec"),
    "tests": ("bench/helper.py", "from tests.api_helpers import Daemon"),
}


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in path.relative_to(root).parents:
        if parent != Path(".") and not (root / parent / "__init__.py").exists():
            (root / parent / "__init__.py").write_text("")
    path.write_text(text)


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A tiny tree with one wrong-way import per rule, the right-way imports each rule allows
    (relative ones included), and one module just over the limit and one at it."""
    for relative, statement in WRONG_WAY.values():
        _write(tmp_path, relative, f"import os\n\n\ndef f() -> None:\n    {statement}\n")
    _write(tmp_path, "client/http.py", "from client import cli\nfrom common.errors import X\n")
    _write(tmp_path, "netd/dns/server.py", "from .. import ipam\nfrom . import records\n")
    _write(tmp_path, "proxy/tcp.py", "from . import x\nfrom common import jsonstate\n")
    _write(tmp_path, "engine/api/app.py", "from ..lifecycle import x\nfrom common import errors\n")
    _write(tmp_path, "engine/lifecycle/ok.py", "import netd, proxy\nfrom netd import Network\n")
    _write(tmp_path, "tests/test_x.py", "from tests.api_helpers import Daemon\n")
    _write(tmp_path, "lab/big.py", "x = 1\n" * (MAX_LINES + 1))
    _write(tmp_path, "bench/fits.py", "x = 1\n" * MAX_LINES)
    _write(tmp_path, ".venv/lib/tests_import.py", "import tests\n")
    return tmp_path


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_checker_reports_a_wrong_way_import(synthetic: Path, rule: Rule) -> None:
    relative, statement = WRONG_WAY[rule.name]
    found = violations(synthetic, rule)
    assert [(imp.module, imp.line) for imp in found] == [
        (module_name(synthetic, synthetic / relative), 5)
    ], [str(imp) for imp in found]
    assert statement.split("; ")[-1] in found[0].text


def test_checker_reports_every_oversize_module(synthetic: Path) -> None:
    assert oversize(synthetic) == [("lab/big.py", MAX_LINES + 1)]
    assert sorted(oversize(synthetic, limit=MAX_LINES - 1)) == [
        ("bench/fits.py", MAX_LINES),
        ("lab/big.py", MAX_LINES + 1),
    ]


def test_relative_imports_are_made_absolute() -> None:
    assert _absolute("netd.dns.server", False, 1, "records") == "netd.dns.records"
    assert _absolute("netd.dns.server", False, 2, None) == "netd"
    assert _absolute("netd.dns", True, 1, "server") == "netd.dns.server"
    assert _absolute("engine.api.app", False, 2, "lifecycle") == "engine.lifecycle"
    assert _absolute("client.cli", False, 0, "common.errors") == "common.errors"


def test_forbidden_names_match_whole_modules() -> None:
    assert _matches("netd", "netd") and _matches("netd.dns", "netd")
    assert not _matches("netdx", "netd")
    assert _matches("netd.controller", "netd.") and not _matches("netd", "netd.")

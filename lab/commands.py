"""Running host commands as the lab does: this Python's tools first on PATH, the repository as
working directory, a time limit, and a one-line LabError when a command fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from lab.plan import BIN, LabError

REPO = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT = 120.0


def command_env() -> dict[str, str]:
    """The exercises' environment: this Python's ``pyengine`` and ``python`` first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def run(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=command_env(),
            cwd=REPO,
        )
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None


def check(argv: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
    result = run(argv, timeout)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {why[-1] if why else f'exit {result.returncode}'}")
    return result.stdout


def say(echo: Callable[[str], None], argv: list[str]) -> str:
    """Run a set-up command and show it, so ``up`` doubles as a listing of what it does."""
    echo("+ " + " ".join(argv))
    return check(argv)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=command_env()["PATH"]) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)} (apt-get install {' '.join(missing)})")

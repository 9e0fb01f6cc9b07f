"""``docker top``: the host's ``ps`` filtered to a container's processes, as moby's
daemon/top_unix.go does it: the ps arguments are split on spaces (no shell), the container's
pids are passed with ``-q`` when ps accepts it, and the rows whose PID column names one of the
container's processes are kept.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

PS_TIMEOUT = 10.0
MAX_PS_OUTPUT = 4 * 1024 * 1024
MAX_PS_ARGS = 1024
# moby: "-o pid=PID" would rename the column the rows are filtered by.
_RENAMED_PID = re.compile(r"\s+([^\s]*)=\s*(PID[^\s]*)")


class TopError(ValueError):
    """Bad ps arguments or ps output without a PID column: the API answers 400."""


@dataclass
class TopResult:
    titles: list[str]
    processes: list[list[str]]


def parse_ps_args(text: str) -> list[str]:
    """ps_args as ps gets them: split on spaces; Docker's default ``-ef``."""
    if len(text) > MAX_PS_ARGS:
        raise TopError("ps_args too long")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in text):
        raise TopError("ps_args may not contain control characters")
    for key, value in _RENAMED_PID.findall(text):
        if key != "pid":
            raise TopError(f'specifying "{key}={value}" is not allowed')
    args = [a for a in (text or "-ef").split(" ") if a]
    return args or ["-ef"]


def _ps(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ps", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=PS_TIMEOUT,
        check=False,
    )


def top(args: list[str], pids: list[int]) -> TopResult:
    """Blocking: runs ps. ``pids``: the container's processes (its cgroup's)."""
    result = _ps([*args, "-q", ",".join(str(p) for p in pids)]) if pids else None
    if result is None or result.returncode != 0:
        # Some options (such as f) cannot go with -q: without it, filtered below.
        result = _ps(args)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        raise TopError(f"ps: {message[0] if message else 'failed'}")
    return parse_ps_output(result.stdout[:MAX_PS_OUTPUT].decode(errors="replace"), set(pids))


def parse_ps_output(output: str, pids: set[int]) -> TopResult:
    lines = output.splitlines()
    if not lines:
        raise TopError("ps printed nothing")
    titles = lines[0].split()
    try:
        pid_index = titles.index("PID")
    except ValueError:
        raise TopError("Couldn't find PID field in ps output") from None
    processes = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) <= pid_index:
            continue
        try:
            pid = int(fields[pid_index])
        except ValueError:
            continue
        if pid not in pids:
            continue
        head = fields[: len(titles) - 1]
        tail = line.split(None, len(titles) - 1)[len(titles) - 1 :]
        processes.append(head + tail)
    return TopResult(titles, processes)

"""Persisted state: plain JSON written atomically (write, fsync, rename), readable by root only.

State files hold secrets (a container's Env, registry tokens): mode 0600, as Docker's
config.v2.json; the directories this module creates are 0700.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

FILE_MODE = 0o600
DIR_MODE = 0o700
log = logging.getLogger("pyengined.state")


class CorruptRecord(ValueError):
    """A state file that exists but cannot be read as the JSON it should hold."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON; readers see the old or the new file, never half."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with open(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, FILE_MODE)  # a leftover temporary file keeps its old mode otherwise
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_json(path: Path, data: Any) -> None:
    """:func:`write_json_atomic` without the fsyncs, on one line: the rename alone makes the
    new file appear whole to every process (rename(2)); only a crash of the whole host can
    lose it. For records of running processes, which such a crash ends too, written by the
    thousand (an fsync each cost ~1 ms)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with open(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, FILE_MODE)
        f.write(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    os.rename(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file does not exist."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def read_record(path: Path, default: Any = None) -> Any:
    """As read_json, but a file that cannot be read or decoded raises CorruptRecord (a
    directory in its place, bad UTF-8, bad JSON, nesting too deep)."""
    try:
        return read_json(path, default)
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptRecord(f"{path}: {e}") from e


def set_aside(path: Path, reason: object) -> Path | None:
    """Rename a corrupt record to ``<name>.corrupt-<UTC time>`` next to it, so that the
    daemon starts without it and it stays there to be looked at; logged at WARNING."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for n in range(1, 100):
        if not os.path.lexists(target):
            break
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    try:
        os.rename(path, target)
    except OSError as e:
        log.warning("corrupt record %s (%s) cannot be set aside: %s", path, reason, e)
        return None
    log.warning("corrupt record %s set aside as %s: %s", path, target.name, reason)
    return target

"""The daemon's data root: Docker's modes, and one daemon at a time.

Docker keeps /var/lib/docker at 0710 (root, group root may traverse) and its state files at
0600. Two daemons on one root would unlink each other's socket and rewrite each other's state:
an flock(2) on ``pyengined.lock`` in the root, taken before anything else is read or touched,
makes the second one refuse to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

import click

DATA_ROOT_MODE = 0o710
LOCK_FILE = "pyengined.lock"
MAX_PID_BYTES = 32


def claim(data_root: Path) -> int:
    """Create ``data_root`` (or tighten its mode) and lock it; the descriptor holding the lock
    is returned. Another daemon holding it: a one-line ClickException naming its pid."""
    try:
        data_root.mkdir(mode=DATA_ROOT_MODE, parents=True, exist_ok=True)
        os.chmod(data_root, DATA_ROOT_MODE)
        fd = os.open(
            data_root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
    except OSError as e:
        raise click.ClickException(f"cannot use data root {data_root}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, MAX_PID_BYTES, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise click.ClickException(
            f"data root {data_root} is in use by pyengined pid {holder}"
        ) from None
    except OSError as e:
        os.close(fd)
        raise click.ClickException(f"cannot lock data root {data_root}: {e.strerror}") from None
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def make_private(data_root: Path, names: tuple[str, ...], create: tuple[str, ...] = ()) -> None:
    """The state directories ``names`` under the root: 0700, as Docker's image/ (a root kept
    from an earlier version has them 0755); those in ``create`` are made if missing."""
    for name in names:
        path = data_root / name
        try:
            if name in create:
                path.mkdir(mode=0o700, exist_ok=True)
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, stat.S_IMODE(path.stat().st_mode) & 0o700)
        except OSError as e:
            raise click.ClickException(f"cannot use data root {data_root}: {e}") from None

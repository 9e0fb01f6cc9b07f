"""One lock per network: every command holds an exclusive flock(2) on ``<dataDir>/lock`` while it
reads or changes the network's state, so the ADDs and DELs a kubelet runs at once for pods of
one network take turns (the lock goes with the process, also when it is killed)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from netd.cni.errors import IO_FAILURE, TRY_AGAIN, CniError

LOCK_FILE = "lock"
DEFAULT_TIMEOUT = 60.0  # seconds; a runtime retries a command that answered "try again"
_POLL = 0.01


@contextmanager
def network_lock(data_dir: Path, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot open the lock in {data_dir}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EINTR):
                    raise CniError(IO_FAILURE, f"cannot lock {data_dir}: {exc.strerror}") from None
            if time.monotonic() >= deadline:
                raise CniError(TRY_AGAIN, f"network state {data_dir} is busy; try again")
            time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock

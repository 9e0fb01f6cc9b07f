"""Proxies no record accounts for: found by a marker in their environment, and stopped.

A proxy that outlives the daemon (live restore) is recorded only once its start-up handshake
is done; a daemon SIGKILLed between the fork and the record leaves a proxy nobody knows,
listening on a published port for good. So every proxy of a supervisor with a record
directory runs with ``PYENGINE_PROXY_OWNER=<that directory>`` in its environment (the fork
server is started with it, and a forked proxy shares the server's initial environment), and
the next daemon, before it re-reserves any port, stops every process carrying its marker that
is not a recorded proxy it keeps.

/proc/<pid>/environ (proc(5)) is the environment the process was started with: what a
process later sets with setenv(3) does not change it, so the marker cannot be lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Collection
from pathlib import Path

from proxy.pidfd import ProcessIdentity

log = logging.getLogger("proxy.supervisor")

OWNER_ENV = "PYENGINE_PROXY_OWNER"
STOP_TIMEOUT_SECONDS = 5.0
# A bound on what is read of one process's environment: the marker is looked for in it only.
_MAX_ENVIRON = 1 << 20


def marker(state_path: Path) -> str:
    return f"{OWNER_ENV}={Path(state_path).absolute()}"


def marked_environment(state_path: Path) -> dict[str, str]:
    """Our environment with the marker of ``state_path``: for the fork server and proxies."""
    return {**os.environ, OWNER_ENV: str(Path(state_path).absolute())}


def _carries(pid: int, wanted: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(_MAX_ENVIRON)
    except OSError:  # gone meanwhile, or a kernel thread
        return False
    return wanted in environ.split(b"\0")


def find_marked(state_path: Path, exclude: Collection[int] = ()) -> list[ProcessIdentity]:
    """Every live process carrying the marker of ``state_path``, but ``exclude`` and us.
    Blocks (a walk of /proc): run it in a thread."""
    wanted = os.fsencode(marker(state_path))
    skip = {os.getpid(), *exclude}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        if _carries(pid, wanted):
            identity = ProcessIdentity.of(pid)
            if identity is not None:
                found.append(identity)
    return found


def stop_marked(state_path: Path, identities: list[ProcessIdentity]) -> int:
    """SIGKILL each process (through a pidfd opened and checked first, so a reused pid is
    never signalled) and wait for it to exit, its listening sockets closed with it. The
    number stopped. Blocks: run it in a thread."""
    wanted = os.fsencode(marker(state_path))
    pidfds = []
    for identity in identities:
        try:
            pidfd = os.pidfd_open(identity.pid)
        except OSError:
            continue
        if ProcessIdentity.of(identity.pid) != identity or not _carries(identity.pid, wanted):
            os.close(pidfd)
            continue
        log.warning(
            "stopping a proxy of %s that no record accounts for (pid %d)",
            state_path,
            identity.pid,
        )
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            os.close(pidfd)
            continue
        pidfds.append(pidfd)
    try:
        # pidfd_open(2): the pidfd polls readable once the process has exited.
        poller = select.poll()
        for pidfd in pidfds:
            poller.register(pidfd, select.POLLIN)
        waiting = set(pidfds)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                waiting.discard(fd)
                poller.unregister(fd)
        if waiting:
            log.warning("%d stray proxies still alive after SIGKILL", len(waiting))
    finally:
        for pidfd in pidfds:
            with contextlib.suppress(OSError):
                os.close(pidfd)
    return len(pidfds)

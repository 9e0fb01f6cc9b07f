"""Long-running helper processes the harness starts by hand (docker-proxy, socat).

docker-proxy expects its parent's status pipe as fd 3: it writes ``0\\n`` when it listens, or
``1\\n<error>``, then closes fd 3. Started without one, fd 3 is whatever the Go runtime opened
there — the listening socket — and closing it stops the proxy at once. posix_spawn(3) file
actions place the pipe at fd 3 without running Python in the child.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procfs
from proxy.handshake import STATUS_FD, StatusTimeout, read_status_blocking


class SpawnError(Exception):
    """A helper process could not be started or did not come up."""


@dataclass
class SpawnedProcess:
    argv: list[str]
    pid: int
    log_path: Path
    returncode: int | None = field(default=None)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the whole process group (a forking proxy's children are in it: socat's
        UDP children outlive their parent otherwise), SIGKILL after ``timeout`` seconds; then
        SIGKILL to any member left once the leader is gone. Reaps the leader."""
        _signal_group(self.pid, signal.SIGTERM)
        if self.wait(timeout) is None:
            _signal_group(self.pid, signal.SIGKILL)
            self.wait(timeout)
        deadline = time.monotonic() + timeout
        while procfs.live_group_members(self.pid) and time.monotonic() < deadline:
            _signal_group(self.pid, signal.SIGKILL)
            time.sleep(0.02)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def spawn(argv: list[str], log_path: Path, status_pipe: bool = False) -> tuple[SpawnedProcess, int]:
    """Start ``argv`` with stdin from /dev/null, stdout and stderr to ``log_path``, in its own
    process group (a terminal's ^C reaches the harness, which then stops it in order).

    With ``status_pipe`` the child gets a pipe's write end as fd 3 and the read end is returned
    (the caller closes it); otherwise the returned fd is -1.
    """
    read_fd = write_fd = -1
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        actions: list[tuple[object, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ]
        if status_pipe:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            # Lift the write end above fd 3 first, so the dup2 onto 3 cannot clobber a source.
            # (dup2 onto itself would also keep FD_CLOEXEC set and lose the pipe at exec.)
            if write_fd <= STATUS_FD:
                lifted = fcntl.fcntl(write_fd, fcntl.F_DUPFD_CLOEXEC, STATUS_FD + 1)
                os.close(write_fd)
                write_fd = lifted
            actions.append((os.POSIX_SPAWN_DUP2, write_fd, STATUS_FD))
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                os.environ,
                file_actions=actions,
                setpgroup=0,
                setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGPIPE),
            )
        except OSError as exc:
            if read_fd >= 0:
                os.close(read_fd)
            raise SpawnError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    finally:
        os.close(log_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return SpawnedProcess(argv, pid, log_path), read_fd


def read_status(read_fd: int, timeout: float) -> bytes:
    """The child's status on its fd 3 (proxy.handshake's reader): what came within ``timeout``
    seconds if it did not complete; closes ``read_fd``."""
    try:
        return read_status_blocking(read_fd, timeout)
    except StatusTimeout as timeout_passed:
        return timeout_passed.received
    finally:
        os.close(read_fd)

"""The start-up handshake with the parent, docker-proxy's protocol.

The parent passes the write end of a pipe as fd 3. The proxy writes ``0\\n`` once it is listening,
or ``1\\n<error text>`` before exiting 1, then closes the fd. A parent that reads EOF with nothing
before it knows the proxy died before it could say why.

Both sides live here: :class:`StartupStatus` is the child's, :func:`read_status` (in an event
loop) and :func:`read_status_blocking` are the parent's, for the daemon, the benchmarks and the
tests alike (and, with another ``until``, for the container monitor's status line).
"""

from __future__ import annotations

import asyncio
import os
import select
import stat
import time
from collections.abc import Callable

STATUS_FD = 3
LISTEN_FD = 4
SECOND_LISTEN_FD = 5  # a proxy of both families of a port: its other listener
LISTEN_FDS = (LISTEN_FD, SECOND_LISTEN_FD)


class StartupStatus:
    """Where the proxy reports whether start-up worked: the fd 3 pipe, if the parent gave one."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def from_inherited_fd(cls) -> StartupStatus:
        """Claim fd 3 when it is a pipe; must run before the process opens any fd of its own,
        or an unrelated fd could land on 3 and be mistaken for the parent's pipe."""
        try:
            mode = os.fstat(STATUS_FD).st_mode
        except OSError:
            return cls(None)
        if not stat.S_ISFIFO(mode):
            return cls(None)
        os.set_inheritable(STATUS_FD, False)
        return cls(STATUS_FD)

    @property
    def has_parent(self) -> bool:
        return self._fd is not None

    def report_ready(self) -> None:
        self._send(b"0\n")

    def report_failure(self, message: str) -> None:
        self._send(b"1\n" + message.encode("utf-8", "replace"))

    def _send(self, payload: bytes) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError:
            # The parent went away; nobody is left to read the status.
            pass
        finally:
            os.close(fd)


class StatusTimeout(TimeoutError):
    """No complete status within the time allowed; ``received`` is what came before."""

    def __init__(self, timeout: float, received: bytes) -> None:
        super().__init__(f"no complete start-up status within {timeout:g} s (got {received!r})")
        self.received = received


def reports_ready(received: bytearray) -> bool:
    """The default ``until``: a proxy's status is complete once it starts with ``0\\n`` (no
    need to wait for the close); a failure's is read up to EOF. A child reports success in one
    write of at most PIPE_BUF bytes, which a read gets whole."""
    return received.startswith(b"0\n")


class _Status:
    """What the child wrote so far to the read end ``fd`` of its status pipe; complete at EOF or
    once ``until`` says so."""

    def __init__(self, fd: int, until: Callable[[bytearray], bool]) -> None:
        self.fd = fd
        self.until = until
        self.received = bytearray()
        self.complete = False

    def read(self) -> None:
        """Take what the pipe holds now; call it when ``fd`` is readable."""
        try:
            chunk = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.received.extend(chunk)
        if not chunk or self.until(self.received):
            self.complete = True


async def read_status(fd: int, until: Callable[[bytearray], bool] = reports_ready) -> bytes:
    """The child's status from the read end ``fd`` of its status pipe, waited for in the
    running event loop (bound the wait with :func:`asyncio.wait_for`)."""
    status = _Status(fd, until)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        status.read()
        if status.complete and not done.done():
            done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return bytes(status.received)


def read_status_blocking(
    fd: int, timeout: float, until: Callable[[bytearray], bool] = reports_ready
) -> bytes:
    """:func:`read_status` for a caller that may block (with or without an event loop);
    :class:`StatusTimeout` once ``timeout`` seconds pass without a complete status."""
    status = _Status(fd, until)
    deadline = time.monotonic() + timeout
    while not status.complete:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(0.0, left))
        if not readable:
            raise StatusTimeout(timeout, bytes(status.received))
        status.read()
    return bytes(status.received)

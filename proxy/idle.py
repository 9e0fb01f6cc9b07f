"""A proxy's idle phase: ready, listening, and no event loop yet.

Most published ports see no traffic most of the time, and an event loop is most of what an
idle proxy would otherwise own (uvloop's Loop object alone is 256 kB, zeroed when allocated;
with libuv's structures and asyncio's objects, ~0.5 MB of private pages per forked proxy).
So a proxy first blocks in poll(2) on its listening socket, and makes its loop only when the
socket turns readable (a connection waits to be accepted, or a datagram to be read: both stay
queued, and the loop sees the socket readable at once) or when it is asked to stop.

SIGINT and SIGTERM are caught meanwhile through a wakeup pipe (signal.set_wakeup_fd): the C
signal handler writes to it, so poll(2) returns even if the signal arrives just before it.
"""

from __future__ import annotations

import os
import select
import signal
import socket
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class IdleWait:
    """Catches the stop signals from construction on; :meth:`until_traffic` blocks."""

    def __init__(self) -> None:
        self.stop_requested = False
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def until_traffic(self, listeners: list[socket.socket]) -> bool:
        """Block until one of ``listeners`` is readable (True) or a stop signal came (False)."""
        poller = select.poll()
        for listener in listeners:
            poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._read_fd, select.POLLIN)
        while not self.stop_requested:
            # An interrupted poll runs the Python handler, then polls again (PEP 475); the
            # wakeup pipe is readable by then, so that poll returns at once.
            for fd, _ in poller.poll():
                if fd != self._read_fd:
                    return True
                self._drain()
        return False

    def close(self) -> None:
        """Stop using the wakeup pipe; the handlers stay (recording stop_requested) until the
        event loop installs its own."""
        signal.set_wakeup_fd(-1)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _drain(self) -> None:
        try:
            while os.read(self._read_fd, 64):
                pass
        except BlockingIOError:
            pass

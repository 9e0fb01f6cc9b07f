"""The start-up handshake with the parent, docker-proxy's protocol.

The parent passes the write end of a pipe as fd 3. The proxy writes ``0\\n`` once it is listening,
or ``1\\n<error text>`` before exiting 1, then closes the fd. A parent that reads EOF with nothing
before it knows the proxy died before it could say why.
"""

from __future__ import annotations

import os
import stat

STATUS_FD = 3
LISTEN_FD = 4


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

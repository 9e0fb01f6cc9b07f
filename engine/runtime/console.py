"""The monitor's side of a container's stdin and terminal.

With ``process.terminal`` runc makes the pty inside the container and sends its master over
the ``--console-socket`` as SCM_RIGHTS ancillary data (runc ``libcontainer/utils/cmsg.go``,
``contrib/cmd/recvtty``); the monitor keeps it, copies its output to the log and writes the
attach channel's stdin to it. Without a terminal but with ``OpenStdin`` the container's stdin
is a pipe whose write end the monitor keeps.

``AttachServer`` serves the attach channel (engine.runtime.attachproto) inside the monitor's
selector loop, without blocking: stdin bytes wait in one bounded pending buffer, and while it
is not empty no client is read (the clients' sockets then fill and the daemon waits).
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from engine.runtime import attachproto
from engine.runtime.attachproto import Decoder, ProtocolError
from engine.runtime.execproc import set_winsize

CONSOLE_TIMEOUT = 10.0


@contextlib.contextmanager
def console_socket() -> Iterator[tuple[str, socket.socket]]:
    """A listening unix socket for runc's ``--console-socket``, in a private directory with a
    short path (sun_path is 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="pyecs-")
    path = os.path.join(directory, "c.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        yield path, listener
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def receive_master(listener: socket.socket) -> int:
    """The pty master runc sent (it connected and sent before ``runc create`` returned)."""
    listener.settimeout(CONSOLE_TIMEOUT)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(CONSOLE_TIMEOUT)
        _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, f"console socket: expected 1 descriptor, got {len(fds)}")
    os.set_inheritable(fds[0], False)
    return fds[0]


Handler = Callable[[int, int], None]


class AttachServer:
    """The attach channel's listener and clients, served from the monitor's selector."""

    def __init__(
        self, directory: Path, selector: selectors.BaseSelector, stdin_fd: int | None, tty: bool
    ) -> None:
        self.selector = selector
        self.stdin_fd = stdin_fd  # the pty master or the stdin pipe's write end; None: no stdin
        self.tty_fd = stdin_fd if tty else None
        self.pending = b""
        self.close_requested = False
        self.clients: dict[int, tuple[socket.socket, Decoder]] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with attachproto.socket_path(directory) as path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.listener.bind(path)
            os.chmod(path, 0o600)
        self.listener.listen(attachproto.MAX_CLIENTS)
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, self._accept)
        if stdin_fd is not None and not tty:
            os.set_blocking(stdin_fd, False)

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        if self.stdin_fd is not None and self.tty_fd is None:
            with contextlib.suppress(OSError):
                os.close(self.stdin_fd)
        self.stdin_fd = None

    def _accept(self, fd: int, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if len(self.clients) >= attachproto.MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        self.clients[conn.fileno()] = (conn, Decoder())
        if not self.pending:
            self.selector.register(conn, selectors.EVENT_READ, self._read_client)

    def _drop(self, fd: int) -> None:
        conn, _ = self.clients.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def _read_client(self, fd: int, mask: int) -> None:
        conn, decoder = self.clients[fd]
        try:
            data = conn.recv(attachproto.MAX_PAYLOAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        try:
            frames = decoder.feed(data)
        except ProtocolError:
            self._drop(fd)
            return
        for frame in frames:
            if frame.kind == attachproto.STDIN and self.stdin_fd is not None:
                self.pending += frame.payload
            elif frame.kind == attachproto.CLOSE_STDIN:
                self._close_stdin()
            elif frame.kind == attachproto.RESIZE and self.tty_fd is not None:
                with contextlib.suppress(OSError, ProtocolError):
                    set_winsize(self.tty_fd, *frame.size())
        self._flush()

    def _close_stdin(self) -> None:
        if self.stdin_fd is None or self.tty_fd is not None:
            return  # a terminal has no end of input
        self.close_requested = True
        self._flush()

    def _flush(self) -> None:
        if self.stdin_fd is None:
            self.pending = b""
            return
        if self.pending:
            try:
                written = os.write(self.stdin_fd, self.pending)
                self.pending = self.pending[written:]
            except BlockingIOError:
                pass
            except OSError:
                self.pending = b""  # the reader is gone (EPIPE/EIO): drop the input
        self._pause_clients(bool(self.pending))
        if self.close_requested and not self.pending and self.tty_fd is None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def _pause_clients(self, paused: bool) -> None:
        for fd, (conn, _) in self.clients.items():
            registered = fd in self.selector.get_map()
            if paused and registered:
                self.selector.unregister(conn)
            elif not paused and not registered:
                self.selector.register(conn, selectors.EVENT_READ, self._read_client)
        if self.stdin_fd is None or self.tty_fd is not None:
            return  # the pty master is registered for reading by the monitor; writes retry
        writer = self.stdin_fd in self.selector.get_map()
        if paused and not writer:
            self.selector.register(self.stdin_fd, selectors.EVENT_WRITE, self._write_ready)
        elif not paused and writer:
            self.selector.unregister(self.stdin_fd)

    def _write_ready(self, fd: int, mask: int) -> None:
        self._flush()

    def tick(self) -> None:
        """Called on every turn of the loop: retries pending terminal input."""
        if self.pending:
            self._flush()

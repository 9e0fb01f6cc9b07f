"""Kernel pipes used as the in-kernel buffer for splice(2), and a small pool to reuse them."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

DEFAULT_PIPE_SIZE = 1024 * 1024
# Two per connection; enough for 64 connections at once. An idle pipe holds two fds and no
# buffer pages (pipe(7): pages are allocated as data is written).
DEFAULT_MAX_IDLE_PIPES = 128


@dataclass
class Pipe:
    read_fd: int
    write_fd: int
    capacity: int

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def open_pipe(size: int) -> Pipe:
    """A non-blocking pipe, enlarged to ``size`` bytes when the kernel allows it."""
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        # fcntl(2) F_SETPIPE_SZ: fails with EPERM above /proc/sys/fs/pipe-max-size, or when the
        # user is over pipe-user-pages-soft without CAP_SYS_RESOURCE; the default size still works.
        try:
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            pass
        capacity = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    return Pipe(read_fd=read_fd, write_fd=write_fd, capacity=capacity)


class PipePool:
    """Keeps up to ``max_idle`` empty pipes of finished connections for the next connections."""

    def __init__(
        self, pipe_size: int = DEFAULT_PIPE_SIZE, max_idle: int = DEFAULT_MAX_IDLE_PIPES
    ) -> None:
        self._pipe_size = pipe_size
        self._max_idle = max_idle
        self._idle: list[Pipe] = []

    def acquire(self) -> Pipe:
        if self._idle:
            return self._idle.pop()
        return open_pipe(self._pipe_size)

    def release(self, pipe: Pipe, *, is_empty: bool) -> None:
        """Give ``pipe`` back; a pipe still holding bytes cannot be reused and is closed."""
        if is_empty and len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for pipe in idle:
            pipe.close()

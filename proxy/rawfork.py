"""fork(2) without CPython's before- and after-fork work, for the single-threaded fork server.

os.fork() runs PyOS_BeforeFork, PyOS_AfterFork_Parent and PyOS_AfterFork_Child around fork(2):
it takes and re-creates the import lock and the GIL, clears the other threads' states, and
runs every os.register_at_fork callback (threading's, logging's, random's reseed, ...). In a
child of a warm interpreter that work writes to ~150 pages that were shared with the parent,
each one then copied (measured: 0.86 MB of Private_Dirty for a child that only blocks, against
0.27 MB with a plain fork(2)); in the parent it writes to pages the child then owns alone.

None of it is needed when the parent has a single thread and holds no lock at the moment of
the fork, which is the fork server's situation: it never starts a thread, and calls this from
its request loop. glibc's fork() still runs the pthread_atfork(3) handlers (libuv's among
them). The GIL, released by ctypes around the call, is free in both processes afterwards.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable


@functools.cache
def _libc_fork() -> Callable[[], int]:
    fork = ctypes.CDLL(None, use_errno=True).fork
    fork.argtypes = []
    fork.restype = ctypes.c_int
    return fork  # type: ignore[no-any-return]


def resolve() -> None:
    """Look fork up now (the fork server does, before it forks anything)."""
    _libc_fork()


def fork_without_hooks() -> int:
    """fork(2): 0 in the child, the child's pid in the parent. Only for a process with one
    thread and no lock held. Raises OSError."""
    pid = _libc_fork()()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    return pid

"""Child processes started with chosen fds at chosen numbers, watched through a pidfd.

asyncio's subprocess API can only pass fds at the numbers they already have, and preexec_fn is
unsafe in a threaded daemon; posix_spawn(3) file actions place them without running Python in
the child. Exit is noticed by polling a pidfd (pidfd_open(2): readable once the process exits),
which works on any event loop and reaps only this one pid. The same works for a process that is
nobody's child of ours (a proxy a previous daemon left running): its pidfd tells when it exits,
only its exit status stays unknown.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ)


# How long to wait for the exit status of a child that another process reaps (a fork server's
# child) once its pidfd says it is gone; the status is only for the log.
_EXIT_REPORT_GRACE_SECONDS = 2.0


@dataclass(eq=False)
class ChildProcess:
    pid: int
    pidfd: int
    exited: asyncio.Future[int | None]
    """Resolves to the exit code (negative: killed by that signal; None: reaped elsewhere)."""
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    reaped_elsewhere: bool = False
    """True for a child of another process (the fork server): it reaps it and reports the exit
    status through :meth:`report_exit`; the pidfd only signals it and notices its exit."""
    foreign: bool = False
    """True for a process that is not our child and whose status nobody reports (one that
    outlived the daemon that started it): its exit is known from the pidfd alone, and it is
    never waited for (waitpid on its pid could reap an unrelated child that reused it)."""
    cmdline: tuple[str, ...] | None = None
    """Its command line when known without reading /proc (a fork server's child has the
    server's)."""
    _grace_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    def send_signal(self, signum: int) -> None:
        if not self.running or self._released:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def report_exit(self, code: int | None) -> None:
        """The exit status, from whoever reaped the process."""
        self._finish(code)

    def orphan(self) -> None:
        """The process that was to reap this one is gone: its exit is reported, without a
        status, as soon as the pidfd shows it (at once if it already has)."""
        if not self.reaped_elsewhere:
            return
        self.reaped_elsewhere = False
        if self._grace_timer is not None:
            self._finish(None)

    def release(self) -> None:
        """Stop watching the process and close the pidfd; it runs on, unsupervised, and
        ``exited`` never resolves."""
        if self._released or self.exited.done():
            return
        self._released = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self._loop.remove_reader(self.pidfd)
        os.close(self.pidfd)

    def _on_pidfd_readable(self) -> None:
        if self.foreign:
            self._finish(None)
            return
        if self.reaped_elsewhere:
            # pidfd_open(2): readable once the process has exited, parent or not. Stop polling
            # (level triggered) and give the reaper a moment to report the status.
            self._loop.remove_reader(self.pidfd)
            if self._grace_timer is None and self.running:
                self._grace_timer = self._loop.call_later(
                    _EXIT_REPORT_GRACE_SECONDS, self._finish, None
                )
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            code: int | None = None
        else:
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
        self._finish(code)

    def _finish(self, code: int | None) -> None:
        if self.exited.done() or self._released:
            return
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        self._loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.exited.set_result(code)


def watch_process(
    pid: int, pidfd: int, *, reaped_elsewhere: bool, foreign: bool = False
) -> ChildProcess:
    """A ChildProcess for ``pid``, whose exit is noticed through ``pidfd`` (which it now owns).
    ``foreign``: not our child, and nobody reports its status (see ChildProcess.foreign).
    Must be called from the event loop's thread."""
    loop = asyncio.get_running_loop()
    child = ChildProcess(
        pid=pid,
        pidfd=pidfd,
        exited=loop.create_future(),
        _loop=loop,
        reaped_elsewhere=reaped_elsewhere,
        foreign=foreign,
    )
    loop.add_reader(pidfd, child._on_pidfd_readable)
    return child


def spawn_with_fds(
    argv: list[str], fds: dict[int, int], env: Mapping[str, str] | None = None
) -> ChildProcess:
    """Run ``argv`` (PATH is searched) with ``fds[n]`` as its fd ``n``, stdin from /dev/null,
    stdout and stderr shared with us, in its own process group (so a terminal's ^C reaches the
    parent only); every other fd of ours is close-on-exec (PEP 446). ``env``: its environment
    (default: ours). Must be called from the event loop's thread."""
    asyncio.get_running_loop()  # fail early off the loop's thread, before anything is spawned
    # Lift the sources above every target first, so one dup2 cannot clobber a later source.
    first_free = max(fds, default=2) + 1
    lifted: dict[int, int] = {}
    try:
        for target, source in fds.items():
            lifted[target] = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, first_free)
        actions: list[tuple[object, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, source, target) for target, source in lifted.items()]
        pid = os.posix_spawnp(
            argv[0],
            argv,
            os.environ if env is None else env,
            file_actions=actions,
            setpgroup=0,
            setsigmask=(),
            setsigdef=_RESET_SIGNALS,
        )
    finally:
        for fd in lifted.values():
            os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return watch_process(pid, pidfd, reaped_elsewhere=False)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"

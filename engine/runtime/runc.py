"""What the daemon calls to run containers: one monitor process per container (monitor.py)
driving runc, plus runc kill for signals. Everything here is asyncio-friendly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common import errors
from common.jsonstate import CorruptRecord, read_record, set_aside
from common.timefmt import utc_rfc3339
from engine.runtime.jsonlog import LogOptions
from engine.runtime.monitor import one_line
from proxy.handshake import read_status

START_TIMEOUT = 30.0
# How long a monitor may take to clean up after reporting a failed start, and after SIGKILL.
MONITOR_EXIT_TIMEOUT = 30.0
MONITOR_LOG_NAME = "monitor.log"
MONITOR_MODULE = "engine.runtime.monitor"
# Monitors started before the runtime was a package (engine/monitor.py) are adopted too.
_MONITOR_MODULES = (MONITOR_MODULE.encode(), b"engine.monitor")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ContainerStartError(errors.InvalidParameter):
    """The container could not be started; the message is runc's one-line error."""


class RuncError(Exception):
    """A runc command (other than create/start) failed; the message is runc's error."""


@dataclass(frozen=True)
class StdioOptions:
    """Docker's ``Tty`` and ``OpenStdin`` for a container's main process; the monitor listens
    for the attach channel (engine.runtime.attachproto) in ``attach_dir``."""

    tty: bool
    open_stdin: bool
    attach_dir: Path

    def monitor_args(self) -> list[str]:
        if not (self.tty or self.open_stdin):
            return []
        args = ["--attach-dir", str(Path(self.attach_dir).absolute())]
        return args + ["--tty"] * self.tty + ["--open-stdin"] * self.open_stdin


@dataclass
class ExitStatus:
    exit_code: int
    finished_at: str
    error: str = ""
    oom_killed: bool = False


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _is_live_monitor(pid: int, exit_path: Path | None = None) -> bool:
    """Whether ``pid`` is a running (not zombie) engine.runtime.monitor, for ``exit_path`` if given.
    Checking the command line guards against a reused pid after a daemon restart."""
    stat = _read_proc(pid, "stat")
    cmdline = _read_proc(pid, "cmdline")
    if not stat or not cmdline:
        return False
    state = stat[stat.rfind(b")") + 2 :].split(b" ", 1)[0]
    if state in (b"Z", b"X"):
        return False
    argv = cmdline.split(b"\0")
    if not any(name in argv for name in _MONITOR_MODULES):
        return False
    if exit_path is None:
        return True
    try:
        given = os.fsdecode(argv[argv.index(b"--exit-file") + 1])
    except (ValueError, IndexError):
        return False
    return os.path.realpath(given) == os.path.realpath(exit_path)


async def _read_status_line(fd: int) -> bytes:
    """The first line written on pipe ``fd`` (b"" on EOF without one)."""
    os.set_blocking(fd, False)
    received = await read_status(fd, until=lambda data: b"\n" in data)
    return received.split(b"\n", 1)[0]


async def _wait_pid_exit(pid: int) -> None:
    """Wait until process ``pid`` exits; it need not be our child (pidfd_open(2) + poll)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        loop.add_reader(pidfd, on_readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


class Runtime:
    """Runs containers with runc, whose state lives under ``state_root`` (runc --root)."""

    def __init__(self, state_root: Path, runc: str = "runc") -> None:
        self.state_root = Path(state_root).absolute()
        self.runc = runc
        # Monitors we spawned and have not reaped yet (after a restart there are none: those
        # monitors are reaped by whoever inherited them).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _reap(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is not None and proc.poll() is not None:
            del self._children[pid]

    async def _runc(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            self.runc,
            "--root",
            str(self.state_root),
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, one_line(err.decode(errors="replace") or out.decode())

    def _monitor_env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(_PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(":"))]
        env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        return env

    async def _abandon_start(self, monitor: subprocess.Popen[bytes], container_id: str) -> None:
        """Make sure a failed start leaves no monitor and no runc container behind."""
        try:
            await asyncio.wait_for(_wait_pid_exit(monitor.pid), MONITOR_EXIT_TIMEOUT)
        except TimeoutError:
            try:
                # The monitor leads its own process group, which also holds runc and
                # (without a terminal) the container's processes.
                os.killpg(monitor.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await _wait_pid_exit(monitor.pid)
        self._reap(monitor.pid)
        with contextlib.suppress(RuncError, OSError):
            await self.delete(container_id)

    def _abandon_start_now(self, monitor: subprocess.Popen[bytes], container_id: str) -> None:
        """The blocking variant for a cancelled start, where awaiting is no longer possible."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(monitor.pid, signal.SIGKILL)
        monitor.wait()
        self._children.pop(monitor.pid, None)
        with contextlib.suppress(OSError):
            subprocess.run(
                [self.runc, "--root", str(self.state_root), "delete", "--force", container_id],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )

    # -- public API ------------------------------------------------------------------------

    async def start(
        self,
        container_id: str,
        bundle: Path,
        log_path: Path,
        exit_path: Path,
        log_options: LogOptions | None = None,
        stdio: StdioOptions | None = None,
    ) -> tuple[int, int]:
        """Create and start the container; returns (monitor pid, container init pid).
        ``log_options``: the json-file rotation the monitor applies (none by default);
        ``stdio``: a TTY and/or an open stdin, with the monitor's attach channel."""
        log_options = log_options or LogOptions()
        bundle, log_path, exit_path = (Path(p).absolute() for p in (bundle, log_path, exit_path))
        self.state_root.mkdir(parents=True, exist_ok=True)
        exit_path.unlink(missing_ok=True)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        argv = [
            sys.executable,
            "-m",
            MONITOR_MODULE,
            "--id",
            container_id,
            "--bundle",
            str(bundle),
            "--runc-root",
            str(self.state_root),
            "--log",
            str(log_path),
            "--exit-file",
            str(exit_path),
            "--status-fd",
            str(status_w),
            "--runc",
            self.runc,
            "--log-max-size",
            str(log_options.max_size),
            "--log-max-file",
            str(log_options.max_files),
        ]
        if stdio is not None:
            argv += stdio.monitor_args()
        try:
            with open(bundle / MONITOR_LOG_NAME, "ab") as monitor_log:
                monitor = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=monitor_log,
                    stderr=monitor_log,
                    pass_fds=(status_w,),
                    start_new_session=True,
                    cwd="/",
                    env=self._monitor_env(),
                )
        except OSError as exc:
            os.close(status_r)
            raise ContainerStartError(f"cannot start the container monitor: {exc}") from exc
        finally:
            os.close(status_w)
        self._children[monitor.pid] = monitor
        try:
            line = await asyncio.wait_for(_read_status_line(status_r), START_TIMEOUT)
        except TimeoutError:
            line = None
        except asyncio.CancelledError:
            self._abandon_start_now(monitor, container_id)
            raise
        finally:
            os.close(status_r)

        if line is None:
            try:
                os.killpg(monitor.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self._abandon_start(monitor, container_id)
            raise ContainerStartError(
                f"container {container_id} did not start within {START_TIMEOUT:g} s"
            )
        try:
            status = json.loads(line) if line else {}
        except ValueError:
            status = {}
        if not isinstance(status, dict) or not status.get("ok"):
            message = status.get("error") if isinstance(status, dict) else None
            await self._abandon_start(monitor, container_id)
            raise ContainerStartError(
                one_line(str(message or "")) or "container monitor exited without a status"
            )
        return monitor.pid, int(status["pid"])

    async def wait(self, monitor_pid: int, exit_path: Path) -> ExitStatus:
        """Wait for the container's monitor to exit and return the exit status it recorded.
        The monitor need not be our child: after a daemon restart it is watched through a
        pidfd, and one that ended while no daemon ran is read from its exit file."""
        exit_path = Path(exit_path).absolute()
        if monitor_pid in self._children or _is_live_monitor(monitor_pid, exit_path):
            await _wait_pid_exit(monitor_pid)
        self._reap(monitor_pid)
        try:
            recorded = read_record(exit_path)
            if recorded is None:
                return ExitStatus(exit_code=255, finished_at=utc_rfc3339(), error="monitor died")
            if not isinstance(recorded, dict) or not isinstance(recorded.get("ExitCode"), int):
                raise CorruptRecord("not an exit status")
        except CorruptRecord as e:
            set_aside(exit_path, e)
            return ExitStatus(exit_code=255, finished_at=utc_rfc3339(), error="exit status lost")
        return ExitStatus(
            exit_code=recorded["ExitCode"],
            finished_at=str(recorded.get("FinishedAt", "")),
            error=str(recorded.get("Error", "")),
            oom_killed=recorded.get("OOMKilled") is True,
        )

    async def kill(self, container_id: str, sig: int | str) -> None:
        """Send ``sig`` (number or name such as "SIGTERM"/"TERM") to the container's init.
        A container that is not running (or already removed) is not an error."""
        signal_arg = str(int(sig)) if isinstance(sig, int) else sig
        returncode, message = await self._runc("kill", container_id, signal_arg)
        if returncode != 0 and "not running" not in message and "does not exist" not in message:
            raise RuncError(f"kill {container_id}: {message}")

    async def update(self, container_id: str, resources_file: Path) -> None:
        """``runc update -r``: apply the linux.resources JSON in ``resources_file`` to a
        running container's cgroup."""
        returncode, message = await self._runc("update", "-r", str(resources_file), container_id)
        if returncode != 0:
            raise RuncError(f"update {container_id}: {message}")

    async def delete(self, container_id: str) -> None:
        """Forcibly remove runc's record (and cgroup) of a container; a no-op when absent."""
        returncode, message = await self._runc("delete", "--force", container_id)
        if returncode != 0 and "does not exist" not in message:
            raise RuncError(f"delete {container_id}: {message}")

    async def stop(
        self,
        container_id: str,
        monitor_pid: int,
        exit_path: Path,
        stop_signal: str = "SIGTERM",
        timeout: float = 10,
    ) -> ExitStatus:
        """Send ``stop_signal``, wait up to ``timeout`` seconds, then SIGKILL."""
        if self.is_running(monitor_pid):
            await self.kill(container_id, stop_signal)
            try:
                return await asyncio.wait_for(self.wait(monitor_pid, exit_path), timeout)
            except TimeoutError:
                await self.kill(container_id, "SIGKILL")
        try:
            return await asyncio.wait_for(self.wait(monitor_pid, exit_path), MONITOR_EXIT_TIMEOUT)
        except TimeoutError:
            raise RuncError(
                f"container {container_id} did not exit {MONITOR_EXIT_TIMEOUT:g} s after SIGKILL"
            ) from None

    def is_running(self, monitor_pid: int, exit_path: Path | None = None) -> bool:
        """Whether the container's monitor (hence the container) is still alive; with
        ``exit_path``, a monitor this daemon did not start must be the one writing that file
        (a pid reused since a daemon restart is not taken for it)."""
        proc = self._children.get(monitor_pid)
        if proc is not None:
            if proc.poll() is None:
                return True
            del self._children[monitor_pid]
            return False
        if monitor_pid <= 0:
            return False
        return _is_live_monitor(monitor_pid, Path(exit_path).absolute() if exit_path else None)

"""A process run inside a running container with ``runc exec`` (Docker's ``exec``).

The process gets the container's own process settings (capabilities, no_new_privileges,
rlimits, AppArmor/SELinux labels: the ``process`` of the bundle's config.json; seccomp is
the container's and runc applies it to every exec) with the exec's args, env, cwd, user and
terminal. ``runc exec`` runs in the foreground as a child of the daemon and exits with the
process's status.

Without a TTY runc hands its own stdio (pipes made here) to the process. With a TTY runc in
the foreground needs a terminal of its own: it gets the slave of a pty made here (raw, so
bytes pass unchanged), puts its host console in raw mode and copies between it and the pty it
made inside the container (runc ``tty.go``); a resize sets the size on our pty and sends runc
SIGWINCH, which it forwards to the container's pty (runc ``signals.go``).

Output is read only when the consumer asks for it (``read``), so a process writing faster
than its client reads blocks on a full pipe instead of growing the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import termios
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.jsonstate import write_json_atomic

READ_SIZE = 32 * 1024
PID_FILE_WAIT = 5.0
RUNC_LOG_MAX = 64 * 1024


@dataclass(frozen=True)
class ExecSpec:
    """What to run: parsed and resolved (user ids) before a process is made."""

    args: list[str]
    env: list[str]
    cwd: str
    user: tuple[int, int, list[int]]
    tty: bool
    stdin: bool


def process_spec(base: dict[str, Any], spec: ExecSpec) -> dict[str, Any]:
    """The OCI ``process`` for runc exec: the container's ``base`` process with ``spec``'s
    args, env, cwd, user and terminal."""
    uid, gid, additional = spec.user
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional:
        user["additionalGids"] = list(additional)
    process = {k: v for k, v in base.items() if k not in ("consoleSize",)}
    process.update(
        terminal=spec.tty, user=user, args=list(spec.args), env=list(spec.env), cwd=spec.cwd
    )
    return process


def set_winsize(fd: int, height: int, width: int) -> None:
    """TIOCSWINSZ (tty_ioctl(4)): rows, columns, then the (unused) pixel sizes."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def read_fd(fd: int) -> bytes:
    """Up to READ_SIZE bytes from non-blocking ``fd``; b"" at EOF (EIO on a pty master whose
    slave is closed counts as EOF)."""
    while True:
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            await _readable(fd)
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise


async def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _writable(fd)


class ExecProcess:
    """One running ``runc exec``: its output fds (stdout, and stderr without a TTY), its stdin
    and its exit status."""

    def __init__(
        self, proc: asyncio.subprocess.Process, outputs: dict[str, int], stdin: int | None
    ) -> None:
        self.proc = proc
        self.outputs = outputs  # stream name → our read end (the pty master with a TTY)
        self.stdin = stdin
        self.tty_fd = outputs["stdout"] if "stderr" not in outputs else None
        self.pid = 0
        self.runc_log: Path | None = None

    @classmethod
    async def start(
        cls,
        *,
        runc: str,
        state_root: Path,
        container_id: str,
        base_process: dict[str, Any],
        spec: ExecSpec,
        work_dir: Path,
        console_size: tuple[int, int] | None = None,
    ) -> ExecProcess:
        process_path, pid_path, runc_log = await asyncio.to_thread(
            _prepare, work_dir, process_spec(base_process, spec)
        )
        argv = [runc, "--root", str(state_root), "--log", str(runc_log), "--log-format", "json"]
        argv += ["exec", "--process", str(process_path)]
        argv += ["--pid-file", str(pid_path), container_id]
        ours: list[int] = []  # fds the daemon keeps
        theirs: list[int] = []  # fds handed to runc, closed here once it runs
        try:
            if spec.tty:
                master, slave = os.openpty()
                ours.append(master)
                theirs.append(slave)
                tty.setraw(slave)
                if console_size:
                    set_winsize(master, *console_size)
                stdio = (slave, slave, slave)
                outputs = {"stdout": master}
                stdin = master if spec.stdin else None
            else:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                ours += [out_r, err_r]
                theirs += [out_w, err_w]
                in_fd: int = subprocess.DEVNULL
                stdin = None
                if spec.stdin:
                    in_r, in_w = os.pipe2(os.O_CLOEXEC)
                    ours.append(in_w)
                    theirs.append(in_r)
                    in_fd, stdin = in_r, in_w
                stdio = (in_fd, out_w, err_w)
                outputs = {"stdout": out_r, "stderr": err_r}
            for fd in ours:
                os.set_blocking(fd, False)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdio[0],
                stdout=stdio[1],
                stderr=stdio[2],
                start_new_session=True,
                cwd="/",
            )
        except BaseException:
            for fd in ours + theirs:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        self = cls(proc, outputs, stdin)
        self.runc_log = runc_log
        self.pid = await _read_pid(pid_path, proc)
        return self

    async def read(self, stream: str) -> bytes:
        return await read_fd(self.outputs[stream])

    async def write_stdin(self, data: bytes) -> None:
        if self.stdin is not None:
            await write_fd(self.stdin, data)

    def close_stdin(self) -> None:
        """EOF on the process's stdin (without a TTY; a terminal has no end of input)."""
        if self.stdin is not None and self.tty_fd is None:
            os.close(self.stdin)
            self.stdin = None

    def resize(self, height: int, width: int) -> None:
        if self.tty_fd is None:
            raise ValueError("not a TTY")
        set_winsize(self.tty_fd, height, width)
        self._winch()
        # runc ignores a SIGWINCH until it holds the container's pty: a resize right after the
        # start is told again a little later.
        loop = asyncio.get_running_loop()
        for delay in (0.2, 1.0):
            loop.call_later(delay, self._winch)

    def _winch(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGWINCH)

    async def wait(self) -> int:
        code = await self.proc.wait()
        return 128 - code if code < 0 else code

    def runc_error(self) -> str:
        """runc's own last error (it could not start the process), "" if none."""
        if self.runc_log is None:
            return ""
        try:
            with open(self.runc_log, "rb") as f:
                lines = f.read(RUNC_LOG_MAX).splitlines()
        except OSError:
            return ""
        message = ""
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("level") in ("error", "fatal"):
                    message = " ".join(str(record.get("msg", "")).split())
        return message

    def close(self) -> None:
        """Drop our ends: a process still writing gets EPIPE/SIGPIPE (or SIGHUP on a TTY)."""
        fds = set(self.outputs.values())
        if self.stdin is not None:
            fds.add(self.stdin)
        self.outputs, self.stdin = {}, None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _prepare(work_dir: Path, process: dict[str, Any]) -> tuple[Path, Path, Path]:
    """The exec's files: its process.json, and where runc's pid file and log go."""
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    process_path = work_dir / "process.json"
    write_json_atomic(process_path, process)
    pid_path, runc_log = work_dir / "exec.pid", work_dir / "runc.log"
    pid_path.unlink(missing_ok=True)
    runc_log.unlink(missing_ok=True)
    return process_path, pid_path, runc_log


def remove_work_dir(work_dir: Path) -> None:
    for name in ("process.json", "exec.pid", "runc.log"):
        (work_dir / name).unlink(missing_ok=True)
    work_dir.rmdir()


async def _read_pid(path: Path, proc: asyncio.subprocess.Process) -> int:
    """The process's host pid, which runc writes once it runs (0 if runc fails first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PID_FILE_WAIT
    while True:
        ended = proc.returncode is not None or loop.time() >= deadline
        try:
            text = await asyncio.to_thread(path.read_text)
        except FileNotFoundError:
            text = ""
        if text.strip().isdigit():
            return int(text.strip())
        if ended:
            return 0
        await asyncio.sleep(0.01)


def load_base_process(config_path: Path) -> dict[str, Any]:
    """The ``process`` of a bundle's config.json (written by the daemon, so trusted)."""
    spec = json.loads(config_path.read_text())
    process = spec.get("process") if isinstance(spec, dict) else None
    if not isinstance(process, dict):
        raise ValueError(f"{config_path}: no process")
    return process

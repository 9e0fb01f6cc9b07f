"""The per-container monitor (the role of containerd-shim / conmon).

One small process per container, started by the daemon in its own session so that it outlives
the daemon. It creates and starts the container with runc, copies the container's stdout and
stderr into a json-file log, reaps the container's init (it is a child subreaper), removes the
container with ``runc delete`` and leaves the exit status in a JSON file.

Run as::

    python -m engine.runtime.monitor --id ID --bundle DIR --runc-root DIR --log FILE \
        --exit-file FILE --status-fd N [--runc PATH] [--log-max-size BYTES --log-max-file N]

With ``--log-max-size`` the log rotates as Docker's json-file driver does (``--log-opt
max-size=10m --log-opt max-file=3``); the format and its rotation are engine.runtime.jsonlog.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.jsonstate import write_json_atomic
from common.timefmt import utc_rfc3339
from engine.runtime.cgroups import ContainerCgroup
from engine.runtime.console import AttachServer, console_socket, receive_master
from engine.runtime.jsonlog import JsonFileLog, LogOptions

# prctl(2): PR_SET_CHILD_SUBREAPER makes orphaned descendants (the container's init once
# `runc create` exits) reparent to this process instead of to PID 1.
_PR_SET_CHILD_SUBREAPER = 36
# After init exits, keep copying output until EOF, but no longer than this (a descendant that
# escaped the container's PID namespace could hold the pipes open forever).
DRAIN_TIMEOUT = 5.0
PENDING_RETRY = 0.05  # seconds between retries of terminal input the pty did not take
PID_FILE_NAME = "init.pid"
RUNC_LOG_NAME = "runc.log"
READ_SIZE = 64 * 1024


def one_line(text: str) -> str:
    """The last non-empty line of ``text``, stripped (runc prints its error last)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def set_child_subreaper() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


@dataclass
class MonitorConfig:
    container_id: str
    bundle: Path
    runc_root: Path
    log_path: Path
    exit_path: Path
    status_fd: int
    runc: str = "runc"
    log_options: LogOptions = field(default_factory=LogOptions)
    # Docker's Tty and OpenStdin; the attach channel (engine.runtime.attachproto) listens in
    # attach_dir when either is set.
    tty: bool = False
    open_stdin: bool = False
    attach_dir: Path | None = None


class StartFailed(Exception):
    """runc could not create or start the container; the message is runc's error."""


class ContainerMonitor:
    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.pid_file = config.bundle / PID_FILE_NAME
        self.runc_log = config.bundle / RUNC_LOG_NAME
        self.init_pid = 0
        self.exit_code: int | None = None
        self.finished_at = ""
        self.status_sent = False
        self.stdin_fd: int | None = None  # the pty master with a TTY, else the stdin pipe
        self.attach: AttachServer | None = None

    # -- runc ------------------------------------------------------------------------------

    def _runc_argv(self, *args: str) -> list[str]:
        return [
            self.config.runc,
            "--root",
            str(self.config.runc_root),
            "--log",
            str(self.runc_log),
            "--log-format",
            "json",
            *args,
        ]

    def _runc_log_size(self) -> int:
        try:
            return self.runc_log.stat().st_size
        except FileNotFoundError:
            return 0

    def _runc_error(self, since: int, fallback: str) -> str:
        """runc's last error message logged after byte ``since`` of its JSON log."""
        message = ""
        try:
            with open(self.runc_log, "rb") as f:
                f.seek(since)
                for raw in f.read().splitlines():
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and record.get("level") in ("error", "fatal"):
                        message = str(record.get("msg", ""))
        except FileNotFoundError:
            pass
        return one_line(message) or one_line(fallback) or "runc failed without a message"

    def _run_runc(
        self,
        *args: str,
        stdout: int | None = None,
        stderr: int | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> None:
        since = self._runc_log_size()
        capture = stdout is None
        result = subprocess.run(
            self._runc_argv(*args),
            stdin=stdin,
            stdout=subprocess.PIPE if capture else stdout,
            stderr=subprocess.PIPE if capture else stderr,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stderr or b"") + (result.stdout or b"") if capture else b""
            raise StartFailed(self._runc_error(since, output.decode(errors="replace")))

    def _delete(self) -> None:
        subprocess.run(
            self._runc_argv("delete", "--force", self.config.container_id),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )

    # -- status / exit ---------------------------------------------------------------------

    def _send_status(self, status: dict[str, Any]) -> None:
        self.status_sent = True
        line = json.dumps(status, separators=(",", ":")).encode() + b"\n"
        try:
            os.write(self.config.status_fd, line)
        except OSError:
            pass  # the daemon is gone; the exit file still tells the story
        finally:
            try:
                os.close(self.config.status_fd)
            except OSError:
                pass

    def _reap(self) -> None:
        """Collect every exited child: the container's init and any orphan reparented here."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.init_pid and self.exit_code is None:
                code = os.waitstatus_to_exitcode(wait_status)
                self.exit_code = 128 - code if code < 0 else code
                self.finished_at = utc_rfc3339()

    # -- main flow -------------------------------------------------------------------------

    def _create_and_start(self, stdout_w: int, stderr_w: int) -> None:
        self.pid_file.unlink(missing_ok=True)
        create = ["create", "--bundle", str(self.config.bundle), "--pid-file", str(self.pid_file)]
        if self.config.tty:
            # runc makes the pty and sends us its master (engine.runtime.console).
            with console_socket() as (path, listener):
                self._run_runc(*create, "--console-socket", path, self.config.container_id)
                self.stdin_fd = receive_master(listener)
        elif self.config.open_stdin:
            # In non-terminal mode runc hands its own stdio to the container's process.
            stdin_r, self.stdin_fd = os.pipe2(os.O_CLOEXEC)
            try:
                self._run_runc(
                    *create,
                    self.config.container_id,
                    stdout=stdout_w,
                    stderr=stderr_w,
                    stdin=stdin_r,
                )
            finally:
                os.close(stdin_r)
        else:
            self._run_runc(*create, self.config.container_id, stdout=stdout_w, stderr=stderr_w)
        self.init_pid = int(self.pid_file.read_text().strip())
        self._run_runc("start", self.config.container_id)

    def _copy_output(self, pipes: dict[int, str], wakeup_r: int, log: JsonFileLog) -> None:
        selector = selectors.DefaultSelector()
        selector.register(wakeup_r, selectors.EVENT_READ)
        for fd in pipes:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        if self.config.attach_dir is not None and (self.config.tty or self.config.open_stdin):
            self.attach = AttachServer(
                self.config.attach_dir, selector, self.stdin_fd, self.config.tty
            )
        drain_deadline: float | None = None
        self._reap()
        while pipes or self.exit_code is None:
            if self.exit_code is not None and drain_deadline is None:
                drain_deadline = time.monotonic() + DRAIN_TIMEOUT
            timeout = None
            if drain_deadline is not None:
                timeout = drain_deadline - time.monotonic()
                if timeout <= 0:
                    break
            if self.attach is not None and self.attach.pending:
                timeout = min(timeout or PENDING_RETRY, PENDING_RETRY)
                self.attach.tick()
            for key, mask in selector.select(timeout):
                if callable(key.data):  # the attach channel's sockets and stdin pipe
                    key.data(key.fd, mask)
                    continue
                if key.fd == wakeup_r:
                    try:
                        while os.read(wakeup_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self._reap()
                    continue
                try:
                    data = os.read(key.fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""  # a pty master whose slave side is all closed: the end
                if data:
                    log.write(pipes[key.fd], data)
                else:
                    if self.attach is not None and key.fd == self.attach.tty_fd:
                        self.attach.stdin_fd = self.attach.tty_fd = None
                    log.finish(pipes.pop(key.fd))
                    selector.unregister(key.fd)
                    os.close(key.fd)
        if self.attach is not None:
            self.attach.close()
        for fd in pipes:
            os.close(fd)
        selector.close()

    def run(self) -> int:
        cfg = self.config
        wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        log = JsonFileLog(cfg.log_path, cfg.log_options)
        try:
            log.open()
            self._create_and_start(stdout_w, stderr_w)
        except (StartFailed, OSError, ValueError) as exc:
            for fd in (stdout_r, stdout_w, stderr_r, stderr_w):
                os.close(fd)
            log.close()
            self._send_status({"ok": False, "error": one_line(str(exc)) or type(exc).__name__})
            self._delete()
            self._reap()
            return 1
        os.close(stdout_w)
        os.close(stderr_w)
        self._send_status({"ok": True, "pid": self.init_pid})

        error = ""
        pipes = {stdout_r: "stdout", stderr_r: "stderr"}
        if self.config.tty and self.stdin_fd is not None:
            # With a TTY everything the container writes is its stdout (as in Docker's log).
            os.close(stdout_r)
            os.close(stderr_r)
            pipes = {self.stdin_fd: "stdout"}
        try:
            self._copy_output(pipes, wakeup_r, log)
        except Exception as exc:  # still remove the container and record how it ended
            error = f"monitor: {one_line(str(exc)) or type(exc).__name__}"
            print(f"monitor {cfg.container_id}: {exc!r}", file=sys.stderr)
        log.close()
        # Read before runc delete removes the cgroup: did the kernel OOM-kill in it?
        oom_killed = ContainerCgroup.of(cfg.container_id).oom_kills() > 0
        self._delete()
        self._reap()
        if self.exit_code is None:
            # Init could not be reaped (not our child): report it the way Docker reports a
            # container whose exit status is unknown.
            self.exit_code, self.finished_at = 255, utc_rfc3339()
        write_json_atomic(
            cfg.exit_path,
            {
                "ExitCode": self.exit_code,
                "FinishedAt": self.finished_at,
                "Error": error,
                "OOMKilled": oom_killed,
            },
        )
        return 0


def parse_args(argv: list[str] | None) -> MonitorConfig:
    parser = argparse.ArgumentParser(prog="python -m engine.runtime.monitor")
    parser.add_argument("--id", required=True)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--runc-root", required=True, type=Path)
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--exit-file", required=True, type=Path)
    parser.add_argument("--status-fd", required=True, type=int)
    parser.add_argument("--runc", default="runc")
    parser.add_argument("--log-max-size", type=int, default=0)
    parser.add_argument("--log-max-file", type=int, default=1)
    parser.add_argument("--tty", action="store_true")
    parser.add_argument("--open-stdin", action="store_true")
    parser.add_argument("--attach-dir", type=Path, default=None)
    ns = parser.parse_args(argv)
    return MonitorConfig(
        container_id=ns.id,
        bundle=ns.bundle.absolute(),
        runc_root=ns.runc_root.absolute(),
        log_path=ns.log.absolute(),
        exit_path=ns.exit_file.absolute(),
        status_fd=ns.status_fd,
        runc=ns.runc,
        log_options=LogOptions(max_size=max(0, ns.log_max_size), max_files=max(1, ns.log_max_file)),
        tty=ns.tty,
        open_stdin=ns.open_stdin,
        attach_dir=ns.attach_dir.absolute() if ns.attach_dir else None,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    # Survive the daemon: it started us in a new session, and its terminal's signals must
    # not reach us either.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chdir("/")
    monitor = ContainerMonitor(config)
    try:
        set_child_subreaper()
        return monitor.run()
    except Exception as exc:
        if not monitor.status_sent:
            monitor._send_status({"ok": False, "error": f"monitor: {one_line(str(exc))}"})
            monitor._delete()
        print(f"monitor {config.container_id}: {exc!r}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())

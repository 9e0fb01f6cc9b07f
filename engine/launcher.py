"""Start a pyengined under given names, wait until it answers, stop it: the one launcher the
lab, the bench and the tests share. Stdlib only, so harnesses around the engine can use it."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class LaunchError(Exception):
    """A daemon exited at start (``returncode`` set) or did not answer in time (None)."""

    def __init__(self, what: str, log_path: Path, returncode: int | None, timeout: float) -> None:
        self.what, self.log_path, self.returncode = what, log_path, returncode
        why = f"exited at start (status {returncode})"
        if returncode is None:
            why = f"did not answer within {timeout:g} s"
        super().__init__(f"{what} {why}:\n" + "\n".join(self.tail()))

    def tail(self, lines: int = 8) -> list[str]:
        """The last ``lines`` lines of the daemon's log."""
        try:
            return self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return []


@dataclass(frozen=True)
class DaemonOptions:
    """The flags that give a pyengined its own socket, data root, bridge and firewall."""

    socket_path: Path
    data_root: Path
    bridge: str
    bip: str  # gateway address / prefix length
    firewall_table: str  # nftables table, or prefix of the iptables chains
    userland_proxy: bool
    firewall_backend: str | None = None  # None: pyengined's default
    extra_args: tuple[str, ...] = ()
    program: Path = BIN / "pyengined"

    @property
    def host(self) -> str:
        return f"unix://{self.socket_path}"

    def argv(self) -> list[str]:
        argv = [str(self.program), "-H", self.host, "--data-root", str(self.data_root)]
        argv += ["--bridge", self.bridge, "--bip", self.bip]
        argv += ["--firewall-table", self.firewall_table]
        if self.firewall_backend is not None:
            argv += ["--firewall-backend", self.firewall_backend]
        argv.append(f"--userland-proxy={'true' if self.userland_proxy else 'false'}")
        return argv + list(self.extra_args)


@dataclass
class LaunchedDaemon:
    options: DaemonOptions
    process: subprocess.Popen[bytes]
    log_path: Path

    def wait_until_answering(self, what: str = "pyengined", timeout: float = START_TIMEOUT) -> None:
        wait_until_answering(self.process, self.options.socket_path, self.log_path, what, timeout)


def launch(
    options: DaemonOptions, log_path: Path, append: bool = False, env: dict[str, str] | None = None
) -> LaunchedDaemon:
    """Start pyengined with stdout and stderr to ``log_path``, in a session of its own (a ^C in
    the terminal reaches the caller only). It does not wait: see ``wait_until_answering``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab" if append else "wb") as log:
        process = subprocess.Popen(
            options.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    return LaunchedDaemon(options, process, log_path)


def answers(socket_path: Path, timeout: float = 5.0) -> bool:
    """Whether a daemon answers ``GET /_ping`` on ``socket_path`` with 200."""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    conn.sock = sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        conn.request("GET", "/_ping", headers={"Host": "pyengine"})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_until_answering(
    process: subprocess.Popen[bytes], socket_path: Path, log_path: Path, what: str, timeout: float
) -> None:
    """Until the daemon ``process`` answers on ``socket_path``; LaunchError when it exits first
    or takes longer than ``timeout`` seconds (it is left running then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(what, log_path, process.returncode, timeout)
        if answers(socket_path):
            return
        time.sleep(0.1)
    raise LaunchError(what, log_path, None, timeout)


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL when it has not exited after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_pid(pid: int, running: Callable[[], bool], timeout: float = STOP_TIMEOUT) -> None:
    """``stop_process`` for a daemon known by its pid only (started by another process);
    ``running`` says whether ``pid`` is still that daemon, not a recycled pid."""

    def reap() -> None:  # when ``pid`` is this process's child (the lab's ``up``)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap()
        if not running():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    reap()

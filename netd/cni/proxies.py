"""pyengine-proxy processes for published ports (``"userlandProxy": true``).

A CNI plugin exits after each command, so its proxies must outlive it: each is exec'd with the
docker-proxy command line and fds (fd 3 the start-up status pipe, fd 4 the host port's socket
netd reserved, ``-use-listen-fd``; proxy/handshake.py), in a session of its own, with
``PYENGINE_PROXY_OUTLIVE_PARENT=1`` (no parent-death signal: proxy/prctl.py) and its output
appended to ``<dataDir>/proxies.log``. Its pid and start time are recorded with the attachment
(netd/cni/records.py); DEL and GC stop it with SIGTERM after checking that the pid is still
that process.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from netd.cni.records import ProxyRecord
from netd.errors import NetdError
from netd.state import PublishedPort

STATUS_FD, LISTEN_FD = 3, 4
START_TIMEOUT = 16.0  # seconds, docker's for docker-proxy
STOP_TIMEOUT = 5.0
OUTLIVE_PARENT_ENV = "PYENGINE_PROXY_OUTLIVE_PARENT"
LOG_FILE = "proxies.log"


def proxy_argv(port: PublishedPort) -> list[str]:
    return [
        sys.executable, "-m", "proxy.main",
        "-proto", port.proto,
        "-host-ip", port.host_ip,
        "-host-port", str(port.host_port),
        "-container-ip", port.container_ip,
        "-container-port", str(port.container_port),
        "-use-listen-fd",
    ]  # fmt: skip


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (proc(5)); None when there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its (new) parent
        return None
    return int(fields[19])


def start_proxy(
    port: PublishedPort, data_dir: Path, spawned: Callable[[ProxyRecord], None]
) -> ProxyRecord:
    """Start a proxy on ``port.sock`` and wait for its "0\\n"; NetdError when it fails.
    ``spawned`` gets the proxy's record as soon as the process exists, before the wait, so the
    caller can persist it: a plugin killed during the wait leaves no proxy nobody knows."""
    if port.sock is None:
        raise NetdError(f"port {port.host_port}/{port.proto} holds no socket")
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    log_fd = os.open(
        data_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    env = dict(os.environ)
    env[OUTLIVE_PARENT_ENV] = "1"
    env.pop("CNI_COMMAND", None)
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
            (os.POSIX_SPAWN_DUP2, write_end, STATUS_FD),
            (os.POSIX_SPAWN_DUP2, port.sock.fileno(), LISTEN_FD),
        ]
        pid = os.posix_spawn(
            sys.executable, proxy_argv(port), env, file_actions=actions, setsid=True
        )
    finally:
        os.close(write_end)
        os.close(log_fd)
    try:
        proxy = ProxyRecord(pid, port.proto, port.host_ip, port.host_port, start_time(pid) or 0)
        spawned(proxy)
        status = _read_status(read_end)
    except BaseException:
        _stop(pid)
        raise
    finally:
        os.close(read_end)
    if not status.startswith(b"0\n"):
        _stop(pid)
        why = status[2:].decode("utf-8", "replace").strip() or "it exited before reporting"
        raise NetdError(f"cannot start pyengine-proxy for port {port.host_port}: {why}")
    return proxy


def _read_status(fd: int) -> bytes:
    import select

    received = b""
    deadline = time.monotonic() + START_TIMEOUT
    while not received.startswith(b"0\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b"1\ntimed out starting the userland proxy"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        received += chunk[: 4096 - len(received)]
    return received


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaps it when it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            if start_time(pid) is None:
                return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def is_running(proxy: ProxyRecord) -> bool:
    return start_time(proxy.pid) == proxy.start_time


def stop_proxy(proxy: ProxyRecord) -> None:
    """Stop the recorded proxy if that process still runs (a recycled pid is left alone)."""
    if is_running(proxy):
        _stop(proxy.pid)

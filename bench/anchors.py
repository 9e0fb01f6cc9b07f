"""The reference proxies, started by hand against the same containers pyengine-proxy serves.

- docker-proxy: Docker's own binary from Debian's docker.io, with the arguments dockerd gives
  it (``-proto -host-ip -host-port -container-ip -container-port``) and dockerd's start-up
  handshake on fd 3.
- socat: the naive proxy, forking one child per TCP connection (or per UDP peer), in the form
  people type: ``socat TCP4-LISTEN:P,bind=IP,reuseaddr,fork TCP4:CONTAINER:PORT``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench import procfs
from bench.spawn import SpawnedProcess, SpawnError, read_status, spawn

READY_TIMEOUT_SECONDS = 10.0


@dataclass
class HandStartedProxy:
    kind: str  # "docker-proxy" | "socat"
    proto: str
    host_ip: str
    host_port: int
    process: SpawnedProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


def docker_proxy_argv(
    binary: str, proto: str, host_ip: str, host_port: int, container_ip: str, container_port: int
) -> list[str]:
    return [
        binary,
        "-proto",
        proto,
        "-host-ip",
        host_ip,
        "-host-port",
        str(host_port),
        "-container-ip",
        container_ip,
        "-container-port",
        str(container_port),
    ]


def socat_argv(
    binary: str, proto: str, host_ip: str, host_port: int, backend_ip: str, backend_port: int
) -> list[str]:
    kind = "TCP4" if proto == "tcp" else "UDP4"
    return [
        binary,
        f"{kind}-LISTEN:{host_port},bind={host_ip},reuseaddr,fork",
        f"{kind}:{backend_ip}:{backend_port}",
    ]


def start_docker_proxy(
    binary: str,
    proto: str,
    host_ip: str,
    host_port: int,
    container_ip: str,
    container_port: int,
    log_path: Path,
) -> HandStartedProxy:
    argv = docker_proxy_argv(binary, proto, host_ip, host_port, container_ip, container_port)
    process, status_fd = spawn(argv, log_path, status_pipe=True)
    status = read_status(status_fd, READY_TIMEOUT_SECONDS)
    if not status.startswith(b"0\n"):
        process.stop()
        reason = status[2:].decode(errors="replace").strip() if status.startswith(b"1\n") else ""
        raise SpawnError(
            f"docker-proxy {proto} {host_ip}:{host_port} did not start: "
            f"{reason or process.log_tail() or 'no handshake on fd 3'}"
        )
    return HandStartedProxy("docker-proxy", proto, host_ip, host_port, process)


def start_socat(
    binary: str,
    proto: str,
    host_ip: str,
    host_port: int,
    backend_ip: str,
    backend_port: int,
    log_path: Path,
) -> HandStartedProxy:
    argv = socat_argv(binary, proto, host_ip, host_port, backend_ip, backend_port)
    process, _ = spawn(argv, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not procfs.is_listening(proto, host_ip, host_port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise SpawnError(
                f"socat {proto} {host_ip}:{host_port} did not start: "
                f"{process.log_tail() or 'not listening'}"
            )
        time.sleep(0.02)
    return HandStartedProxy("socat", proto, host_ip, host_port, process)

"""The userland proxies of a bench dockerd: docker-proxy, or pyengine's drop-in launcher.

With ``--userland-proxy-path`` pointing at ``pyengine-docker-proxy`` (proxy/launcher.c), each
process dockerd execs is a small launcher that hands its listener to one warm host server
(``python -m proxy.hostserver --socket DIR/server-<hash>.sock``, DIR =
$PYENGINE_PROXY_RUNTIME_DIR); the server forks the proxy (comm ``pyengine-proxy``, command line
the server's). The server is started by setsid and a double fork, so neither it nor the proxies
are dockerd's descendants: they are found by their command line naming the runtime directory.

What the publishing study needs of them: every proxy process (for the proxies' Pss alone), the
server (to kill it while ports are published), the proxies still running after ``rm -f``, and
one UDP echo published through them, asked on 127.0.0.1 and on ::1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procfs

PROXY_COMM = "pyengine-proxy"  # the forked proxies' name (prctl PR_SET_NAME)
SERVER_EXIT_SECONDS = 5.0
LEFT_WAIT_SECONDS = 5.0
UDP_TIMEOUT_SECONDS = 1.0
UDP_WAIT_SECONDS = 15.0
UDP_CONTAINER_PORT = 9
# A UDP echo in the nginx image (Debian's perl-base has IO::Socket::INET).
UDP_ECHO_COMMAND = [
    "perl",
    "-MIO::Socket::INET",
    "-e",
    f'my $s = IO::Socket::INET->new(LocalPort => {UDP_CONTAINER_PORT}, Proto => "udp")'
    ' or die "bind: $!"; while (1) { my $peer = $s->recv(my $m, 2048);'
    ' $s->send("echo:" . $m, 0, $peer); }',
]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ProxyProcesses:
    """The proxy processes of one dockerd, read from /proc at one moment."""

    launched: list[int]  # dockerd's children running its proxy binary
    servers: list[int]  # the launcher's host server(s)
    forked: list[int]  # the proxies the server forked

    @property
    def all(self) -> list[int]:
        return sorted({*self.launched, *self.servers, *self.forked})

    @property
    def proxies(self) -> int:
        """Processes that stand for a published port (launchers and forked proxies, or
        docker-proxy processes)."""
        return len(self.launched) + len(self.forked)


def find(dockerd_pid: int, binary: str, runtime_dir: Path | None) -> ProxyProcesses:
    """``binary``: the file name dockerd execs (``docker-proxy`` or the launcher's);
    ``runtime_dir``: the launcher's runtime directory (None for docker-proxy)."""
    tree = procfs.process_tree()
    launched = [
        pid
        for pid in procfs.descendants(dockerd_pid, tree)
        if (argv := procfs.cmdline(pid)) and os.path.basename(argv[0]) == binary
    ]
    servers: list[int] = []
    forked: set[int] = set()
    if runtime_dir is not None:
        mark = str(runtime_dir) + "/"
        for pid in procfs.all_pids():
            if not any(mark in arg for arg in procfs.cmdline(pid)):
                continue
            if _comm(pid) == PROXY_COMM:
                forked.add(pid)
            else:
                servers.append(pid)
        for server in servers:  # and anything else below the server
            forked.update(p for p in procfs.descendants(server, tree) if p not in servers)
    return ProxyProcesses(sorted(launched), sorted(servers), sorted(forked))


def pss_mib(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        memory = procfs.process_memory(pid)
        total_kb += memory.pss_kb if memory else 0
    return total_kb / 1024


def kill_servers(dockerd_pid: int, binary: str, runtime_dir: Path) -> int:
    """SIGKILL the launcher's host server(s) and wait until they are gone; how many there
    were. Raises TimeoutError if one outlives SIGKILL for SERVER_EXIT_SECONDS."""
    servers = find(dockerd_pid, binary, runtime_dir).servers
    for pid in servers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + SERVER_EXIT_SECONDS
    while find(dockerd_pid, binary, runtime_dir).servers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the host server under {runtime_dir} survived SIGKILL")
        time.sleep(0.05)
    return len(servers)


def wait_none_left(dockerd_pid: int, binary: str, runtime_dir: Path | None) -> int:
    """Proxy processes still running (launchers, forked proxies, docker-proxy) after the
    container's removal, once they had LEFT_WAIT_SECONDS to exit; expected 0."""
    deadline = time.monotonic() + LEFT_WAIT_SECONDS
    while True:
        left = find(dockerd_pid, binary, runtime_dir).proxies
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def udp_echo(host: str, port: int, payload: bytes) -> bool:
    """One datagram to ``host:port``; whether the echo came back within UDP_WAIT_SECONDS.
    Asked again every UDP_TIMEOUT_SECONDS from a new socket: a datagram may arrive before the
    echo binds, and pyengine-proxy keeps a client's flow dead once the container refused its
    first datagrams (docker-proxy's recovers), so each try is a new client."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + UDP_WAIT_SECONDS
    while time.monotonic() < deadline:
        with socket.socket(family, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.settimeout(UDP_TIMEOUT_SECONDS)
            sock.sendto(payload, (host, port))
            reply, _ = sock.recvfrom(2048)
            if reply == b"echo:" + payload:
                return True
        time.sleep(0.1)
    return False

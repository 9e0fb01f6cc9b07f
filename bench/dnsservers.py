"""The processes ``pyengine-bench dns`` measures: the fake upstream and pyengine's
``EmbeddedDns`` (helper processes, ``python -m bench.dns fake-upstream|serve-pyengine``) and
dnsmasq, each on loopback and a free port; started, probed, and checked for leftovers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procfs
from bench.cleanup import Cleanup
from bench.dnsload import (
    LOCAL_ADDRESS,
    LOCAL_NAME,
    DnsBenchError,
    query_without_id,
    upstream_reply,
)
from bench.spawn import SpawnedProcess, read_status, spawn

PYENGINE_IP = "127.0.57.1"
DNSMASQ_IP = "127.0.57.2"
UPSTREAM_IP = "127.0.57.3"
FILLER_CONTAINERS = 30  # other records on the benchmark network, so the table is not trivial
BENCH_NETWORK = "pyebench-dns"
CLIENT_ID = "pyebench-dns-client"
START_TIMEOUT_S = 30.0


# -- the helper processes ------------------------------------------------------------------------


def _report_status(text: str) -> None:
    """Tell the parent how the start went: on fd 3 when it is the status pipe, else stdout."""
    try:
        os.write(3, text.encode())
        os.close(3)
    except OSError:
        print(text, end="", flush=True)


def serve_fake_upstream(host: str) -> None:
    """Answer every query on ``host``, a free UDP port, until killed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, 0))
        _report_status(f"0\n{host}:{sock.getsockname()[1]}\n")
        recvfrom, sendto = sock.recvfrom, sock.sendto
        while True:
            query, peer = recvfrom(4096)
            reply = upstream_reply(query)
            if reply is not None:
                sendto(reply, peer)


async def _serve_pyengine(host: str, upstream: tuple[str, int]) -> None:
    from netd.dns.service import EmbeddedDns

    service = EmbeddedDns(upstreams=[upstream], listen=(host, 0))
    for i in range(FILLER_CONTAINERS):
        service.set_endpoint(BENCH_NETWORK, f"filler{i}", [f"filler{i}"], [f"10.52.1.{i + 1}"])
    service.set_endpoint(BENCH_NETWORK, "web-id", [LOCAL_NAME, "frontend"], [LOCAL_ADDRESS])
    service.set_endpoint(BENCH_NETWORK, CLIENT_ID, ["client"], ["10.52.0.3"])
    # The daemon attaches a container's namespace; here the helper's own one stands in for it.
    await service.attach(CLIENT_ID, f"/proc/{os.getpid()}/ns/net")
    port = service.responders()[CLIENT_ID].address[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _report_status(f"0\n{host}:{port}\n")
    try:
        await stop.wait()
    finally:
        await service.close()


def serve_pyengine(host: str, upstream: str) -> None:
    """Run an EmbeddedDns (uvloop, as pyengined does) on ``host``, a free port, until SIGTERM."""
    import uvloop

    up_host, _, up_port = upstream.rpartition(":")
    try:
        uvloop.run(_serve_pyengine(host, (up_host, int(up_port))))
    except Exception as exc:
        _report_status(f"1\n{exc}\n")
        raise


@dataclass
class Server:
    """A server under test: where it answers, and the process whose CPU time is its cost."""

    name: str
    address: tuple[str, int]
    process: SpawnedProcess


def _start_helper(argv: list[str], log: Path, what: str, cleanup: Cleanup) -> Server:
    process, status_fd = spawn(argv, log, status_pipe=True)
    cleanup.push(f"stop {what} (pid {process.pid})", process.stop)
    status = read_status(status_fd, START_TIMEOUT_S).decode(errors="replace").split("\n")
    if status[0] != "0" or len(status) < 2:
        detail = " ".join(status[1:]).strip() or process.log_tail() or "no status"
        raise DnsBenchError(f"{what} did not start: {detail}")
    host, _, port = status[1].rpartition(":")
    return Server(what, (host, int(port)), process)


def _free_udp_tcp_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` a moment ago (dnsmasq binds both)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise DnsBenchError(f"no port free for both UDP and TCP on {host}")


def _probe(server: tuple[str, int], timeout_s: float) -> bool:
    """Whether ``server`` answers the local name before ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    query = b"\x12\x34" + query_without_id(LOCAL_NAME)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        sock.connect(server)
        while time.monotonic() < deadline:
            try:
                sock.send(query)
                if sock.recv(4096)[:2] == b"\x12\x34":
                    return True
            except (TimeoutError, ConnectionRefusedError):
                time.sleep(0.05)
    return False


def dnsmasq_argv(dnsmasq: str, port: int, hosts_file: Path, upstream: tuple[str, int]) -> list[str]:
    return [
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",  # not the host's /etc/dnsmasq.conf
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts_file}",
        f"--server={upstream[0]}#{upstream[1]}",
        f"--listen-address={DNSMASQ_IP}",
        "--bind-interfaces",  # only that address, never the wildcard
        f"--port={port}",
        "--cache-size=0",
        "--pid-file=",  # none
        "--log-facility=-",
    ]


def start_servers(workdir: Path, dnsmasq: str, cleanup: Cleanup) -> tuple[Server, list[Server]]:
    """The fake upstream, then pyengine's responder and dnsmasq forwarding to it."""
    python = sys.executable
    upstream = _start_helper(
        [python, "-m", "bench.dns", "fake-upstream", "--listen", UPSTREAM_IP],
        workdir / "upstream.log",
        "fake upstream",
        cleanup,
    )
    up = f"{upstream.address[0]}:{upstream.address[1]}"
    pyengine = _start_helper(
        [python, "-m", "bench.dns", "serve-pyengine", "--listen", PYENGINE_IP, "--upstream", up],
        workdir / "pyengine.log",
        "pyengine",
        cleanup,
    )
    hosts = workdir / "hosts"
    hosts.write_text(f"{LOCAL_ADDRESS} {LOCAL_NAME} frontend\n")
    port = _free_udp_tcp_port(DNSMASQ_IP)
    argv = dnsmasq_argv(dnsmasq, port, hosts, upstream.address)
    process, _ = spawn(argv, workdir / "dnsmasq.log")
    cleanup.push(f"stop dnsmasq (pid {process.pid})", process.stop)
    if not _probe((DNSMASQ_IP, port), START_TIMEOUT_S):
        raise DnsBenchError(f"dnsmasq did not answer: {process.log_tail()}")
    servers = [pyengine, Server("dnsmasq", (DNSMASQ_IP, port), process)]
    for server in servers:
        if not _probe(server.address, START_TIMEOUT_S):
            raise DnsBenchError(f"{server.name} did not answer: {server.process.log_tail()}")
    return upstream, servers


def leftovers(servers: list[Server], workdir: Path) -> list[str]:
    """What is still there of ``servers`` and ``workdir`` after the study (expected: nothing)."""
    left = [
        f"{s.name} (pid {s.process.pid})"
        for s in servers
        if procfs.live_group_members(s.process.pid)
    ]
    for server in servers:
        host, port = server.address
        if procfs.is_listening("udp", host, port):
            left.append(f"a UDP socket on {host}:{port}")
    if workdir.exists():
        left.append(str(workdir))
    return left

"""Measures what idle proxies cost: start-up time of N proxies and their memory (smaps_rollup).

    python -m bench.footprint --count 1000 --kind fork          # pyengine-proxy, fork server
    python -m bench.footprint --count 100 --kind exec           # pyengine-proxy, exec each
    python -m bench.footprint --count 1000 --kind docker-proxy  # Debian's docker-proxy
    python -m bench.footprint --count 1000 --kind launcher      # pyengine-docker-proxy
    python -m bench.footprint --count 100 --kind launcher --wake  # and after a connection each

Every proxy listens on its own 127.0.0.1 port and forwards to 127.0.0.1:9, which is never
contacted: the proxies stay idle (``--wake``: then one connection to each port, refused by
127.0.0.1:9 behind the proxy, and the memory again; with the launcher, once more after its
proxies rested). docker-proxy and the launcher are started the way dockerd 20.10 starts its
proxy (fd 3 pipe, the proxy binds); the launcher's host server runs in a directory of its own,
killed at the end. Proxies are started one after the other, each waiting for its
fd-3 handshake, as a daemon starts the ports of ``docker run -p ... -p ...``. A measurement
tool, not a test: figures depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import uvloop

from proxy.childprocess import ChildProcess, spawn_with_fds
from proxy.handshake import STATUS_FD, read_status
from proxy.supervisor import ProxySpec, ProxySupervisor

KINDS = ("fork", "exec", "docker-proxy", "launcher")
LAUNCHER = "pyengine-docker-proxy"
REST_AFTER_SECONDS = 2
SETTLE_SECONDS = 1.0
_ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Dirty", "Shared_Dirty")


@dataclass
class Footprint:
    kind: str
    count: int
    startup_seconds: float
    startup_ms_per_proxy: float
    startup_ms_median: float
    """Median time of one start, from asking for it to its ``0\\n`` handshake."""
    mean_kb: dict[str, float]
    """Mean of each smaps_rollup field over the proxies."""
    helper_kb: dict[str, float]
    """The fork server's own smaps_rollup (empty for the other kinds)."""
    pss_kb_per_proxy_with_helper: float
    """(PSS of all proxies + PSS of the fork server) / count: the whole cost per port."""
    woken_pss_kb_per_proxy_with_helper: float | None = None
    """The same after one connection to each port (--wake)."""
    rested_pss_kb_per_proxy_with_helper: float | None = None
    """The launcher's, once its woken proxies rested (--wake)."""


def read_rollup(pid: int) -> dict[str, float]:
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = float(parts[1])
    return {name: fields.get(name, 0.0) for name in _ROLLUP_FIELDS}


async def measure(
    kind: str, count: int, docker_proxy: str, settle: float, wake: bool = False
) -> Footprint:
    if kind in ("docker-proxy", "launcher"):
        program = docker_proxy if kind == "docker-proxy" else _launcher_path()
        return await _measure_exec(kind, program, count, settle, wake)
    supervisor = ProxySupervisor(fork_server=kind == "fork")
    try:
        each: list[float] = []
        started = time.perf_counter()
        for n in range(count):
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                port = listener.getsockname()[1]
                spec = ProxySpec("tcp", "127.0.0.1", port, "127.0.0.1", 9)
                one = time.perf_counter()
                await supervisor.start(f"p{n}", spec, listener)
                each.append(time.perf_counter() - one)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(settle)
        pids = list(supervisor.pids().values())
        helper = supervisor.fork_server_pid
        return _summarise(kind, count, elapsed, each, pids, helper)
    finally:
        await supervisor.stop_all()


def _launcher_path() -> str:
    return os.path.join(os.path.dirname(sys.executable), LAUNCHER)


async def _measure_exec(
    kind: str, program: str, count: int, settle: float, wake: bool
) -> Footprint:
    """docker-proxy or the launcher, each proxy its own process started by us."""
    children: list[ChildProcess] = []
    ports: list[int] = []
    each: list[float] = []
    runtime = tempfile.mkdtemp(prefix="pyefp-")  # the launcher's host server, ours alone
    env = {
        **os.environ,
        "PYENGINE_PROXY_RUNTIME_DIR": runtime,
        "PYENGINE_PROXY_REST_AFTER": str(REST_AFTER_SECONDS),
    }
    try:
        started = time.perf_counter()
        for _ in range(count):
            one = time.perf_counter()
            child, port = await _start_docker_proxy(program, env)
            children.append(child)
            ports.append(port)
            each.append(time.perf_counter() - one)
        elapsed = time.perf_counter() - started
        await asyncio.sleep(settle)
        pids = [c.pid for c in children]
        footprint = _summarise(kind, count, elapsed, each, pids, None, _server_tree(runtime))
        if wake:
            for port in ports:
                await _touch(port)
            await asyncio.sleep(settle)
            footprint.woken_pss_kb_per_proxy_with_helper = _per_proxy(pids, _server_tree(runtime))
            if kind == "launcher":
                await asyncio.sleep(2 * REST_AFTER_SECONDS + settle)
                footprint.rested_pss_kb_per_proxy_with_helper = _per_proxy(
                    pids, _server_tree(runtime)
                )
        return footprint
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        await asyncio.gather(*(c.exited for c in children))
        for pid in _server_tree(runtime):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def _server_tree(runtime: str) -> list[int]:
    """The launcher's host server and the proxies it forked (they share its command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if runtime.encode() in f.read():
                        found.append(int(entry))
    return found


def _per_proxy(pids: list[int], helpers: list[int]) -> float:
    return round(sum(_pss(pid) for pid in [*pids, *helpers]) / len(pids), 1)


def _pss(pid: int) -> float:
    """A process's PSS in kB, 0 once it has gone (a proxy handing over as it is read)."""
    try:
        return read_rollup(pid)["Pss"]
    except OSError:
        return 0.0


async def _touch(port: int) -> None:
    """One connection through the proxy on ``port`` (127.0.0.1:9 behind it refuses it)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as client:
        client.setblocking(False)
        with contextlib.suppress(OSError):
            await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", port)), 5)
            await asyncio.wait_for(loop.sock_recv(client, 1), 5)


async def _start_docker_proxy(
    docker_proxy: str, env: dict[str, str] | None = None
) -> tuple[ChildProcess, int]:
    """One docker-proxy (or launcher) on a free port, started the way dockerd 20.10 does (fd 3
    pipe); it and its port."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        quiet = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            argv = [docker_proxy, "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port",
                    str(port), "-container-ip", "127.0.0.1", "-container-port", "9"]  # fmt: skip
            # docker-proxy logs a line to stderr when stopped; keep the report readable.
            child = spawn_with_fds(argv, {2: quiet, STATUS_FD: write_fd}, env)
            os.close(write_fd)
            write_fd = -1
            status = await read_status(read_fd)  # the supervisor's own reader, for fairness
        finally:
            os.close(read_fd)
            os.close(quiet)
            if write_fd >= 0:
                os.close(write_fd)
        if status.startswith(b"0"):
            return child, port
        await child.exited  # the port was taken meanwhile: try another
    raise RuntimeError("docker-proxy kept failing to start")


def _summarise(
    kind: str,
    count: int,
    elapsed: float,
    each: list[float],
    pids: list[int],
    helper: int | None,
    helpers: list[int] | None = None,
) -> Footprint:
    """``helper``: the fork server; ``helpers``: the launcher's host server and its forks,
    counted in the total (their sum is reported as the helper's PSS)."""
    rollups = [read_rollup(pid) for pid in pids]
    mean = {name: round(statistics.fmean(r[name] for r in rollups), 1) for name in _ROLLUP_FIELDS}
    helper_kb = read_rollup(helper) if helper is not None else {}
    if helpers:
        helper_kb = {"Pss": sum(_pss(pid) for pid in helpers)}
    total_pss = sum(r["Pss"] for r in rollups) + helper_kb.get("Pss", 0.0)
    return Footprint(
        kind=kind,
        count=count,
        startup_seconds=round(elapsed, 3),
        startup_ms_per_proxy=round(1000 * elapsed / count, 2),
        startup_ms_median=round(1000 * statistics.median(each), 2),
        mean_kb=mean,
        helper_kb=helper_kb,
        pss_kb_per_proxy_with_helper=round(total_pss / count, 1),
    )


def _raise_open_file_limit(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * count + 256))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, default="fork")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--docker-proxy", default=shutil.which("docker-proxy") or "docker-proxy")
    parser.add_argument(
        "--settle", type=float, default=SETTLE_SECONDS, help="idle seconds before measuring"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--wake", action="store_true", help="docker-proxy, launcher: measure after a connection"
    )
    args = parser.parse_args()
    _raise_open_file_limit(args.count)
    footprint = uvloop.run(
        measure(args.kind, args.count, args.docker_proxy, args.settle, args.wake)
    )
    if args.json:
        print(json.dumps(asdict(footprint)))
        return
    print(
        f"{footprint.kind}: {footprint.count} proxies started in {footprint.startup_seconds} s "
        f"({footprint.startup_ms_per_proxy} ms each, median {footprint.startup_ms_median} ms)"
    )
    print("  mean per proxy, kB: " + ", ".join(f"{k} {v:g}" for k, v in footprint.mean_kb.items()))
    if footprint.helper_kb:
        print(
            "  fork server, kB: " + ", ".join(f"{k} {v:g}" for k, v in footprint.helper_kb.items())
        )
    print(f"  PSS per proxy including the fork server: {footprint.pss_kb_per_proxy_with_helper} kB")
    if footprint.woken_pss_kb_per_proxy_with_helper is not None:
        print(f"  after a connection each: {footprint.woken_pss_kb_per_proxy_with_helper} kB")
    if footprint.rested_pss_kb_per_proxy_with_helper is not None:
        print(f"  once rested: {footprint.rested_pss_kb_per_proxy_with_helper} kB")


if __name__ == "__main__":
    main()

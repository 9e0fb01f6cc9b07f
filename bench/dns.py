"""``pyengine-bench dns`` (or ``python -m bench.dns``): pyengine's embedded DNS responder against
dnsmasq, on one machine, in one run.

Two scenarios, each answered by both servers, alternated sample by sample (A B, then B A):

* ``local``: a container name the server knows itself (pyengine: a NameTable record seen
  through the client container's ScopedNames; dnsmasq: an ``--addn-hosts`` line);
* ``forwarded``: a name under example.test, sent on to a fake upstream that answers every query
  at once (a distinct name per query, so neither server can merge identical queries in flight;
  dnsmasq runs with ``--cache-size=0``, as pyengine, like Docker's embedded DNS, caches nothing).

The load generator is this process: one UDP socket, a fixed number of queries in flight (64 by
default), a new query sent for every reply, for a bounded time after a warm-up. It reports
answered queries per second, p50/p99 latency (send to reply, so it includes the time a query
waits behind the others in flight) and the server's CPU time per answered query (from
/proc/PID/stat: the figure least affected by a shared machine or a saturated client).

Everything listens on loopback only: pyengine's responder on 127.0.57.1 (an ``EmbeddedDns``
in a helper process, attached to that process's own network namespace; in the daemon it is a
container's), dnsmasq on 127.0.57.2, the fake upstream on 127.0.57.3, each on a free port. The
helpers and dnsmasq are stopped (by process group) and their temporary directory removed on
success, failure, ^C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procfs
from bench.accounting import CpuSnapshot, usage_between
from bench.cleanup import Cleanup, Interrupted
from bench.results import ratio, summarize
from bench.spawn import SpawnedProcess, SpawnError, read_status, spawn
from bench.tools import MissingTool, Tool, find_tools, machine_description
from common.jsonstate import write_json_atomic
from common.timefmt import utc_rfc3339

SCHEMA = "pyengine-bench-dns/1"
SERVERS = ("pyengine", "dnsmasq")
SCENARIOS = ("local", "forwarded")
DNSMASQ = Tool("dnsmasq", "dnsmasq-base", "the DNS server pyengine's responder is compared with")

PYENGINE_IP = "127.0.57.1"
DNSMASQ_IP = "127.0.57.2"
UPSTREAM_IP = "127.0.57.3"
LOCAL_NAME = "web"
LOCAL_ADDRESS = "10.52.0.2"
FORWARDED_ZONE = "example.test"
FORWARDED_ADDRESS = "198.18.0.10"  # what the fake upstream answers (RFC 2544's range)
FORWARDED_NAMES = 4096  # distinct forwarded names, cycled
FILLER_CONTAINERS = 30  # other records on the benchmark network, so the table is not trivial
BENCH_NETWORK = "pyebench-dns"
CLIENT_ID = "pyebench-dns-client"

LOSS_TIMEOUT_S = 0.5  # a query unanswered this long is counted lost and replaced
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
MAX_DURATION_S = 60.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# RFC 1035 §4.1.1 header fields as the load generator reads them.
FLAG_QR = 0x8000
FLAG_RD = 0x0100
FLAG_RA = 0x0080
OPCODE_AND_RD = 0x7900
TYPE_A = 1
CLASS_IN = 1


class DnsBenchError(Exception):
    """The benchmark could not set up or run a server; the message says why."""


# -- the queries and the fake upstream's replies (raw wire format, RFC 1035 §4.1) --------------


def encode_name(name: str) -> bytes:
    out = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split("."))
    return out + b"\x00"


def query_without_id(name: str) -> bytes:
    """A standard query for ``name`` A, RD set, without its first two octets (the ID)."""
    header_rest = struct.pack("!5H", FLAG_RD, 1, 0, 0, 0)
    return header_rest + encode_name(name) + struct.pack("!HH", TYPE_A, CLASS_IN)


def queries_for(scenario: str) -> list[bytes]:
    if scenario == "local":
        return [query_without_id(LOCAL_NAME)]
    return [query_without_id(f"q{i}.{FORWARDED_ZONE}") for i in range(FORWARDED_NAMES)]


def upstream_reply(query: bytes) -> bytes | None:
    """The fake upstream's reply: the question echoed and, for an A question, one A record
    pointing back at it (a compression pointer to offset 12, RFC 1035 §4.1.4). Additional
    records of the query (an EDNS OPT) are not echoed. None for anything but a query."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack_from("!3H", query)
    if flags & FLAG_QR or qdcount != 1:
        return None
    end = 12
    while end < len(query) and query[end]:
        if query[end] & 0xC0:
            return None  # a query's only name is never compressed
        end += query[end] + 1
    end += 5  # the root label, QTYPE, QCLASS
    if end > len(query):
        return None
    qtype = struct.unpack_from("!H", query, end - 4)[0]
    answer = b""
    if qtype == TYPE_A:
        rdata = socket.inet_aton(FORWARDED_ADDRESS)
        answer = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, 60, 4) + rdata
    header = struct.pack(
        "!6H", qid, FLAG_QR | FLAG_RA | (flags & OPCODE_AND_RD), 1, 1 if answer else 0, 0, 0
    )
    return header + query[12:end] + answer


# -- the load generator --------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One load run against one server: counts over the measured window, latencies in ms."""

    answered: int  # good replies received in the measured window
    answered_total: int  # good replies, warm-up included (for CPU per query)
    errors: int  # replies with a non-NOERROR rcode or no answer
    lost: int  # queries unanswered after LOSS_TIMEOUT_S
    seconds: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def qps(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def _percentile(sorted_values: list[int], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index] / 1e6


def run_load(
    server: tuple[str, int],
    queries: list[bytes],
    duration_s: float,
    inflight: int,
    warmup_s: float,
) -> LoadResult:
    """Keep ``inflight`` queries outstanding against ``server`` for ``warmup_s`` +
    ``duration_s`` seconds, cycling through ``queries`` (each without its ID); measure over
    the last ``duration_s``."""
    ids = [i.to_bytes(2, "big") for i in range(65536)]
    clock = time.perf_counter_ns
    pending: dict[int, int] = {}  # query ID -> send time; insertion order is send order
    latencies: list[int] = []
    answered_total = errors = lost = 0
    next_id = 0
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.connect(server)
        sock.settimeout(LOSS_TIMEOUT_S / 5)
        send, recv = sock.send, sock.recv
        started = clock()
        measure_from = started + int(warmup_s * 1e9)
        deadline = measure_from + int(duration_s * 1e9)
        loss_ns = int(LOSS_TIMEOUT_S * 1e9)
        count = len(queries)

        def send_query() -> None:
            nonlocal next_id, sent
            while next_id in pending:  # an ID still in flight after 65536 sends: skip it
                next_id = (next_id + 1) & 0xFFFF
            pending[next_id] = clock()
            send(ids[next_id] + queries[sent % count])
            next_id = (next_id + 1) & 0xFFFF
            sent += 1

        for _ in range(inflight):
            send_query()
        now = clock()
        while now < deadline:
            try:
                reply = recv(4096)
            except TimeoutError:
                reply = b""
            except ConnectionRefusedError as exc:
                raise DnsBenchError(f"{server[0]}:{server[1]} refused the queries") from exc
            now = clock()
            if len(reply) >= 12:
                sent_at = pending.pop((reply[0] << 8) | reply[1], None)
                if sent_at is not None:
                    # RCODE is the low nibble of octet 3; ANCOUNT octets 6-7 (RFC 1035 §4.1.1).
                    if reply[3] & 0x0F or not (reply[6] or reply[7]):
                        errors += 1
                    else:
                        answered_total += 1
                        if now >= measure_from:
                            latencies.append(now - sent_at)
                    send_query()
            # Replace queries lost on the way (the oldest one first: the dict is in send order).
            while pending:
                oldest_id, oldest_at = next(iter(pending.items()))
                if now - oldest_at < loss_ns:
                    break
                del pending[oldest_id]
                lost += 1
                send_query()
    latencies.sort()
    return LoadResult(
        answered=len(latencies),
        answered_total=answered_total,
        errors=errors,
        lost=lost,
        seconds=duration_s,
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
    )


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


# -- the study -----------------------------------------------------------------------------------


@dataclass
class DnsBenchConfig:
    duration_s: float = 3.0
    warmup_s: float = 0.5
    repeat: int = 3
    inflight: int = 64
    scenarios: tuple[str, ...] = SCENARIOS

    def validate(self) -> None:
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 0 <= self.warmup_s <= MAX_DURATION_S:
            raise ValueError(f"--warmup must be in [0, {MAX_DURATION_S:g}] seconds")
        if not 1 <= self.repeat <= 20:
            raise ValueError("--repeat must be in 1..20")
        if not 1 <= self.inflight <= 1024:
            raise ValueError("--inflight must be in 1..1024")
        unknown = [s for s in self.scenarios if s not in SCENARIOS]
        if unknown or not self.scenarios:
            raise ValueError(f"--scenarios: choose among {','.join(SCENARIOS)}")


@dataclass
class DnsSample:
    scenario: str
    server: str
    rep: int
    qps: float
    p50_ms: float | None
    p99_ms: float | None
    answered: int
    errors: int
    lost: int
    server_cpu_us_per_query: float | None
    client_cpu_share: float  # the load generator's CPU over wall time (1.0: it was the limit)
    foreign_cpu_s: float  # CPU time of processes this benchmark did not start
    started: float = field(default_factory=time.time)


def measure(
    cfg: DnsBenchConfig, server: Server, upstream: Server, scenario: str, rep: int
) -> DnsSample:
    queries = queries_for(scenario)
    roots = [server.process.pid, upstream.process.pid]
    before = CpuSnapshot.take(roots, [], [server.process.pid])
    own_before = time.process_time()
    wall_before = time.monotonic()
    load = run_load(server.address, queries, cfg.duration_s, cfg.inflight, cfg.warmup_s)
    wall = time.monotonic() - wall_before
    own = time.process_time() - own_before
    usage = usage_between(before, CpuSnapshot.take(roots, [], [server.process.pid]))
    per_query = usage.proxy / load.answered_total * 1e6 if load.answered_total else None
    return DnsSample(
        scenario=scenario,
        server=server.name,
        rep=rep,
        qps=round(load.qps, 1),
        p50_ms=load.p50_ms,
        p99_ms=load.p99_ms,
        answered=load.answered,
        errors=load.errors,
        lost=load.lost,
        server_cpu_us_per_query=None if per_query is None else round(per_query, 2),
        client_cpu_share=round(own / wall, 3) if wall > 0 else 0.0,
        foreign_cpu_s=round(usage.foreign, 3),
    )


def summary_of(samples: list[DnsSample], scenarios: tuple[str, ...]) -> dict[str, Any]:
    """Per scenario: each server's medians (with min and max), and pyengine ÷ dnsmasq."""
    keys = ("qps", "p50_ms", "p99_ms", "server_cpu_us_per_query")
    out: dict[str, Any] = {}
    for scenario in scenarios:
        cell: dict[str, Any] = {}
        for server in SERVERS:
            mine = [s for s in samples if s.scenario == scenario and s.server == server]
            cell[server] = {}
            for key in keys:
                stat = summarize(getattr(s, key) for s in mine)
                cell[server][key] = None if stat is None else asdict(stat)
        cell["ratio"] = {
            key: ratio(
                (cell["pyengine"][key] or {}).get("median"),
                (cell["dnsmasq"][key] or {}).get("median"),
            )
            for key in keys
        }
        out[scenario] = cell
    return out


def _figure(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _with_range(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    median, low, high = stat["median"], stat["low"], stat["high"]
    if stat["count"] == 1:
        return _figure(median, digits)
    return f"{_figure(median, digits)} ({_figure(low, digits)}–{_figure(high, digits)})"


def render(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [
        f"DNS: {cfg['inflight']} queries in flight, {cfg['repeat']} × {cfg['duration_s']:g} s "
        "per server and scenario, alternated; medians (min–max)",
        "",
        "| scenario | server | queries/s | p50 ms | p99 ms | server CPU µs/query |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for scenario, cell in doc["summary"].items():
        for server in SERVERS:
            figures = cell[server]
            lines.append(
                f"| {scenario} | {server} | {_with_range(figures['qps'], 0)} | "
                f"{_with_range(figures['p50_ms'], 3)} | {_with_range(figures['p99_ms'], 3)} | "
                f"{_with_range(figures['server_cpu_us_per_query'], 1)} |"
            )
    lines += [
        "",
        "| scenario | pyengine ÷ dnsmasq: queries/s | p50 | p99 | CPU per query |",
        "|---|---:|---:|---:|---:|",
    ]
    for scenario, cell in doc["summary"].items():
        r = cell["ratio"]
        lines.append(
            f"| {scenario} | {_figure(r['qps'])} | {_figure(r['p50_ms'])} | "
            f"{_figure(r['p99_ms'])} | {_figure(r['server_cpu_us_per_query'])} |"
        )
    busy = [s["client_cpu_share"] for s in doc["samples"]]
    foreign = [s["foreign_cpu_s"] / cfg["duration_s"] for s in doc["samples"]]
    if busy:
        lines += [
            "",
            f"Load generator CPU share: median {statistics.median(busy):.2f} "
            f"(max {max(busy):.2f}; near 1.0 it, not the server, set the pace).",
            f"Other processes on the machine: median {statistics.median(foreign):.2f} CPUs "
            "busy during a sample.",
        ]
    if doc.get("aborted"):
        lines += ["", f"Aborted: {doc['aborted']}; the figures above are incomplete."]
    return "\n".join(lines) + "\n"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.strip().splitlines() or ["unknown"])[0]


def _leftovers(servers: list[Server], workdir: Path) -> list[str]:
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


def run_study(cfg: DnsBenchConfig, dnsmasq: str, command: str) -> tuple[dict[str, Any], int]:
    """Start everything, measure, stop everything; the JSON document and the exit status."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "started": utc_rfc3339(digits=0),
        "machine": machine_description(),
        "tools": {
            "dnsmasq": _version([dnsmasq, "--version"]),
            "python": sys.version.split()[0],
        },
        "config": asdict(cfg),
        "samples": [],
        "leftovers": [],
    }
    samples: list[DnsSample] = []
    started: list[Server] = []
    workdir = Path(tempfile.mkdtemp(prefix="pyebench-dns-"))
    exit_code = 0
    try:
        with Cleanup() as cleanup:
            cleanup.push(f"remove {workdir}", lambda: shutil.rmtree(workdir, ignore_errors=True))
            upstream, servers = start_servers(workdir, dnsmasq, cleanup)
            started = [upstream, *servers]
            total = cfg.repeat * len(cfg.scenarios) * len(servers)
            for rep in range(cfg.repeat):
                for scenario in cfg.scenarios:
                    order = servers if rep % 2 == 0 else servers[::-1]
                    for server in order:
                        sample = measure(cfg, server, upstream, scenario, rep)
                        samples.append(sample)
                        print(
                            f"[{len(samples)}/{total}] {scenario} {server.name}: "
                            f"{sample.qps:,.0f} q/s, p50 {_figure(sample.p50_ms, 3)} ms, "
                            f"p99 {_figure(sample.p99_ms, 3)} ms",
                            file=sys.stderr,
                            flush=True,
                        )
    except (KeyboardInterrupt, Interrupted) as exc:
        doc["aborted"] = str(exc) or "stopped by SIGINT"
        exit_code = EXIT_INTERRUPTED
    except (DnsBenchError, SpawnError, OSError) as exc:
        print(f"pyengine-bench dns: {exc}", file=sys.stderr)
        doc["aborted"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        exit_code = EXIT_FAILED
    doc["finished"] = utc_rfc3339(digits=0)
    doc["samples"] = [asdict(s) for s in samples]
    doc["summary"] = summary_of(samples, cfg.scenarios)
    doc["leftovers"] = _leftovers(started, workdir)
    if doc["leftovers"]:
        print(f"left behind: {', '.join(doc['leftovers'])}", file=sys.stderr)
        exit_code = exit_code or EXIT_FAILED
    return doc, exit_code


# -- command line --------------------------------------------------------------------------------


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Queries/s and p50/p99 of pyengine's embedded DNS responder against "
        "dnsmasq, for a local name and a forwarded one, on loopback.",
    )
    p.add_argument("--duration", type=float, default=3.0, help="seconds measured per sample")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of load before measuring")
    p.add_argument("--repeat", type=int, default=3, help="samples per server and scenario")
    p.add_argument("--inflight", type=int, default=64, help="queries outstanding at any time")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument("--json", type=Path, help="also write every sample and the summary here")
    p.add_argument(
        "--install-missing", action="store_true", help="apt-get install dnsmasq-base if missing"
    )
    return p


def _helper_main(argv: list[str]) -> int:
    """The helper processes the study starts: ``fake-upstream`` and ``serve-pyengine``."""
    p = argparse.ArgumentParser(prog="python -m bench.dns")
    p.add_argument("helper", choices=("fake-upstream", "serve-pyengine"))
    p.add_argument("--listen", required=True, help="IPv4 address (a free port is chosen)")
    p.add_argument("--upstream", help="IP:PORT (serve-pyengine)")
    args = p.parse_args(argv)
    if args.helper == "fake-upstream":
        serve_fake_upstream(args.listen)
    elif args.upstream:
        serve_pyengine(args.listen, args.upstream)
    else:
        p.error("serve-pyengine needs --upstream")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m bench.dns") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["fake-upstream"], ["serve-pyengine"]):
        return _helper_main(argv)
    args = parser(prog).parse_args(argv)
    cfg = DnsBenchConfig(
        duration_s=args.duration,
        warmup_s=args.warmup,
        repeat=args.repeat,
        inflight=args.inflight,
        scenarios=tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"{prog}: needs root (dnsmasq, setns into the namespace)", file=sys.stderr)
        return EXIT_FAILED
    try:
        dnsmasq = find_tools((DNSMASQ,), install=args.install_missing)[DNSMASQ.name]
    except MissingTool as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    doc, exit_code = run_study(cfg, dnsmasq, f"{prog} {shlex.join(argv)}".strip())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, doc)
    if doc["samples"]:
        print(render(doc), end="")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())

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

This module is the study and its command line; the queries and the load generator are in
``bench.dnsload``, the servers' processes in ``bench.dnsservers``, the figures and tables in
``bench.dnsresults``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.accounting import CpuSnapshot, usage_between
from bench.cleanup import Cleanup, Interrupted
from bench.dnsload import DnsBenchError, queries_for, run_load
from bench.dnsresults import DnsSample, figure, render, summary_of
from bench.dnsservers import Server, leftovers, serve_fake_upstream, serve_pyengine, start_servers
from bench.spawn import SpawnError
from bench.tools import MissingTool, Tool, find_tools, machine_description
from common.jsonstate import write_json_atomic
from common.timefmt import utc_rfc3339

SCHEMA = "pyengine-bench-dns/1"
SCENARIOS = ("local", "forwarded")
DNSMASQ = Tool("dnsmasq", "dnsmasq-base", "the DNS server pyengine's responder is compared with")

STOP_TIMEOUT_S = 5.0
MAX_DURATION_S = 60.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.strip().splitlines() or ["unknown"])[0]


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
                            f"{sample.qps:,.0f} q/s, p50 {figure(sample.p50_ms, 3)} ms, "
                            f"p99 {figure(sample.p99_ms, 3)} ms",
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
    doc["leftovers"] = leftovers(started, workdir)
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

"""The figures of ``pyengine-bench dns``: one sample per server, scenario and repetition, the
per-scenario summary (medians, pyengine ÷ dnsmasq) and the Markdown tables printed at the end."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.results import ratio, summarize

SERVERS = ("pyengine", "dnsmasq")


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


def figure(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _with_range(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if stat is None:
        return "–"
    median, low, high = stat["median"], stat["low"], stat["high"]
    if stat["count"] == 1:
        return figure(median, digits)
    return f"{figure(median, digits)} ({figure(low, digits)}–{figure(high, digits)})"


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
            f"| {scenario} | {figure(r['qps'])} | {figure(r['p50_ms'])} | "
            f"{figure(r['p99_ms'])} | {figure(r['server_cpu_us_per_query'])} |"
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

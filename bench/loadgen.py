"""The load generators: iperf3 (TCP and UDP throughput) and wrk (HTTP), with parsed results.

Every run is bounded: the tool's own duration plus a subprocess timeout; a client that hangs
is killed. Clients run in the host's namespace or, for the external path, inside the client
namespace through ``ip netns exec``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.topology import in_netns

GRACE_SECONDS = 20  # on top of a run's duration before the client is killed
BUSY_RETRIES = 3  # iperf3 -s serves one test at a time; a late previous one makes it "busy"
CONNECT_TIMEOUT_MS = 3000

# wrk's done() hook (wrk(1) SCRIPTING): exact counts and percentiles in one JSON line, rather
# than the rounded human summary.
WRK_REPORT_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PYEBENCH {"duration_us":%d,"requests":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"p50_us":%.1f,"p99_us":%.1f,"mean_us":%.1f}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""
WRK_REPORT_PREFIX = "PYEBENCH "


@dataclass(frozen=True)
class Target:
    """Where a client connects, and from which namespace (None: the engine host itself)."""

    netns: str | None
    ip: str
    port: int

    def url(self, path: str) -> str:
        return f"http://{self.ip}:{self.port}{path}"


@dataclass(frozen=True)
class IperfResult:
    bits_per_second: float
    bytes: int
    seconds: float
    jitter_ms: float | None = None  # UDP only
    lost_percent: float | None = None  # UDP only


@dataclass(frozen=True)
class WrkResult:
    requests: int
    bytes: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int  # connect + read + write + timeouts + non-2xx/3xx answers

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


class LoadError(Exception):
    """A client run that produced no usable result; the message says why in one line."""


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def parse_iperf3(doc: dict[str, Any], udp: bool) -> IperfResult:
    """Receiver-side figures from ``iperf3 -J`` output (iperf 3.12's layout)."""
    if doc.get("error"):
        raise LoadError(f"iperf3: {doc['error']}")
    end = doc.get("end") or {}
    received = end.get("sum_received") or (end.get("sum") if udp else None)
    if not received:
        raise LoadError("iperf3: no end.sum_received in its JSON output")
    if udp:
        # end.sum_received carries the loss and jitter the server measured (exchanged at the end)
        return IperfResult(
            bits_per_second=float(received["bits_per_second"]),
            bytes=int(received["bytes"]),
            seconds=float(received["seconds"]),
            jitter_ms=float(received.get("jitter_ms", 0.0)),
            lost_percent=float(received.get("lost_percent", 0.0)),
        )
    return IperfResult(
        bits_per_second=float(received["bits_per_second"]),
        bytes=int(received["bytes"]),
        seconds=float(received["seconds"]),
    )


def iperf3_argv(
    binary: str,
    target: Target,
    duration: int,
    streams: int = 1,
    udp_rate: str | None = None,
    udp_length: int = 1400,
) -> list[str]:
    argv = [
        binary,
        "-c",
        target.ip,
        "-p",
        str(target.port),
        "-t",
        str(duration),
        "-P",
        str(streams),
        "-J",
        "--connect-timeout",
        str(CONNECT_TIMEOUT_MS),
    ]
    if udp_rate is not None:
        argv += ["-u", "-b", udp_rate, "-l", str(udp_length)]
    return in_netns(target.netns, argv)


def run_iperf3(
    binary: str,
    target: Target,
    duration: int,
    streams: int = 1,
    udp_rate: str | None = None,
    udp_length: int = 1400,
) -> IperfResult:
    argv = iperf3_argv(binary, target, duration, streams, udp_rate, udp_length)
    last_error = ""
    for attempt in range(BUSY_RETRIES):
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=duration + GRACE_SECONDS
            )
        except subprocess.TimeoutExpired:
            raise LoadError(f"iperf3 did not finish within {duration + GRACE_SECONDS} s") from None
        try:
            doc = json.loads(result.stdout)
        except ValueError:
            raise LoadError(
                f"iperf3 exited {result.returncode}: {_one_line(result.stderr or result.stdout)}"
            ) from None
        try:
            return parse_iperf3(doc, udp=udp_rate is not None)
        except LoadError as exc:
            last_error = str(exc)
            if "busy" not in last_error or attempt == BUSY_RETRIES - 1:
                raise
            time.sleep(1.0)
    raise LoadError(last_error)


def parse_wrk(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(WRK_REPORT_PREFIX):
            doc = json.loads(line[len(WRK_REPORT_PREFIX) :])
            break
    else:
        raise LoadError(f"wrk printed no report: {_one_line(stdout)}")
    errors = sum(
        int(doc[k])
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkResult(
        requests=int(doc["requests"]),
        bytes=int(doc["bytes"]),
        seconds=int(doc["duration_us"]) / 1e6,
        p50_ms=float(doc["p50_us"]) / 1000,
        p99_ms=float(doc["p99_us"]) / 1000,
        mean_ms=float(doc["mean_us"]) / 1000,
        errors=errors,
    )


def wrk_argv(
    binary: str,
    target: Target,
    path: str,
    duration: int,
    script: Path,
    keepalive: bool = True,
    threads: int = 2,
    connections: int = 50,
) -> list[str]:
    argv = [
        binary,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--timeout",
        "2s",
        "-s",
        str(script),
    ]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(target.url(path))
    return in_netns(target.netns, argv)


def run_wrk(
    binary: str,
    target: Target,
    path: str,
    duration: int,
    script: Path,
    keepalive: bool = True,
    threads: int = 2,
    connections: int = 50,
) -> WrkResult:
    argv = wrk_argv(binary, target, path, duration, script, keepalive, threads, connections)
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + GRACE_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise LoadError(f"wrk did not finish within {duration + GRACE_SECONDS} s") from None
    if result.returncode != 0:
        raise LoadError(f"wrk exited {result.returncode}: {_one_line(result.stderr)}")
    parsed = parse_wrk(result.stdout)
    if parsed.requests == 0:
        raise LoadError(f"wrk completed no request: {_one_line(result.stdout)}")
    return parsed

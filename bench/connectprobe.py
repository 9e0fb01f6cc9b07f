"""First-packet latency through DNAT: the time connect(2) takes, one connection at a time.

The kernel looks a new connection's destination up in the NAT rules once, on its first packet
(the SYN); every later packet follows the conntrack entry. wrk's latency starts when a request
is written, after the handshake, so it never contains that lookup. A blocking connect()
returns when the SYN-ACK has come back (tcp(7)): one round trip, SYN through the DNAT lookup,
answered by the container's kernel without nginx being scheduled. Timed one at a time from
the client namespace, its percentiles are the first-packet latency.

Each connection is closed with SO_LINGER {1, 0} (socket(7)): a RST instead of a FIN, so the
client namespace keeps no TIME_WAIT sockets and thousands of probes never run out of ports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from bench.topology import in_netns

GRACE_SECONDS = 20
MAX_CONNECTIONS = 20000

# Runs inside the client namespace (python -c): connects until the time or the count is
# reached, and prints the sorted sample's percentiles as one JSON line.
_PROBE = """\
import json, socket, struct, sys, time
host, port, seconds, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
linger = struct.pack("ii", 1, 0)
took, errors = [], 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and len(took) < limit:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.settimeout(1.0)
    t0 = time.perf_counter_ns()
    try:
        s.connect((host, port))
        took.append(time.perf_counter_ns() - t0)
    except OSError:
        errors += 1
    finally:
        s.close()
took.sort()
pick = lambda q: took[min(len(took) - 1, int(q * len(took)))] / 1e6 if took else None
print(json.dumps({"connects": len(took), "errors": errors, "p50_ms": pick(0.5),
                  "p99_ms": pick(0.99), "max_ms": took[-1] / 1e6 if took else None}))
"""


class ProbeError(Exception):
    pass


@dataclass(frozen=True)
class ConnectLatency:
    connects: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def measure_connect_latency(
    netns: str | None, ip: str, port: int, seconds: float, limit: int = MAX_CONNECTIONS
) -> ConnectLatency:
    """Time ``connect()`` to ``ip:port`` from ``netns``, one connection at a time, for
    ``seconds`` (or ``limit`` connections)."""
    argv = [sys.executable, "-c", _PROBE, ip, str(port), str(seconds), str(limit)]
    try:
        result = subprocess.run(
            in_netns(netns, argv),
            capture_output=True,
            text=True,
            timeout=seconds + GRACE_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProbeError(f"connect probe to {ip}:{port} hung") from exc
    if result.returncode != 0:
        raise ProbeError(f"connect probe to {ip}:{port}: {result.stderr.strip()[-300:]}")
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    if not doc["connects"]:
        raise ProbeError(f"connect probe to {ip}:{port}: no connection ({doc['errors']} errors)")
    return ConnectLatency(
        doc["connects"], doc["errors"], doc["p50_ms"], doc["p99_ms"], doc["max_ms"]
    )

"""Which of the published host ports have a listening TCP socket, read from /proc/net/tcp and
/proc/net/tcp6 (proc(5)) rather than by connecting: a connection would wake each idle proxy
into its event loop and make it copy the pages it touches (~6 MB each), which 10,000 proxies
cannot afford. In proxy mode a port listens once its proxy made the socket ready (netd's
reservation is bound, not listening), so this counts the proxies that took their port."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


def listening_tcp_ports(proc_net: Path = Path("/proc/net")) -> set[tuple[str, int]]:
    """(family, port) of every TCP socket in LISTEN in this network namespace."""
    found: set[tuple[str, int]] = set()
    for family in ("tcp", "tcp6"):
        try:
            lines = (proc_net / family).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                found.add((family, int(fields[1].rpartition(":")[2], 16)))
    return found


def count_listening(ports: Iterable[int], families: Iterable[str] = ("tcp",)) -> int:
    """How many of ``ports`` listen in every one of ``families`` ("tcp": IPv4, "tcp6")."""
    found = listening_tcp_ports()
    wanted = tuple(families)
    return sum(1 for port in ports if all((f, port) in found for f in wanted))

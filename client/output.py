"""How the client prints: aligned tables, relative times, published ports."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click


def ago(rfc3339_or_unix: Any) -> str:
    if isinstance(rfc3339_or_unix, int):
        then = datetime.fromtimestamp(rfc3339_or_unix, UTC)
    else:
        then = datetime.fromisoformat(str(rfc3339_or_unix).replace("Z", "+00:00"))
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{seconds} seconds ago" if seconds > 1 else "Less than a second ago"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())


def join_host_port(ip: str, port: Any) -> str:
    """``0.0.0.0:8080``, ``[::]:8080``: as the docker CLI prints a host binding."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def format_ports(ports: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{join_host_port(p['IP'], p['PublicPort'])}->{p['PrivatePort']}/{p['Type']}"
        if p.get("PublicPort")
        else f"{p['PrivatePort']}/{p['Type']}"
        for p in ports
    )

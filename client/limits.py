"""Resource limits on the command line: ``run``/``create``'s ``--memory``, ``--cpus``... (Docker's
spelling and units), ``update``, ``stats`` and ``top``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import Client
from client.output import print_table

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, what: str) -> int:
    """Docker's RAMInBytes: ``64m`` → 67108864 (binary units; ``-1``: unlimited)."""
    if text.strip() == "-1":
        return -1
    match = _SIZE.match(text.strip())
    if not match:
        fail(f'invalid argument {text!r} for "{what}" flag: invalid size: {text!r}', 125)
    return int(Decimal(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_cpus(text: str) -> int:
    """``--cpus 1.5`` → 1500000000 NanoCpus (the daemon checks the range)."""
    try:
        nanos = Decimal(text) * 10**9
    except InvalidOperation:
        fail(
            f'invalid argument {text!r} for "--cpus" flag: {text} is not a number',
            125,
        )
    if nanos != nanos.to_integral_value():
        fail(f'invalid argument {text!r} for "--cpus" flag: value is too precise', 125)
    return int(nanos)


LIMIT_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("-m", "--memory", default=None, help="Memory limit (e.g. 64m)."),
    click.option("--memory-swap", default=None, help="Memory plus swap (-1: unlimited swap)."),
    click.option("--memory-reservation", default=None, help="Memory soft limit."),
    click.option("--cpus", default=None, help="Number of CPUs (e.g. 0.5)."),
    click.option("-c", "--cpu-shares", type=int, default=None, help="CPU shares (weight)."),
    click.option("--cpu-period", type=int, default=None, help="CFS period (µs)."),
    click.option("--cpu-quota", type=int, default=None, help="CFS quota (µs)."),
    click.option("--cpuset-cpus", default=None, help="CPUs allowed (0-3, 0,1)."),
    click.option("--pids-limit", type=int, default=None, help="Process limit (-1: unlimited)."),
]


def limits_host_config(options: dict[str, Any]) -> dict[str, Any]:
    """The HostConfig fields of the limit options given (the others are left out)."""
    out: dict[str, Any] = {}
    for key, flag, field in (
        ("memory", "--memory", "Memory"),
        ("memory_swap", "--memory-swap", "MemorySwap"),
        ("memory_reservation", "--memory-reservation", "MemoryReservation"),
    ):
        if options.get(key) is not None:
            out[field] = parse_size(options[key], flag)
    if options.get("cpus") is not None:
        out["NanoCpus"] = parse_cpus(options["cpus"])
    for key, field in (
        ("cpu_shares", "CpuShares"),
        ("cpu_period", "CpuPeriod"),
        ("cpu_quota", "CpuQuota"),
        ("cpuset_cpus", "CpusetCpus"),
        ("pids_limit", "PidsLimit"),
    ):
        if options.get(key) is not None:
            out[field] = options[key]
    return out


def limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(LIMIT_OPTIONS):
        fn = option(fn)
    return fn


def _restart_policy(text: str) -> dict[str, Any]:
    name, _, retries = text.partition(":")
    if retries and not retries.isdigit():
        fail(f"invalid restart policy {text!r}", 125)
    return {"Name": name, "MaximumRetryCount": int(retries or 0)}


@click.command()
@limit_options
@click.option("--restart", default=None, help="Restart policy (no, always, on-failure[:N]...).")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def update(
    ctx: click.Context, containers: tuple[str, ...], restart: str | None, **options: Any
) -> None:
    """Change the limits (and restart policy) of containers."""
    body = limits_host_config(options)
    if restart is not None:
        body["RestartPolicy"] = _restart_policy(restart)
    client = daemon_client(ctx)
    for ref in containers:
        client.json("POST", f"/containers/{ref}/update", body=body)
        click.echo(ref)


def _human(n: float) -> str:
    """Docker's HumanSize: decimal units, 3 significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n}B"


def _binary(n: float) -> str:
    """Docker's BytesSize: binary units."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.4g}{unit}"
        n /= 1024
    return f"{n}B"


def stats_row(s: dict[str, Any]) -> list[str]:
    """One line of ``stats``, computed as docker CLI's stats_helpers.go does."""
    cpu, pre = s.get("cpu_stats") or {}, s.get("precpu_stats") or {}
    cpu_delta = (cpu.get("cpu_usage") or {}).get("total_usage", 0) - (
        pre.get("cpu_usage") or {}
    ).get("total_usage", 0)
    system_delta = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
    cpus = cpu.get("online_cpus") or 1
    percent = cpu_delta / system_delta * cpus * 100 if system_delta > 0 and cpu_delta > 0 else 0.0
    mem = s.get("memory_stats") or {}
    stats = mem.get("stats") or {}
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))
    used = max(0, mem.get("usage", 0) - inactive)
    limit = mem.get("limit", 0)
    nets = (s.get("networks") or {}).values()
    rx, tx = sum(n.get("rx_bytes", 0) for n in nets), sum(n.get("tx_bytes", 0) for n in nets)
    blk = (s.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    read = sum(e["value"] for e in blk if str(e.get("op", "")).lower() == "read")
    write = sum(e["value"] for e in blk if str(e.get("op", "")).lower() == "write")
    return [
        s.get("id", "")[:12],
        s.get("name", "").lstrip("/"),
        f"{percent:.2f}%",
        f"{_binary(used)} / {_binary(limit)}",
        f"{used / limit * 100 if limit else 0:.2f}%",
        f"{_human(rx)} / {_human(tx)}",
        f"{_human(read)} / {_human(write)}",
        str((s.get("pids_stats") or {}).get("current", 0)),
    ]


STATS_TITLES = [
    "CONTAINER ID",
    "NAME",
    "CPU %",
    "MEM USAGE / LIMIT",
    "MEM %",
    "NET I/O",
    "BLOCK I/O",
    "PIDS",
]


def _snapshot(client: Client, refs: tuple[str, ...]) -> list[list[str]]:
    return [
        stats_row(client.json("GET", f"/containers/{r}/stats", query={"stream": "false"}))
        for r in refs
    ]


@click.command()
@click.option("--no-stream", is_flag=True, help="Print one sample and exit.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def stats(ctx: click.Context, no_stream: bool, containers: tuple[str, ...]) -> None:
    """Containers' CPU, memory, network and block I/O use."""
    client = daemon_client(ctx)
    while True:
        rows = _snapshot(client, containers)
        if not no_stream:
            click.echo("\033[2J\033[H", nl=False)
        print_table([STATS_TITLES, *rows])
        if no_stream:
            return
        time.sleep(0.5)


@click.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
@click.argument("container")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors()
def top(ctx: click.Context, container: str, ps_args: tuple[str, ...]) -> None:
    """The processes of a running container (ps options may follow)."""
    query = {"ps_args": " ".join(ps_args)} if ps_args else None
    result = daemon_client(ctx).json("GET", f"/containers/{container}/top", query=query)
    print_table([result["Titles"], *(result["Processes"] or [])])


COMMANDS = (update, stats, top)

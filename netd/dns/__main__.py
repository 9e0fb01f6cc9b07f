"""``python -m netd.dns``: one embedded DNS responder, standalone, for tests and labs.

The names file is JSON, one entry per container::

    {"<container id>": {"names": ["web", "alias"], "ipv4": ["10.52.0.2"], "ipv6": []}}

It is read at start and again on SIGHUP (a bad file keeps the previous table). The responder
prints ``listening on HOST:PORT`` once it listens, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
import uvloop

from common.jsonstate import read_json
from netd.dns.records import NameTable
from netd.dns.resolvconf import load_host_upstreams
from netd.dns.server import DnsResponder
from netd.errors import NetdError


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT`` (the port may be left out when there is a default)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise click.BadParameter(f"{text!r} needs a port (IP:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise click.BadParameter(f"bad port in {text!r}")
    return host, int(port_text)


def load_names(table: NameTable, path: Path) -> None:
    """Make ``table`` hold exactly the containers of the names file."""
    data: Any = read_json(path, None)
    if data is None:
        raise NetdError(f"names file {path} does not exist")
    if not isinstance(data, dict):
        raise NetdError(f"{path}: expected a JSON object of container id -> record")
    records: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for cid, entry in data.items():
        if not isinstance(entry, dict):
            raise NetdError(f"{path}: the record of {cid} is not an object")
        records[cid] = (
            list(entry.get("names", [])),
            list(entry.get("ipv4", [])),
            list(entry.get("ipv6", [])),
        )
    staging = NameTable()  # validate everything before the live table changes
    for cid, (names, ipv4, ipv6) in records.items():
        staging.set(cid, names, ipv4, ipv6)
    for record in table.records():
        if record.container_id not in records:
            table.remove(record.container_id)
    for cid, (names, ipv4, ipv6) in records.items():
        table.set(cid, names, ipv4, ipv6)


async def serve(
    listen: tuple[str, int],
    names_file: Path,
    upstreams: list[tuple[str, int]],
    domain: str,
    netns_path: str | None,
    timeout: float,
) -> None:
    table = NameTable()
    load_names(table, names_file)
    responder = DnsResponder(table, listen, upstreams, domain, netns_path, timeout)
    await responder.start()
    host, port = responder.address
    print(f"listening on {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            load_names(table, names_file)
        except (NetdError, OSError, ValueError) as exc:
            print(f"names file not reloaded: {exc}", file=sys.stderr, flush=True)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        await responder.close()


@click.command()
@click.option("--listen", required=True, help="IP:PORT to answer on (UDP and TCP); port 0: any.")
@click.option(
    "--names-file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="JSON: container id -> {names, ipv4, ipv6}; re-read on SIGHUP.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    help="IP[:PORT] to forward other names to (repeatable); default: the host's resolv.conf.",
)
@click.option("--domain", default="", help="The engine's domain (names answered under it too).")
@click.option("--netns", "netns_path", default=None, help="Listen inside this netns (a path).")
@click.option("--timeout", default=2.0, show_default=True, help="Seconds per upstream try.")
@click.option("-v", "--verbose", is_flag=True, help="Log malformed queries.")
def main(
    listen: str,
    names_file: Path,
    upstreams: tuple[str, ...],
    domain: str,
    netns_path: str | None,
    timeout: float,
    verbose: bool,
) -> None:
    """Run one embedded DNS responder until SIGTERM."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING)
    listen_at = parse_hostport(listen)
    if upstreams:
        forward_to = [parse_hostport(u, default_port=53) for u in upstreams]
    else:
        forward_to = load_host_upstreams()
    try:
        uvloop.run(serve(listen_at, names_file, forward_to, domain, netns_path, timeout))
    except (NetdError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()

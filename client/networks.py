"""``pyengine network``: the default bridge and user-defined bridge networks."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import DaemonError
from client.options import ipam_config, key_values
from client.output import print_table


@click.group()
def network() -> None:
    """Manage networks: the default bridge and user-defined bridge networks."""


@network.command("create")
@click.option("-d", "--driver", default="bridge", help="bridge, macvlan or ipvlan.")
@click.option(
    "--subnet",
    "subnets",
    multiple=True,
    help="Subnet in CIDR form, at most one IPv4 and one IPv6 (default: automatic).",
)
@click.option(
    "--gateway", "gateways", multiple=True, help="Gateway address in a subnet (one per subnet)."
)
@click.option("--ip-range", default=None, help="Allocate container addresses from this range.")
@click.option("--internal", is_flag=True, help="No access to or from outside the network.")
@click.option("--ipv6", is_flag=True, help="Enable IPv6 (an IPv6 subnet as well as an IPv4 one).")
@click.option("-o", "--opt", "opts", multiple=True, help="Driver option KEY=VALUE.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE")
@click.argument("name")
@click.pass_context
@daemon_errors()
def network_create(
    ctx: click.Context,
    driver: str,
    subnets: tuple[str, ...],
    gateways: tuple[str, ...],
    ip_range: str | None,
    internal: bool,
    ipv6: bool,
    opts: tuple[str, ...],
    labels: tuple[str, ...],
    name: str,
) -> None:
    """Create a bridge network; print its ID."""
    if (gateways or ip_range) and not subnets:
        fail("pyengine: --gateway and --ip-range need --subnet", 125)
    if len(gateways) > len(subnets):
        fail("pyengine: cannot have more gateways than subnets", 125)
    if ip_range and len(subnets) > 1:
        fail("pyengine: --ip-range with several subnets is not supported", 125)
    # As docker's CLI: the n-th --gateway (and --ip-range) goes with the n-th --subnet.
    configs = [
        {
            k: v
            for k, v in (
                ("Subnet", subnet),
                ("Gateway", gateways[i] if i < len(gateways) else None),
                ("IPRange", ip_range if i == 0 else None),
            )
            if v
        }
        for i, subnet in enumerate(subnets)
    ]
    request = {
        "Name": name,
        "CheckDuplicate": True,
        "Driver": driver,
        "Internal": internal,
        "EnableIPv6": ipv6,
        "IPAM": {"Driver": "default", "Config": configs},
        "Options": key_values(opts, "option"),
        "Labels": key_values(labels, "label"),
    }
    click.echo(daemon_client(ctx).network_create(request))


@network.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
@click.option("-f", "--filter", "filters", multiple=True, help="KEY=VALUE (name, id, driver...)")
@click.option("--no-trunc", is_flag=True, help="Full IDs.")
@click.pass_context
@daemon_errors()
def network_ls(ctx: click.Context, quiet: bool, filters: tuple[str, ...], no_trunc: bool) -> None:
    """List networks."""
    wanted: dict[str, list[str]] = {}
    for key, value in key_values(filters, "filter").items():
        wanted.setdefault(key, []).append(value)
    nets = sorted(daemon_client(ctx).networks(wanted), key=lambda n: n["Name"])
    ids = [n["Id"] if no_trunc else n["Id"][:12] for n in nets]
    if quiet:
        for net_id in ids:
            click.echo(net_id)
        return
    rows = [["NETWORK ID", "NAME", "DRIVER", "SCOPE"]]
    rows += [[i, n["Name"], n["Driver"], n["Scope"]] for i, n in zip(ids, nets, strict=True)]
    print_table(rows)


@network.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def network_inspect(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Show networks' details as JSON (Docker's shape)."""
    client = daemon_client(ctx)
    found, missing = [], []
    for name in names:
        try:
            found.append(client.network_inspect(name))
        except DaemonError as e:
            if e.status != 404:
                raise
            missing.append(name)
    click.echo(json.dumps(found, indent=4))
    for name in missing:
        click.echo(f"Error: No such network: {name}", err=True)
    if missing:
        sys.exit(1)


@network.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def network_rm(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Remove networks (refused while a running container is connected)."""
    client = daemon_client(ctx)
    failed = False
    for name in names:
        try:
            client.network_remove(name)
            click.echo(name)
        except DaemonError as e:
            click.echo(f"Error response from daemon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@network.command("connect")
@click.option("--ip", default=None, help="IPv4 address on the network.")
@click.option("--ip6", default=None, help="IPv6 address on the network.")
@click.option("--alias", "aliases", multiple=True, help="A name on the network.")
@click.argument("network_name")
@click.argument("container")
@click.pass_context
@daemon_errors()
def network_connect(
    ctx: click.Context,
    ip: str | None,
    ip6: str | None,
    aliases: tuple[str, ...],
    network_name: str,
    container: str,
) -> None:
    """Connect a container to a network (a running one gets a new interface at once)."""
    endpoint: dict[str, Any] = {"Aliases": list(aliases)}
    if ip or ip6:
        endpoint["IPAMConfig"] = ipam_config(ip, ip6)
    daemon_client(ctx).network_connect(network_name, container, endpoint)


@network.command("disconnect")
@click.option("-f", "--force", is_flag=True, help="Also when the network is gone.")
@click.argument("network_name")
@click.argument("container")
@click.pass_context
@daemon_errors()
def network_disconnect(ctx: click.Context, force: bool, network_name: str, container: str) -> None:
    """Disconnect a container from a network."""
    daemon_client(ctx).network_disconnect(network_name, container, force)

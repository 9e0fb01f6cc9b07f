"""``pyengine volume``: the local driver's volumes (create, ls, inspect, rm, prune)."""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import quote

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import DaemonError
from client.options import key_values
from client.output import print_table


def _filters(pairs: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"pyengine: invalid filter {pair!r}: want KEY=VALUE", 125)
        out.setdefault(key, []).append(value)
    return out


@click.group()
def volume() -> None:
    """Manage volumes."""


@volume.command("create")
@click.option("-d", "--driver", default="local", help="local (the only driver).")
@click.option("-o", "--opt", "opts", multiple=True, help="Driver option: type=tmpfs, o=size=64m")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE")
@click.argument("name", required=False)
@click.pass_context
@daemon_errors()
def volume_create(
    ctx: click.Context, driver: str, opts: tuple[str, ...], labels: tuple[str, ...], name: str
) -> None:
    """Create a volume (a generated name when none is given); print its name."""
    body = {
        "Name": name or "",
        "Driver": driver,
        "DriverOpts": key_values(opts, "option"),
        "Labels": key_values(labels, "label"),
    }
    created = daemon_client(ctx).json("POST", "/volumes/create", body=body)
    click.echo(created["Name"])


@volume.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
@click.option("-f", "--filter", "filters", multiple=True, help="name, label, dangling, driver")
@click.pass_context
@daemon_errors()
def volume_ls(ctx: click.Context, quiet: bool, filters: tuple[str, ...]) -> None:
    """List volumes."""
    query = {"filters": json.dumps(_filters(filters))} if filters else None
    volumes = daemon_client(ctx).json("GET", "/volumes", query=query)["Volumes"] or []
    volumes.sort(key=lambda v: v["Name"])
    if quiet:
        for v in volumes:
            click.echo(v["Name"])
        return
    print_table([["DRIVER", "VOLUME NAME"], *([v["Driver"], v["Name"]] for v in volumes)])


@volume.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def volume_inspect(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Show volumes' details as JSON (Docker's shape)."""
    client = daemon_client(ctx)
    found: list[Any] = []
    missing = []
    for name in names:
        try:
            found.append(client.json("GET", f"/volumes/{quote(name, safe='')}"))
        except DaemonError as e:
            if e.status != 404:
                raise
            missing.append(str(e))
    click.echo(json.dumps(found, indent=4))
    for message in missing:
        click.echo(f"Error: {message}", err=True)
    if missing:
        sys.exit(1)


@volume.command("rm")
@click.option("-f", "--force", is_flag=True, help="No error for a volume that does not exist.")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def volume_rm(ctx: click.Context, force: bool, names: tuple[str, ...]) -> None:
    """Remove volumes (refused for a volume a container uses)."""
    client = daemon_client(ctx)
    failed = False
    for name in names:
        try:
            path = f"/volumes/{quote(name, safe='')}"
            client.request("DELETE", path, query={"force": int(force)}).read()
            click.echo(name)
        except DaemonError as e:
            click.echo(f"Error response from daemon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@volume.command("prune")
@click.option("-a", "--all", "prune_all", is_flag=True, help="Named volumes too.")
@click.option("-f", "--force", is_flag=True, help="Do not ask.")
@click.option("--filter", "filters", multiple=True, help="label=KEY[=VALUE], label!=...")
@click.pass_context
@daemon_errors()
def volume_prune(
    ctx: click.Context, prune_all: bool, force: bool, filters: tuple[str, ...]
) -> None:
    """Remove the volumes no container uses: anonymous ones, or all with --all."""
    if not force and not click.confirm("Remove the unused volumes?", default=False):
        return
    wanted = _filters(filters)
    if prune_all:
        wanted["all"] = ["true"]
    query = {"filters": json.dumps(wanted)} if wanted else None
    # From API 1.42 a prune takes only anonymous volumes unless asked for all.
    report = daemon_client(ctx).json("POST", "/volumes/prune", query=query, api_version="1.42")
    deleted = report.get("VolumesDeleted") or []
    if deleted:
        click.echo("Deleted Volumes:")
        for name in deleted:
            click.echo(name)
        click.echo()
    click.echo(f"Total reclaimed space: {report.get('SpaceReclaimed', 0)}B")

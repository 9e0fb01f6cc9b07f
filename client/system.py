"""Commands about the engine as a whole: version, inspect (any kind of object), and the lab."""

from __future__ import annotations

import json
import os
import sys

import click

from client.command import daemon_client, daemon_errors
from client.http import DaemonError


@click.command()
@click.pass_context
@daemon_errors()
def version(ctx: click.Context) -> None:
    """Show the client and daemon versions."""
    from importlib.metadata import version as package_version

    server = daemon_client(ctx).json("GET", "/version")
    click.echo(f"Client: pyengine {package_version('pyengine')}")
    click.echo(
        f"Server: pyengined {server['Version']} (API {server['ApiVersion']}, "
        f"{server['Os']}/{server['Arch']})"
    )


@click.command()
@click.option(
    "--type",
    "kind",
    type=click.Choice(["container", "image", "network"]),
    default=None,
    help="Only look for this kind of object.",
)
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def inspect(ctx: click.Context, kind: str | None, names: tuple[str, ...]) -> None:
    """Show containers' or images' low-level details as JSON (containers first, as Docker)."""
    client = daemon_client(ctx)
    found = []
    missing = []
    lookups = {
        "container": client.inspect,
        "image": client.image_inspect,
        "network": client.network_inspect,
    }
    for name in names:
        for what, lookup in lookups.items():
            if kind not in (None, what):
                continue
            try:
                found.append(lookup(name))
                break
            except DaemonError as e:
                if e.status != 404:
                    raise
        else:
            missing.append(name)
    click.echo(json.dumps(found, indent=4))
    for name in missing:
        click.echo(f"Error: No such {kind or 'object'}: {name}", err=True)
    if missing:
        sys.exit(1)


@click.command(
    "lab",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lab_command(args: tuple[str, ...]) -> None:
    """The namespace lab (python -m lab): up, down, status, exercise NAME."""
    # The lab is its own program; the client only hands the arguments over.
    os.execv(sys.executable, [sys.executable, "-m", "lab", *args])


COMMANDS = (version, inspect, lab_command)

"""pyengine: the command-line client (Docker's verbs), talking to pyengined over its socket.

This module is the command group: the global options, the one-line report of a connection that
breaks, and the commands of ``client.containers``, ``client.images``, ``client.networks``,
``client.volumes`` and ``client.system`` added to it."""

from __future__ import annotations

from typing import Any

import click

from client import containers, copy, events, images, interactive, limits, networks, system, volumes
from client.command import fail
from client.http import CONNECTION_ERRORS, Client, DaemonUnreachable

DEFAULT_HOST = "unix:///run/pyengine.sock"


class _Cli(click.Group):
    """The command group; a connection to the daemon that breaks in any command (the daemon
    died mid-request, a stream cut short) is one line on stderr and exit 1, never a
    traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DaemonUnreachable as e:
            fail(str(e))
        except CONNECTION_ERRORS as e:
            client = ctx.obj
            if not isinstance(client, Client):
                raise
            fail(client.connection_error(e))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-H",
    "--host",
    envvar="PYENGINE_HOST",
    default=DEFAULT_HOST,
    show_default=True,
    help="Daemon socket to connect to (also PYENGINE_HOST).",
)
@click.pass_context
def main(ctx: click.Context, host: str) -> None:
    """pyengine: run containers whose networking you can read."""
    try:
        ctx.obj = Client(host)
    except ValueError as e:
        raise click.ClickException(str(e)) from e


for _command in (
    *containers.COMMANDS,
    *interactive.COMMANDS,
    *limits.COMMANDS,
    *copy.COMMANDS,
    *images.COMMANDS,
    networks.network,
    volumes.volume,
    *system.COMMANDS,
    *events.COMMANDS,
):
    main.add_command(_command)


if __name__ == "__main__":
    main()

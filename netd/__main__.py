"""``python -m netd status``: networks, endpoints, published ports and live firewall rules."""

from __future__ import annotations

from pathlib import Path

import click

from netd.errors import NetdError
from netd.firewall import BACKENDS
from netd.status import collect_status, render_status


@click.group()
def main() -> None:
    """netd: pyengine's bridge network driver."""


@main.command()
@click.option(
    "--data-root",
    default="/var/lib/pyengine",
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The daemon's data root (netd's state is under <data-root>/network).",
)
@click.option(
    "--table",
    default=None,
    help="Firewall table (nftables) or chain prefix (iptables); default: the persisted one.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="Firewall backend; default: the persisted one, else whichever is installed.",
)
def status(data_root: Path, table: str | None, backend: str | None) -> None:
    """Show the networks, endpoints, published ports and the live firewall rules."""
    try:
        click.echo(render_status(collect_status(data_root, table, backend)), nl=False)
    except NetdError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main(prog_name="python -m netd")

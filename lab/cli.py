"""The namespace lab: docs/lab.md's two-machine topology on one machine, and its exercises.

    python -m lab up | down | status | exercise NAME     (pyengine lab ... does the same)

``up`` builds, on the machine it runs on (the *engine host*):

* a ``client`` network namespace standing in for a machine on the LAN, joined to the host by a
  veth pair: ``<prefix>-veth`` on the host (198.18.200.1/24) and ``eth0`` inside
  (198.18.200.2/24), with routes to the lab's bridges through the host;
* two pyengined daemons of the lab's own, one per proxy mode, side by side, so every exercise
  compares them: ``proxy`` (``--userland-proxy=true``, bridge ``<prefix>-proxy``
  10.201.0.1/24) and ``dnat`` (``--userland-proxy=false``, bridge ``<prefix>-dnat``
  10.201.1.1/24). Each has its own socket, data root, log and firewall table under the lab
  directory; a pyengined the user already runs is never touched;
* the nginx and busybox images loaded into both.

``exercise NAME`` runs the shell commands of one exercise of docs/lab.md against the lab and
prints each command with its output: exactly what a reader types, with the lab's names filled
in. ``down`` removes every container, daemon, link and namespace the lab made. Every kernel
object the lab itself creates is named after its prefix (default ``pyelab``); 198.18.0.0/15 is
RFC 2544's benchmarking range, so the client's addresses collide with no real network.
"""

from __future__ import annotations

from pathlib import Path

import click

from lab.exercises import EXERCISES
from lab.lifecycle import down, status_text, up
from lab.plan import DEFAULT_DIR, LabError, LabOptions, LabState
from lab.runner import run_exercise
from lab.vmcli import box_command, vm_group
from netd.firewall import BACKENDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dir",
    "directory",
    envvar="PYENGINE_LAB_DIR",
    default=str(DEFAULT_DIR),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the lab keeps its state, daemons' data, sockets and logs (PYENGINE_LAB_DIR).",
)
@click.pass_context
def main(ctx: click.Context, directory: Path) -> None:
    """The namespace lab: a client namespace and two pyengined daemons (userland proxy and
    kernel DNAT) on this machine, for the exercises of docs/lab.md."""
    ctx.obj = directory


@main.command("up")
@click.option("--prefix", default=LabOptions.prefix, show_default=True, help="Names' prefix.")
@click.option("--client-subnet", default=LabOptions.client_subnet, show_default=True)
@click.option("--proxy-bip", default=LabOptions.proxy_bip, show_default=True)
@click.option("--dnat-bip", default=LabOptions.dnat_bip, show_default=True)
@click.option("--proxy-port", type=int, default=LabOptions.proxy_port, show_default=True)
@click.option("--dnat-port", type=int, default=LabOptions.dnat_port, show_default=True)
@click.option(
    "--firewall-backend",
    type=click.Choice(BACKENDS),
    default=LabOptions.firewall_backend,
    show_default=True,
)
@click.option(
    "--no-client", is_flag=True, help="No client namespace (the client is another machine)."
)
@click.pass_context
def up_command(
    ctx: click.Context,
    prefix: str,
    client_subnet: str,
    proxy_bip: str,
    dnat_bip: str,
    proxy_port: int,
    dnat_port: int,
    firewall_backend: str,
    no_client: bool,
) -> None:
    """Create the client namespace, start both daemons and load the images."""
    options = LabOptions(
        directory=ctx.obj,
        prefix=prefix,
        client_subnet=client_subnet,
        proxy_bip=proxy_bip,
        dnat_bip=dnat_bip,
        proxy_port=proxy_port,
        dnat_port=dnat_port,
        firewall_backend=firewall_backend,
        with_client=not no_client,
    )
    try:
        lab = up(options)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo()
    click.echo(status_text(lab), nl=False)


@main.command("down")
@click.pass_context
def down_command(ctx: click.Context) -> None:
    """Remove the lab's containers, daemons, namespace, links and files."""
    try:
        left = down(ctx.obj)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    if left:
        raise click.ClickException("still there: " + ", ".join(left))
    click.echo("lab removed")


@main.command("status")
@click.pass_context
def status_command(ctx: click.Context) -> None:
    """Show the lab's namespace, links, daemons and containers."""
    try:
        click.echo(status_text(LabState.load(ctx.obj)), nl=False)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("exercise")
@click.argument("name", type=click.Choice([*EXERCISES, "all"]))
@click.pass_context
def exercise_command(ctx: click.Context, name: str) -> None:
    """Run one exercise of docs/lab.md (or all, in order) and show commands and output."""
    try:
        lab = LabState.load(ctx.obj)
        for exercise in EXERCISES.values() if name == "all" else [EXERCISES[name]]:
            run_exercise(lab, exercise)
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


main.add_command(box_command)
main.add_command(vm_group)

if __name__ == "__main__":
    main(prog_name="python -m lab")

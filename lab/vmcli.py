"""``python -m lab box`` and ``python -m lab vm up | exercise | down``: the VM lab's commands."""

from __future__ import annotations

import click

from lab.box import cached_box
from lab.plan import LabError
from lab.vm import vm_lab


@click.command("box")
def box_command() -> None:
    """Build the VM lab's Debian 12 box offline (cached under /var/cache/pyengine/boxes)."""
    try:
        click.echo(cached_box(click.echo))
    except LabError as exc:
        raise click.ClickException(str(exc)) from None


@click.group("vm")
def vm_group() -> None:
    """The VM lab: two QEMU VMs under Vagrant, on loopback only (docs/lab.md, "The VM lab")."""


@vm_group.command("prepare")
def vm_prepare() -> None:
    """The box (cached or built) added to Vagrant, and the stage: what `vagrant up` needs."""
    try:
        timings = vm_lab(click.echo).prepare()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(" ".join(f"{part} {seconds:.0f} s" for part, seconds in timings.items()))


@vm_group.command("up")
def vm_up() -> None:
    """Build or reuse the box, stage the engine's install, vagrant up both VMs."""
    try:
        timings = vm_lab(click.echo).up()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(" ".join(f"{part} {seconds:.0f} s" for part, seconds in timings.items()))


@vm_group.command("exercise")
def vm_exercise() -> None:
    """Run the exercises across the VMs and show each command with its output."""
    try:
        run = vm_lab(click.echo).exercise()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    for role, line in run.client_view.items():
        click.echo(
            f"{role}: the client VM gets {line}; nginx logs it as {run.logged_client[role]}, "
            f"the engine's own 127.0.0.1 request as {run.logged_loopback[role]}"
        )


@vm_group.command("down")
def vm_down() -> None:
    """vagrant destroy -f, then check that no VM, volume, QEMU process or tunnel is left."""
    try:
        left = vm_lab(click.echo).down()
    except LabError as exc:
        raise click.ClickException(str(exc)) from None
    if left:
        raise click.ClickException("still there: " + ", ".join(left))
    click.echo("VM lab removed")

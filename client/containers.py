"""The container verbs: run, create, start, stop, kill, restart, wait, rm, rename, logs, ps,
port."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import CONNECTION_ERRORS, Client, DaemonError, DaemonUnreachable
from client.interactive import interactive_config, run_attached
from client.options import ContainerOptions, container_config, container_options
from client.output import ago, format_ports, join_host_port, print_table
from client.policyopts import apply_policy_options, policy_options, pop_policy_options


def _create(client: Client, name: str | None, image: str, config: dict[str, Any]) -> str:
    try:
        return client.create(name, config)
    except DaemonError as e:
        if e.status == 404 and "image" in str(e).lower():
            click.echo(f"Unable to find image '{image}' locally (pyengine pull {image})", err=True)
        raise


# -h is --hostname here, as the docker CLI's run and create.
@click.command(context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the ID.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open.")
@click.option("-t", "--tty", "tty_mode", is_flag=True, help="Allocate a pseudo-TTY.")
@container_options
@policy_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors(exit_code=125)
def run(
    ctx: click.Context,
    detach: bool,
    interactive: bool,
    tty_mode: bool,
    image: str,
    command: tuple[str, ...],
    **options: Any,
) -> None:
    """Create and start a container."""
    client = daemon_client(ctx)
    policy = pop_policy_options(options)
    opts = ContainerOptions(**options)
    auto_remove = opts.auto_remove
    # In the foreground the client removes the container itself after the exit code is read,
    # so nothing races the log stream (the docker CLI did this before API 1.25).
    config = container_config(image, command, opts, auto_remove and detach)
    config.update(interactive_config(interactive, tty_mode, detach))
    apply_policy_options(config, {**policy, "auto_remove": auto_remove})
    container_id = _create(client, opts.name, image, config)
    if not detach and (interactive or tty_mode):
        code = run_attached(client, container_id, tty_mode, interactive)
        if auto_remove:
            client.remove(container_id, force=True)
        sys.exit(code)
    try:
        client.start(container_id)
    except DaemonError:
        if auto_remove:
            with contextlib.suppress(DaemonError):  # the daemon may have removed it already
                client.remove(container_id, force=True, volumes=True)
        raise
    if detach:
        click.echo(container_id)
        return
    code = _follow_until_exit(client, container_id)
    if auto_remove:
        client.remove(container_id, force=True, volumes=True)
    sys.exit(code)


# -h is --hostname here, as the docker CLI's run and create.
@click.command(context_settings={"allow_interspersed_args": False, "help_option_names": ["--help"]})
@container_options
@policy_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors(exit_code=125)
def create(ctx: click.Context, image: str, command: tuple[str, ...], **options: Any) -> None:
    """Create a container without starting it; print its ID."""
    policy = pop_policy_options(options)
    opts = ContainerOptions(**options)
    config = container_config(image, command, opts, opts.auto_remove)
    apply_policy_options(config, policy)
    click.echo(_create(daemon_client(ctx), opts.name, image, config))


def _follow_until_exit(client: Client, container_id: str) -> int:
    def kill(signum: int) -> None:
        # A thread's error would print a traceback: the container may be gone, or the daemon;
        # the log stream or the wait then says so in one line.
        with contextlib.suppress(DaemonError, DaemonUnreachable, *CONNECTION_ERRORS):
            client.request(
                "POST",
                f"/containers/{container_id}/kill",
                query={"signal": signal.Signals(signum).name},
            ).read()

    def forward(signum: int, _frame: Any) -> None:
        threading.Thread(target=kill, args=(signum,), daemon=True).start()

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    _copy_logs(client, container_id, follow=True)
    return client.wait(container_id)


def _copy_logs(
    client: Client, ref: str, follow: bool, tail: str = "all", timestamps: bool = False
) -> None:
    outs = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
    for stream_id, payload in client.logs(ref, follow=follow, tail=tail, timestamps=timestamps):
        out = outs.get(stream_id, sys.stdout.buffer)
        out.write(payload)
        out.flush()


@click.command()
@click.option("-f", "--follow", is_flag=True)
@click.option("-n", "--tail", default="all")
@click.option("-t", "--timestamps", is_flag=True)
@click.argument("container")
@click.pass_context
@daemon_errors()
def logs(ctx: click.Context, follow: bool, tail: str, timestamps: bool, container: str) -> None:
    """Print a container's output."""
    _copy_logs(daemon_client(ctx), container, follow, tail, timestamps)


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped containers too.")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
@click.pass_context
@daemon_errors()
def ps(ctx: click.Context, show_all: bool, quiet: bool) -> None:
    """List containers."""
    containers = daemon_client(ctx).containers(all=show_all)
    if quiet:
        for c in containers:
            click.echo(c["Id"][:12])
        return
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]]
    for c in containers:
        command = c["Command"] if len(c["Command"]) <= 20 else c["Command"][:19] + "…"
        rows.append(
            [
                c["Id"][:12],
                c["Image"],
                f'"{command}"',
                ago(c["Created"]),
                c["Status"],
                format_ports(c["Ports"]),
                ",".join(n.lstrip("/") for n in c["Names"]),
            ]
        )
    print_table(rows)


def _each(ctx: click.Context, containers: tuple[str, ...], action: Callable[[str], None]) -> None:
    """Docker's multi-container verbs: print each name done, report each failure, exit 1 if any."""
    failed = False
    for ref in containers:
        try:
            action(ref)
            click.echo(ref)
        except DaemonError as e:
            click.echo(f"Error response from daemon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@click.command()
@click.option(
    "-t",
    "--time",
    "timeout",
    type=int,
    default=None,
    help="Seconds to wait before killing it (default 10).",
)
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def stop(ctx: click.Context, timeout: int | None, containers: tuple[str, ...]) -> None:
    """Stop running containers: StopSignal, then SIGKILL."""
    _each(ctx, containers, lambda ref: daemon_client(ctx).stop(ref, timeout))


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill and remove a running container.")
@click.option("-v", "--volumes", is_flag=True, help="Remove its anonymous volumes too.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def rm(ctx: click.Context, force: bool, volumes: bool, containers: tuple[str, ...]) -> None:
    """Remove containers."""
    _each(ctx, containers, lambda ref: daemon_client(ctx).remove(ref, force, volumes))


@click.command()
@click.argument("container")
@click.argument("port", required=False)
@click.pass_context
@daemon_errors()
def port(ctx: click.Context, container: str, port: str | None) -> None:
    """List a container's published ports."""
    info = daemon_client(ctx).inspect(container)
    ports = info["NetworkSettings"]["Ports"] or {}
    if port is not None:
        key = port if "/" in port else f"{port}/tcp"
        bindings = ports.get(key)
        if not bindings:
            fail(f"Error: No public port '{key}' published for {container}")
        for b in bindings:
            click.echo(join_host_port(b["HostIp"], b["HostPort"]))
        return
    for key, bindings in ports.items():
        for b in bindings or []:
            click.echo(f"{key} -> {join_host_port(b['HostIp'], b['HostPort'])}")


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def start(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Start created or stopped containers."""
    _each(ctx, containers, lambda ref: daemon_client(ctx).start(ref))


@click.command()
@click.option("-s", "--signal", "sig", default=None, help="Signal to send (default KILL).")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def kill(ctx: click.Context, sig: str | None, containers: tuple[str, ...]) -> None:
    """Send a signal to running containers."""
    _each(ctx, containers, lambda ref: daemon_client(ctx).kill(ref, sig))


@click.command()
@click.option("-t", "--time", "timeout", type=int, default=None, help="Seconds before SIGKILL.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def restart(ctx: click.Context, timeout: int | None, containers: tuple[str, ...]) -> None:
    """Stop (if running) and start containers again."""
    _each(ctx, containers, lambda ref: daemon_client(ctx).restart(ref, timeout))


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def wait(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Wait until containers stop; print their exit codes."""
    client = daemon_client(ctx)
    failed = False
    for ref in containers:
        try:
            click.echo(client.wait(ref))
        except DaemonError as e:
            click.echo(f"Error response from daemon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@click.command()
@click.argument("container")
@click.argument("new_name")
@click.pass_context
@daemon_errors()
def rename(ctx: click.Context, container: str, new_name: str) -> None:
    """Rename a container (its DNS name on user-defined networks follows at once)."""
    daemon_client(ctx).rename(container, new_name)


COMMANDS = (run, create, start, stop, kill, restart, wait, rm, rename, logs, ps, port)

"""pyengine: the command-line client (Docker's verbs), talking to pyengined over its socket."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click

from engine.client import Client, DaemonError, DaemonUnreachable
from netd.portspec import parse_publish, to_docker_port_bindings

DEFAULT_HOST = "unix:///run/pyengine.sock"


def _client(ctx: click.Context) -> Client:
    return ctx.find_root().obj


def _fail(message: str, code: int = 1) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def daemon_errors(exit_code: int = 1) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One line on stderr and a non-zero exit for every daemon error, as the docker CLI does."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DaemonError as e:
                _fail(f"Error response from daemon: {e}", exit_code)
            except DaemonUnreachable as e:
                _fail(str(e), exit_code)

        return wrapper

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


def _port_bindings(specs: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    bindings = []
    for spec in specs:
        try:
            bindings.extend(parse_publish(spec))
        except ValueError as e:
            _fail(f"pyengine: {e}", 125)
    return to_docker_port_bindings(bindings)


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the ID.")
@click.option("-p", "--publish", multiple=True, help="Publish a port: [ip:][hostport:]port[/proto]")
@click.option("-P", "--publish-all", is_flag=True, help="Publish every exposed port.")
@click.option("--name", default=None)
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-e", "--env", multiple=True, help="KEY=VALUE")
@click.option("--entrypoint", default=None)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors(exit_code=125)
def run(
    ctx: click.Context,
    detach: bool,
    publish: tuple[str, ...],
    publish_all: bool,
    name: str | None,
    auto_remove: bool,
    env: tuple[str, ...],
    entrypoint: str | None,
    image: str,
    command: tuple[str, ...],
) -> None:
    """Create and start a container."""
    client = _client(ctx)
    bindings = _port_bindings(publish)
    env_list = [e if "=" in e else f"{e}={os.environ.get(e, '')}" for e in env]
    config: dict[str, Any] = {
        "Image": image,
        "Cmd": list(command) or None,
        "Entrypoint": [entrypoint] if entrypoint is not None else None,
        "Env": env_list,
        "ExposedPorts": {k: {} for k in bindings},
        "HostConfig": {
            "PortBindings": bindings,
            "PublishAllPorts": publish_all,
            # In the foreground the client removes the container itself after the exit code is
            # read, so nothing races the log stream (the docker CLI did this before API 1.25).
            "AutoRemove": auto_remove and detach,
        },
    }
    try:
        container_id = client.create(name, config)
    except DaemonError as e:
        if e.status == 404 and "image" in str(e).lower():
            click.echo(f"Unable to find image '{image}' locally", err=True)
        raise
    try:
        client.start(container_id)
    except DaemonError:
        if auto_remove:
            client.remove(container_id, force=True)
        raise
    if detach:
        click.echo(container_id)
        return
    code = _follow_until_exit(client, container_id)
    if auto_remove:
        client.remove(container_id, force=True)
    sys.exit(code)


def _follow_until_exit(client: Client, container_id: str) -> int:
    def forward(signum: int, _frame: Any) -> None:
        threading.Thread(
            target=lambda: client.request(
                "POST",
                f"/containers/{container_id}/kill",
                query={"signal": signal.Signals(signum).name},
            ).read(),
            daemon=True,
        ).start()

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


@main.command()
@click.option("-f", "--follow", is_flag=True)
@click.option("-n", "--tail", default="all")
@click.option("-t", "--timestamps", is_flag=True)
@click.argument("container")
@click.pass_context
@daemon_errors()
def logs(ctx: click.Context, follow: bool, tail: str, timestamps: bool, container: str) -> None:
    """Print a container's output."""
    _copy_logs(_client(ctx), container, follow, tail, timestamps)


def _ago(rfc3339_or_unix: Any) -> str:
    if isinstance(rfc3339_or_unix, int):
        then = datetime.fromtimestamp(rfc3339_or_unix, UTC)
    else:
        then = datetime.fromisoformat(str(rfc3339_or_unix).replace("Z", "+00:00"))
    seconds = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{seconds} seconds ago" if seconds > 1 else "Less than a second ago"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip())


def format_ports(ports: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{p['IP']}:{p['PublicPort']}->{p['PrivatePort']}/{p['Type']}"
        if p.get("PublicPort")
        else f"{p['PrivatePort']}/{p['Type']}"
        for p in ports
    )


@main.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show stopped containers too.")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
@click.pass_context
@daemon_errors()
def ps(ctx: click.Context, show_all: bool, quiet: bool) -> None:
    """List containers."""
    containers = _client(ctx).containers(all=show_all)
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
                _ago(c["Created"]),
                c["Status"],
                format_ports(c["Ports"]),
                ",".join(n.lstrip("/") for n in c["Names"]),
            ]
        )
    _table(rows)


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


@main.command()
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
    _each(ctx, containers, lambda ref: _client(ctx).stop(ref, timeout))


@main.command()
@click.option("-f", "--force", is_flag=True, help="Kill and remove a running container.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def rm(ctx: click.Context, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers."""
    _each(ctx, containers, lambda ref: _client(ctx).remove(ref, force))


@main.command()
@click.argument("container")
@click.argument("port", required=False)
@click.pass_context
@daemon_errors()
def port(ctx: click.Context, container: str, port: str | None) -> None:
    """List a container's published ports."""
    info = _client(ctx).inspect(container)
    ports = info["NetworkSettings"]["Ports"] or {}
    if port is not None:
        key = port if "/" in port else f"{port}/tcp"
        bindings = ports.get(key)
        if not bindings:
            _fail(f"Error: No public port '{key}' published for {container}")
        for b in bindings:
            click.echo(f"{b['HostIp']}:{b['HostPort']}")
        return
    for key, bindings in ports.items():
        for b in bindings or []:
            click.echo(f"{key} -> {b['HostIp']}:{b['HostPort']}")


@main.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def inspect(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Show a container's low-level details as JSON."""
    import json

    click.echo(json.dumps([_client(ctx).inspect(c) for c in containers], indent=4))


@main.command()
@click.pass_context
@daemon_errors()
def images(ctx: click.Context) -> None:
    """List images."""
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
    for img in _client(ctx).images():
        for tag in img["RepoTags"] or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            created = _ago(img["Created"]) if img["Created"] else "N/A"
            rows.append(
                [repo, t, img["Id"].split(":")[1][:12], created, f"{img['Size'] / 1e6:.1f}MB"]
            )
    _table(rows)


@main.command()
@click.option(
    "-i",
    "--input",
    "path",
    required=True,
    type=click.Path(path_type=Path),
    help="docker-archive or OCI-layout tarball.",
)
@click.pass_context
@daemon_errors()
def load(ctx: click.Context, path: Path) -> None:
    """Load an image from a tar archive."""
    try:
        f = open(path, "rb")
    except OSError as e:
        _fail(f"open {path}: {e.strerror}")
    with f:
        for line in _client(ctx).load(f):
            click.echo(line)


@main.command()
@click.pass_context
@daemon_errors()
def version(ctx: click.Context) -> None:
    """Show the client and daemon versions."""
    from importlib.metadata import version as package_version

    server = _client(ctx).json("GET", "/version")
    click.echo(f"Client: pyengine {package_version('pyengine')}")
    click.echo(
        f"Server: pyengined {server['Version']} (API {server['ApiVersion']}, "
        f"{server['Os']}/{server['Arch']})"
    )


if __name__ == "__main__":
    main()

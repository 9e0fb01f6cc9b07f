"""pyengine: the command-line client (Docker's verbs), talking to pyengined over its socket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn

import click

from client.http import CONNECTION_ERRORS, Client, DaemonError, DaemonUnreachable
from common.credentials import CredentialsError, CredentialStore, default_credentials_path
from common.reference import Reference
from netd.portspec import parse_publish, to_docker_port_bindings

DEFAULT_HOST = "unix:///run/pyengine.sock"
# The most of a --security-opt seccomp=<file> the client reads; the daemon enforces its own cap.
MAX_SECCOMP_PROFILE_BYTES = 1 << 20


def _client(ctx: click.Context) -> Client:
    return ctx.find_root().obj


def _fail(message: str, code: int = 1) -> NoReturn:
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


class _Cli(click.Group):
    """The command group; a connection to the daemon that breaks in any command (the daemon
    died mid-request, a stream cut short) is one line on stderr and exit 1, never a
    traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DaemonUnreachable as e:
            _fail(str(e))
        except CONNECTION_ERRORS as e:
            client = ctx.obj
            if not isinstance(client, Client):
                raise
            _fail(client.connection_error(e))


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


def _port_bindings(specs: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    bindings = []
    for spec in specs:
        try:
            bindings.extend(parse_publish(spec))
        except ValueError as e:
            _fail(f"pyengine: {e}", 125)
    return to_docker_port_bindings(bindings)


def container_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``run`` and ``create`` share (Docker's spelling)."""
    for option in reversed(
        [
            click.option(
                "-p",
                "--publish",
                multiple=True,
                help="Publish a port: [ip:][hostport:]port[/proto]",
            ),
            click.option("-P", "--publish-all", is_flag=True, help="Publish every exposed port."),
            click.option("--name", default=None),
            click.option("--rm", "auto_remove", is_flag=True, help="Remove it when it exits."),
            click.option("-e", "--env", multiple=True, help="KEY=VALUE"),
            click.option("--entrypoint", default=None),
            click.option(
                "--log-opt",
                "log_opts",
                multiple=True,
                help="json-file log option: max-size=SIZE (e.g. 10m), max-file=N.",
            ),
            click.option("-l", "--label", "labels", multiple=True, help="KEY=VALUE"),
            click.option("--network", default=None, help="Connect it to this network."),
            click.option("--ip", default=None, help="IPv4 address on that network."),
            click.option("--ip6", default=None, help="IPv6 address on that network."),
            click.option(
                "--network-alias", "aliases", multiple=True, help="A name on that network."
            ),
            click.option(
                "--security-opt",
                "security_opts",
                multiple=True,
                help="seccomp=unconfined|PROFILE.json, no-new-privileges[=true|false].",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@dataclass(frozen=True)
class ContainerOptions:
    """What ``container_options`` collects, for ``run`` and ``create`` alike."""

    publish: tuple[str, ...]
    publish_all: bool
    name: str | None
    auto_remove: bool
    env: tuple[str, ...]
    entrypoint: str | None
    log_opts: tuple[str, ...]
    labels: tuple[str, ...]
    network: str | None
    ip: str | None
    ip6: str | None
    aliases: tuple[str, ...]
    security_opts: tuple[str, ...] = ()


def _container_config(
    image: str, command: tuple[str, ...], opts: ContainerOptions, auto_remove: bool
) -> dict[str, Any]:
    """Docker's create body; ``auto_remove`` is the daemon's part of ``--rm``."""
    bindings = _port_bindings(opts.publish)
    log_config: dict[str, str] = {}
    for opt in opts.log_opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            _fail(f"pyengine: invalid log opt {opt!r}: want KEY=VALUE", 125)
        log_config[key] = value
    env_list = [e if "=" in e else f"{e}={os.environ.get(e, '')}" for e in opts.env]
    return {
        "Image": image,
        "Cmd": list(command) or None,
        "Entrypoint": [opts.entrypoint] if opts.entrypoint is not None else None,
        "Env": env_list,
        "ExposedPorts": {k: {} for k in bindings},
        "Labels": _key_values(opts.labels, "label"),
        "HostConfig": {
            "PortBindings": bindings,
            "PublishAllPorts": opts.publish_all,
            "AutoRemove": auto_remove,
            "LogConfig": {"Type": "json-file", "Config": log_config},
            "NetworkMode": opts.network or "default",
            "SecurityOpt": _security_opts(opts.security_opts),
        },
        "NetworkingConfig": _networking_config(opts.network, opts.ip, opts.aliases, opts.ip6),
    }


def _security_opts(opts: tuple[str, ...]) -> list[str]:
    """As the docker CLI: ``seccomp=<file>`` is sent as ``seccomp=<the file's JSON>``."""
    out = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key == "seccomp" and sep and value not in ("unconfined", "builtin"):
            try:
                with open(value, "rb") as f:
                    raw = f.read(MAX_SECCOMP_PROFILE_BYTES + 1)
                if len(raw) > MAX_SECCOMP_PROFILE_BYTES:
                    raise ValueError(f"larger than {MAX_SECCOMP_PROFILE_BYTES} bytes")
                profile = json.loads(raw)
            except (OSError, ValueError, RecursionError) as e:
                _fail(f"pyengine: invalid seccomp profile {value!r}: {e}", 125)
            opt = "seccomp=" + json.dumps(profile, separators=(",", ":"))
        out.append(opt)
    return out


def _ipam_config(ip: str | None, ip6: str | None) -> dict[str, str]:
    """Docker's EndpointIPAMConfig for ``--ip`` / ``--ip6``."""
    return {k: v for k, v in (("IPv4Address", ip), ("IPv6Address", ip6)) if v}


def _networking_config(
    network: str | None, ip: str | None, aliases: tuple[str, ...], ip6: str | None = None
) -> dict[str, Any]:
    """Docker's EndpointsConfig for the network the container is created on."""
    if not (ip or ip6 or aliases):
        return {}
    endpoint: dict[str, Any] = {"Aliases": list(aliases)}
    if ip or ip6:
        endpoint["IPAMConfig"] = _ipam_config(ip, ip6)
    return {"EndpointsConfig": {network or "default": endpoint}}


def _create(client: Client, name: str | None, image: str, config: dict[str, Any]) -> str:
    try:
        return client.create(name, config)
    except DaemonError as e:
        if e.status == 404 and "image" in str(e).lower():
            click.echo(f"Unable to find image '{image}' locally (pyengine pull {image})", err=True)
        raise


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background and print the ID.")
@container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors(exit_code=125)
def run(
    ctx: click.Context, detach: bool, image: str, command: tuple[str, ...], **options: Any
) -> None:
    """Create and start a container."""
    client = _client(ctx)
    opts = ContainerOptions(**options)
    auto_remove = opts.auto_remove
    # In the foreground the client removes the container itself after the exit code is read,
    # so nothing races the log stream (the docker CLI did this before API 1.25).
    config = _container_config(image, command, opts, auto_remove and detach)
    container_id = _create(client, opts.name, image, config)
    try:
        client.start(container_id)
    except DaemonError:
        if auto_remove:
            with contextlib.suppress(DaemonError):  # the daemon may have removed it already
                client.remove(container_id, force=True)
        raise
    if detach:
        click.echo(container_id)
        return
    code = _follow_until_exit(client, container_id)
    if auto_remove:
        client.remove(container_id, force=True)
    sys.exit(code)


@main.command(context_settings={"allow_interspersed_args": False})
@container_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors(exit_code=125)
def create(ctx: click.Context, image: str, command: tuple[str, ...], **options: Any) -> None:
    """Create a container without starting it; print its ID."""
    opts = ContainerOptions(**options)
    config = _container_config(image, command, opts, opts.auto_remove)
    click.echo(_create(_client(ctx), opts.name, image, config))


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


def join_host_port(ip: str, port: Any) -> str:
    """``0.0.0.0:8080``, ``[::]:8080``: as the docker CLI prints a host binding."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def format_ports(ports: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{join_host_port(p['IP'], p['PublicPort'])}->{p['PrivatePort']}/{p['Type']}"
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
            click.echo(join_host_port(b["HostIp"], b["HostPort"]))
        return
    for key, bindings in ports.items():
        for b in bindings or []:
            click.echo(f"{key} -> {join_host_port(b['HostIp'], b['HostPort'])}")


@main.command()
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
    client = _client(ctx)
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


@main.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def start(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Start created or stopped containers."""
    _each(ctx, containers, lambda ref: _client(ctx).start(ref))


@main.command()
@click.option("-s", "--signal", "sig", default=None, help="Signal to send (default KILL).")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def kill(ctx: click.Context, sig: str | None, containers: tuple[str, ...]) -> None:
    """Send a signal to running containers."""
    _each(ctx, containers, lambda ref: _client(ctx).kill(ref, sig))


@main.command()
@click.option("-t", "--time", "timeout", type=int, default=None, help="Seconds before SIGKILL.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def restart(ctx: click.Context, timeout: int | None, containers: tuple[str, ...]) -> None:
    """Stop (if running) and start containers again."""
    _each(ctx, containers, lambda ref: _client(ctx).restart(ref, timeout))


@main.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def wait(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Wait until containers stop; print their exit codes."""
    client = _client(ctx)
    failed = False
    for ref in containers:
        try:
            click.echo(client.wait(ref))
        except DaemonError as e:
            click.echo(f"Error response from daemon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


@main.command()
@click.argument("source")
@click.argument("target")
@click.pass_context
@daemon_errors()
def tag(ctx: click.Context, source: str, target: str) -> None:
    """Give the image SOURCE another name, TARGET ([registry/]name[:tag])."""
    _client(ctx).tag(source, target, None)


@main.command()
@click.option("-f", "--force", is_flag=True, help="Remove an image tagged several times.")
@click.argument("images", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def rmi(ctx: click.Context, force: bool, images: tuple[str, ...]) -> None:
    """Remove images (untag; delete when no tag is left and no container uses it)."""
    client = _client(ctx)
    failed = False
    for ref in images:
        try:
            for item in client.remove_image(ref, force):
                for kind, what in item.items():
                    click.echo(f"{kind}: {what}")
        except DaemonError as e:
            click.echo(f"Error response from daemon: {e}", err=True)
            failed = True
    if failed:
        sys.exit(1)


def _credentials() -> CredentialStore:
    return CredentialStore(default_credentials_path())


class PullDisplay:
    """Docker's pull output: one line per layer, redrawn in place on a terminal; on anything
    else each change of a layer's status on a line of its own (no progress bars)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.lines: list[str] = []  # layer ids in the order they appeared
        self.last: dict[str, str] = {}

    def show(self, message: dict[str, Any]) -> None:
        status = message.get("status", "")
        layer = message.get("id")
        if not layer:
            click.echo(status)
            return
        text = f"{layer}: {status}"
        if self.tty and message.get("progress"):
            text += f" {message['progress']}"
        if not self.tty:
            if self.last.get(layer) != status:
                click.echo(text)
            self.last[layer] = status
            return
        if layer not in self.lines:
            self.lines.append(layer)
            click.echo(text)
            return
        up = len(self.lines) - self.lines.index(layer)
        # ECMA-48: CUU (ESC [ n A) moves up, EL (ESC [ 2 K) clears the line, CUD moves down.
        click.echo(f"\x1b[{up}A\x1b[2K\r{text}\x1b[{up}B\r", nl=False)


@main.command()
@click.argument("image")
@click.pass_context
@daemon_errors()
def pull(ctx: click.Context, image: str) -> None:
    """Pull an image from a registry (credentials from ``pyengine login``)."""
    try:
        domain = Reference.parse(image).domain
        auth = _credentials().get(domain)
    except (ValueError, CredentialsError) as e:
        _fail(f"Error: {e}")
    display = PullDisplay(sys.stdout.isatty())
    for message in _client(ctx).pull(image, auth):
        if "error" in message:
            _fail(f"Error response from daemon: {message['error']}")
        display.show(message)
    click.echo(str(Reference.parse(image).with_default_tag()))


@main.command()
@click.option("-u", "--username", default=None)
@click.option("-p", "--password", default=None)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.argument("server", default="")
@click.pass_context
@daemon_errors()
def login(
    ctx: click.Context,
    username: str | None,
    password: str | None,
    password_stdin: bool,
    server: str,
) -> None:
    """Log in to a registry (Docker Hub when SERVER is omitted); the login is kept (0600)."""
    if password_stdin:
        if password is not None:
            _fail("Error: --password and --password-stdin are mutually exclusive")
        password = sys.stdin.read().rstrip("\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    result = _client(ctx).login(server, username, password)
    try:
        _credentials().save(server, username, password)
    except CredentialsError as e:
        _fail(f"Error: {e}")
    click.echo(result.get("Status") or "Login Succeeded")


@main.command()
@click.argument("server", default="")
def logout(server: str) -> None:
    """Forget the login for a registry."""
    try:
        removed = _credentials().remove(server)
    except CredentialsError as e:
        _fail(f"Error: {e}")
    name = server or "docker.io"
    click.echo(f"Removing login credentials for {name}" if removed else f"Not logged in to {name}")


@main.command()
@click.argument("container")
@click.argument("new_name")
@click.pass_context
@daemon_errors()
def rename(ctx: click.Context, container: str, new_name: str) -> None:
    """Rename a container (its DNS name on user-defined networks follows at once)."""
    _client(ctx).rename(container, new_name)


@main.group()
def network() -> None:
    """Manage networks: the default bridge and user-defined bridge networks."""


def _key_values(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"pyengine: invalid {what} {pair!r}: want KEY=VALUE", 125)
        out[key] = value
    return out


@network.command("create")
@click.option("-d", "--driver", default="bridge", help="Only bridge is supported.")
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
        _fail("pyengine: --gateway and --ip-range need --subnet", 125)
    if len(gateways) > len(subnets):
        _fail("pyengine: cannot have more gateways than subnets", 125)
    if ip_range and len(subnets) > 1:
        _fail("pyengine: --ip-range with several subnets is not supported", 125)
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
        "Options": _key_values(opts, "option"),
        "Labels": _key_values(labels, "label"),
    }
    click.echo(_client(ctx).network_create(request))


@network.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only IDs.")
@click.option("-f", "--filter", "filters", multiple=True, help="KEY=VALUE (name, id, driver...)")
@click.option("--no-trunc", is_flag=True, help="Full IDs.")
@click.pass_context
@daemon_errors()
def network_ls(ctx: click.Context, quiet: bool, filters: tuple[str, ...], no_trunc: bool) -> None:
    """List networks."""
    wanted: dict[str, list[str]] = {}
    for key, value in _key_values(filters, "filter").items():
        wanted.setdefault(key, []).append(value)
    nets = sorted(_client(ctx).networks(wanted), key=lambda n: n["Name"])
    ids = [n["Id"] if no_trunc else n["Id"][:12] for n in nets]
    if quiet:
        for net_id in ids:
            click.echo(net_id)
        return
    rows = [["NETWORK ID", "NAME", "DRIVER", "SCOPE"]]
    rows += [[i, n["Name"], n["Driver"], n["Scope"]] for i, n in zip(ids, nets, strict=True)]
    _table(rows)


@network.command("inspect")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def network_inspect(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Show networks' details as JSON (Docker's shape)."""
    client = _client(ctx)
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
    client = _client(ctx)
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
        endpoint["IPAMConfig"] = _ipam_config(ip, ip6)
    _client(ctx).network_connect(network_name, container, endpoint)


@network.command("disconnect")
@click.option("-f", "--force", is_flag=True, help="Also when the network is gone.")
@click.argument("network_name")
@click.argument("container")
@click.pass_context
@daemon_errors()
def network_disconnect(ctx: click.Context, force: bool, network_name: str, container: str) -> None:
    """Disconnect a container from a network."""
    _client(ctx).network_disconnect(network_name, container, force)


@main.command(
    "lab",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lab_command(args: tuple[str, ...]) -> None:
    """The namespace lab (python -m lab): up, down, status, exercise NAME."""
    # The lab is its own program; the client only hands the arguments over.
    os.execv(sys.executable, [sys.executable, "-m", "lab", *args])


if __name__ == "__main__":
    main()

"""The image verbs: images, pull, load, tag, rmi, and the registry logins (login, logout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from client.command import daemon_client, daemon_errors, fail
from client.http import DaemonError
from client.local_files import CredentialsError, credentials
from client.output import ago, print_table
from common.reference import Reference


@click.command()
@click.pass_context
@daemon_errors()
def images(ctx: click.Context) -> None:
    """List images."""
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
    for img in daemon_client(ctx).images():
        for tag in img["RepoTags"] or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            created = ago(img["Created"]) if img["Created"] else "N/A"
            rows.append(
                [repo, t, img["Id"].split(":")[1][:12], created, f"{img['Size'] / 1e6:.1f}MB"]
            )
    print_table(rows)


@click.command()
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
        fail(f"open {path}: {e.strerror}")
    with f:
        for line in daemon_client(ctx).load(f):
            click.echo(line)


@click.command()
@click.argument("source")
@click.argument("target")
@click.pass_context
@daemon_errors()
def tag(ctx: click.Context, source: str, target: str) -> None:
    """Give the image SOURCE another name, TARGET ([registry/]name[:tag])."""
    daemon_client(ctx).tag(source, target, None)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Remove an image tagged several times.")
@click.argument("images", nargs=-1, required=True)
@click.pass_context
@daemon_errors()
def rmi(ctx: click.Context, force: bool, images: tuple[str, ...]) -> None:
    """Remove images (untag; delete when no tag is left and no container uses it)."""
    client = daemon_client(ctx)
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


@click.command()
@click.argument("image")
@click.pass_context
@daemon_errors()
def pull(ctx: click.Context, image: str) -> None:
    """Pull an image from a registry (credentials from ``pyengine login``)."""
    try:
        domain = Reference.parse(image).domain
        auth = credentials().get(domain)
    except (ValueError, CredentialsError) as e:
        fail(f"Error: {e}")
    display = PullDisplay(sys.stdout.isatty())
    for message in daemon_client(ctx).pull(image, auth):
        if "error" in message:
            fail(f"Error response from daemon: {message['error']}")
        display.show(message)
    click.echo(str(Reference.parse(image).with_default_tag()))


@click.command()
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
            fail("Error: --password and --password-stdin are mutually exclusive")
        password = sys.stdin.read().rstrip("\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    result = daemon_client(ctx).login(server, username, password)
    try:
        credentials().save(server, username, password)
    except CredentialsError as e:
        fail(f"Error: {e}")
    click.echo(result.get("Status") or "Login Succeeded")


@click.command()
@click.argument("server", default="")
def logout(server: str) -> None:
    """Forget the login for a registry."""
    try:
        removed = credentials().remove(server)
    except CredentialsError as e:
        fail(f"Error: {e}")
    name = server or "docker.io"
    click.echo(f"Removing login credentials for {name}" if removed else f"Not logged in to {name}")


COMMANDS = (images, pull, load, tag, rmi, login, logout)

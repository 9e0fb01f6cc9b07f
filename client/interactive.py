"""Interactive streams: ``exec``, ``attach`` and ``run -i -t``.

A hijacked connection (``Upgrade: tcp``) carries the terminal both ways: the local stdin to
the daemon (in raw mode when it is a terminal, so keys such as ctrl-c and the detach keys
reach the container), the output back (raw with a TTY, else Docker's multiplexed frames, split
to stdout and stderr). The end of the local stdin half-closes the connection; SIGWINCH resizes
the remote terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Any

import click

from client.command import daemon_client, daemon_errors
from client.http import API_PREFIX, Client, DaemonError

MAX_HEADER = 64 * 1024


def hijack(client: Client, path: str, body: dict[str, Any] | None = None) -> socket.socket:
    """POST ``path`` asking for an upgrade; the socket once the answer's head is read."""
    data = json.dumps(body).encode() if body is not None else b""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(client.socket_path)
    sock.sendall(
        f"POST {API_PREFIX}{path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        f"Upgrade: tcp\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # a byte at a time: the stream follows the head
        byte = sock.recv(1)
        if not byte or len(head) > MAX_HEADER:
            sock.close()
            raise DaemonError(502, "the daemon closed the connection")
        head += byte
    status = int(head.split(b" ", 2)[1])
    if status not in (101, 200):
        rest = b""
        with contextlib.suppress(OSError):
            sock.settimeout(5)
            while chunk := sock.recv(65536):
                rest += chunk
        sock.close()
        try:
            message = json.loads(rest.split(b"\r\n", 1)[-1] or rest)["message"]
        except (ValueError, KeyError, TypeError):
            message = rest.decode(errors="replace").strip() or f"HTTP {status}"
        raise DaemonError(status, message)
    return sock


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    if not (enabled and sys.stdin.isatty()):
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)  # TCSAFLUSH would drop what was typed already
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _copy_output(sock: socket.socket, tty_mode: bool) -> None:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    if tty_mode:
        while chunk := sock.recv(65536):
            out.write(chunk)
            out.flush()
        return
    while header := _recv_exact(sock, 8):
        stream, size = struct.unpack(">BxxxL", header)
        payload = _recv_exact(sock, size)
        target = err if stream == 2 else out
        target.write(payload)
        target.flush()


def _copy_input(sock: socket.socket) -> None:
    fd = sys.stdin.fileno()
    with contextlib.suppress(OSError):
        while data := os.read(fd, 32 * 1024):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def stream(
    sock: socket.socket, tty_mode: bool, with_stdin: bool, resize: Callable[[int, int], None]
) -> None:
    """Carry the terminal until the output ends."""
    if tty_mode and sys.stdout.isatty():

        def on_winch(_signum: int, _frame: Any) -> None:
            size = shutil.get_terminal_size()
            threading.Thread(target=resize, args=(size.lines, size.columns), daemon=True).start()

        signal.signal(signal.SIGWINCH, on_winch)
        on_winch(0, None)
    with raw_terminal(tty_mode and with_stdin), sock:
        if with_stdin:
            threading.Thread(target=_copy_input, args=(sock,), daemon=True).start()
        with contextlib.suppress(OSError):
            _copy_output(sock, tty_mode)


def _quiet(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(Exception):
        fn()


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open.")
@click.option("-t", "--tty", "tty_mode", is_flag=True, help="Allocate a pseudo-TTY.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable.")
@click.option("-u", "--user", default="", help="user[:group] to run as.")
@click.option("-w", "--workdir", default="", help="Working directory inside the container.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
@daemon_errors(exit_code=126)
def exec_(
    ctx: click.Context,
    detach: bool,
    interactive: bool,
    tty_mode: bool,
    env: tuple[str, ...],
    user: str,
    workdir: str,
    container: str,
    command: tuple[str, ...],
) -> None:
    """Run a command in a running container."""
    client = daemon_client(ctx)
    body: dict[str, Any] = {
        "Cmd": list(command),
        "Env": list(env),
        "User": user,
        "WorkingDir": workdir,
        "Tty": tty_mode,
        "AttachStdin": interactive and not detach,
        "AttachStdout": not detach,
        "AttachStderr": not detach,
    }
    if tty_mode and sys.stdout.isatty():  # the initial size, as the docker CLI sends it
        size = shutil.get_terminal_size()
        body["ConsoleSize"] = [size.lines, size.columns]
    exec_id = client.json("POST", f"/containers/{container}/exec", body=body)["Id"]
    if detach:
        client.request("POST", f"/exec/{exec_id}/start", body={"Detach": True}).read()
        return
    sock = hijack(client, f"/exec/{exec_id}/start", {"Detach": False, "Tty": tty_mode})

    def resize(rows: int, cols: int) -> None:
        _quiet(
            lambda: client.request(
                "POST", f"/exec/{exec_id}/resize", query={"h": rows, "w": cols}
            ).read()
        )

    stream(sock, tty_mode, interactive, resize)
    sys.exit(client.json("GET", f"/exec/{exec_id}/json").get("ExitCode") or 0)


def attach_container(client: Client, container_id: str, tty_mode: bool, with_stdin: bool) -> None:
    query = "stream=1&stdout=1&stderr=1" + ("&stdin=1" if with_stdin else "")
    sock = hijack(client, f"/containers/{container_id}/attach?{query}")
    return _run_attached(client, container_id, sock, tty_mode, with_stdin)


def _run_attached(
    client: Client, container_id: str, sock: socket.socket, tty_mode: bool, with_stdin: bool
) -> None:
    def resize(rows: int, cols: int) -> None:
        _quiet(
            lambda: client.request(
                "POST", f"/containers/{container_id}/resize", query={"h": rows, "w": cols}
            ).read()
        )

    stream(sock, tty_mode, with_stdin, resize)


def interactive_config(interactive: bool, tty_mode: bool, detach: bool) -> dict[str, Any]:
    """The create fields of ``run -i``/``-t``, as the docker CLI sets them."""
    return {
        "Tty": tty_mode,
        "OpenStdin": interactive,
        "StdinOnce": interactive and not detach,
        "AttachStdin": interactive and not detach,
    }


def run_attached(client: Client, container_id: str, tty_mode: bool, with_stdin: bool) -> int:
    """``run -i``/``-t`` in the foreground: attach, then start, stream, and the exit code."""
    query = "stream=1&stdout=1&stderr=1" + ("&stdin=1" if with_stdin else "")
    sock = hijack(client, f"/containers/{container_id}/attach?{query}")
    try:
        client.start(container_id)
    except DaemonError:
        sock.close()
        raise
    _run_attached(client, container_id, sock, tty_mode, with_stdin)
    state = client.inspect(container_id)["State"]
    if state["Running"]:
        return 0  # detached with the detach keys
    return int(client.wait(container_id))


@click.command("attach")
@click.argument("container")
@click.pass_context
@daemon_errors()
def attach(ctx: click.Context, container: str) -> None:
    """Attach the terminal to a running container (detach with ctrl-p ctrl-q)."""
    client = daemon_client(ctx)
    info = client.inspect(container)
    config = info["Config"]
    attach_container(client, info["Id"], bool(config["Tty"]), bool(config["OpenStdin"]))
    state = client.inspect(info["Id"])["State"]
    sys.exit(0 if state["Running"] else state["ExitCode"])


COMMANDS = (exec_, attach)

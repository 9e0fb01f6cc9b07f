"""Interactive containers: ``docker run -it``/``-i``, ``docker attach``, resize and the detach
keys, driven through a real pty around the docker CLI (28.x at API 1.47).

One pyengined on bridge pyex1 (10.190.1.0/24) for the module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, stop_daemon
from tests.dockercli import docker_daemon
from tests.test_exec import Cli, Terminal

NAME, BIP = "pyex1", "10.190.1.1/24"


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Cli]:
    yield from docker_daemon(tmp_path_factory.mktemp(NAME), NAME, BIP, [busybox_archive], Cli)


def wait_status(cli: Cli, name: str, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cli("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
        if out == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} is not {status}")


def test_run_it_shell_resize_and_exit(cli: Cli) -> None:
    name = "pyetest-tty-run"
    try:
        term = Terminal(cli, "run", "-it", "--name", name, "busybox", "sh", rows=25, cols=90)
        term.send(b"echo hi-$((40+2))\r")
        term.expect(b"hi-42")
        term.send(b"stty size; echo T=$TERM\r")
        term.expect(b"25 90")
        term.expect(b"T=xterm")
        term.resize(40, 132)
        time.sleep(0.3)
        term.send(b"stty size\r")
        term.expect(b"40 132")
        term.send(b"exit 3\r")
        assert term.wait() == 3
        config = json.loads(cli("inspect", name, check=True).stdout)[0]["Config"]
        assert config["Tty"] and config["OpenStdin"] and config["StdinOnce"]
        assert "hi-42" in cli("logs", name, check=True).stdout
    finally:
        cli("rm", "-f", name)


def test_detach_keys_then_attach_again(cli: Cli) -> None:
    name = "pyetest-tty-detach"
    try:
        term = Terminal(cli, "run", "-it", "--name", name, "busybox", "sh")
        term.send(b"echo first-$((1+1))\r")
        term.expect(b"first-2")
        term.send(b"\x10\x11")  # ctrl-p ctrl-q
        assert term.wait() == 0
        wait_status(cli, name, "running")
        again = Terminal(cli, "attach", name)
        again.send(b"echo again-$((2+2))\r")
        again.expect(b"again-4")
        again.send(b"exit\r")
        assert again.wait() == 0
        wait_status(cli, name, "exited")
    finally:
        cli("rm", "-f", name)


def test_run_i_pipes_stdin_until_eof(cli: Cli) -> None:
    result = cli("run", "--rm", "-i", "busybox", "sh", "-c", "cat; echo end", input="a\nb\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a\nb\nend\n"


def test_live_restore_keeps_a_tty_container_attachable(cli: Cli) -> None:
    from tests.conftest import start_daemon as start

    name = "pyetest-tty-live"
    cli("run", "-dit", "--name", name, "busybox", "sh", check=True)
    daemon = cli.daemon
    try:
        stop_daemon(daemon)
        tmp = daemon.data_root.parent
        restarted = start(tmp, NAME, BIP, userland_proxy=True)
        cli.daemon.process = restarted.process
        wait_status(cli, name, "running")
        term = Terminal(cli, "attach", name)
        term.send(b"echo live-$((6*7))\r")
        term.expect(b"live-42")
        term.send(b"\x10\x11")
        # The CLI sees the keys too: ``attach`` says so and exits 1, as with Docker.
        term.wait()
        assert b"read escape sequence" in term.seen
        wait_status(cli, name, "running")
    finally:
        cli("rm", "-f", name)


def test_pyengine_run_it(cli: Cli) -> None:
    term = Terminal(
        cli, "run", "-it", "--rm", "busybox", "sh", binary=BIN / "pyengine", rows=22, cols=77
    )
    term.send(b"stty size; echo run-$((3*3))\r")
    term.expect(b"22 77")
    term.expect(b"run-9")
    term.send(b"exit 4\r")
    assert term.wait() == 4


def test_hostile_attach_channel_frames_are_dropped(cli: Cli) -> None:
    """A bad frame on the monitor's attach socket drops that connection only."""
    import socket

    from engine.runtime import attachproto

    name = "pyetest-tty-hostile"
    cid = cli("run", "-dit", "--name", name, "busybox", "sh", check=True).stdout.strip()
    try:
        directory = cli.daemon.data_root / "containers" / cid
        for garbage in (
            b"\x09\x00\x00\x00\x01x",
            b"\x00\xff\xff\xff\xff",
            b"\x02\x00\x00\x00\x01z",
        ):
            with attachproto.socket_path(directory) as path, socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
                s.sendall(garbage)
                if garbage[0] != 2:
                    assert s.recv(1) == b""  # the monitor hung up
        wait_status(cli, name, "running")
        term = Terminal(cli, "attach", name)
        term.send(b"echo still-$((5+5))\r")
        term.expect(b"still-10")
        term.send(b"exit\r")
        term.wait()
        wait_status(cli, name, "exited")
    finally:
        cli("rm", "-f", name)

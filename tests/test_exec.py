"""``exec``: the docker CLI (28.x at API 1.47) and docker-py run processes in a running
container through pyengined, with and without stdin and a TTY.

One pyengined on bridge pyex0 (10.190.0.0/24) and one long-running busybox container shared by
the module. The interactive tests drive the docker CLI through a real pty (``pty.fork``).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker as docker_py
import pytest
from docker.models.containers import Container as PyContainer

from tests.conftest import BIN
from tests.dockercli import DOCKER, DockerCli, docker_daemon

NAME, BIP = "pyex0", "10.190.0.1/24"
CTR = "pyetest-exec-main"


@dataclass
class Cli(DockerCli):
    extra_env: dict[str, str] = field(default_factory=lambda: {"TERM": "xterm"})

    @property
    def socket_path(self) -> str:
        return self.daemon.host.removeprefix("unix://")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Cli]:
    tmp = tmp_path_factory.mktemp(NAME)
    for c in docker_daemon(tmp, NAME, BIP, [busybox_archive], Cli):
        c("run", "-d", "--name", CTR, "-e", "X=from-run", "busybox", "sleep", "3600", check=True)
        yield c


@pytest.fixture(scope="module")
def dpy(cli: Cli) -> Iterator[PyContainer]:
    client = docker_py.DockerClient(base_url=cli.daemon.host, version="1.47", timeout=60)
    try:
        yield client.containers.get(CTR)
    finally:
        client.close()


# ---- docker CLI -------------------------------------------------------------------------------


def test_exec_output_and_exit_code(cli: Cli) -> None:
    result = cli("exec", CTR, "sh", "-c", "echo $X; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == "from-run\n"
    assert result.stderr == "err\n"


def test_exec_env_user_workdir(cli: Cli) -> None:
    out = cli(
        "exec",
        "-e",
        "X=over",
        "-e",
        "Y=new",
        "-u",
        "nobody",
        "-w",
        "/tmp",
        CTR,
        "sh",
        "-c",
        "echo $X $Y $(id -un) $(pwd)",
        check=True,
    ).stdout
    assert out == "over new nobody /tmp\n"
    assert cli("exec", "-u", "1234:5678", CTR, "id", check=True).stdout.startswith(
        "uid=1234 gid=5678"
    )


def test_exec_stdin_piped(cli: Cli) -> None:
    result = cli("exec", "-i", CTR, "sh", "-c", "cat; echo done", input="line one\nline two\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line one\nline two\ndone\n"


def test_exec_detached_and_inspect(cli: Cli) -> None:
    cli("exec", "-d", CTR, "sh", "-c", "echo detached > /tmp/d", check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if cli("exec", CTR, "cat", "/tmp/d").stdout == "detached\n":
            break
        time.sleep(0.1)
    else:
        pytest.fail("detached exec did not run")


def test_exec_inspect_exit_code(cli: Cli) -> None:
    client = docker_py.APIClient(base_url=cli.daemon.host, version="1.47")
    try:
        exec_id = client.exec_create(CTR, ["sh", "-c", "exit 7"])["Id"]
        before = client.exec_inspect(exec_id)
        assert before["Running"] is False and before["ExitCode"] is None
        assert before["ContainerID"] == client.inspect_container(CTR)["Id"]
        client.exec_start(exec_id)
        after = client.exec_inspect(exec_id)
        assert after["ExitCode"] == 7 and after["Running"] is False and after["Pid"] > 0
        assert after["ProcessConfig"]["entrypoint"] == "sh"
        with pytest.raises(docker_py.errors.APIError) as e:
            client.exec_start(exec_id)
        assert e.value.status_code == 409
        with pytest.raises(docker_py.errors.NotFound):
            client.exec_inspect("0" * 64)
    finally:
        client.close()


def test_exec_on_stopped_container_is_409(cli: Cli) -> None:
    name = "pyetest-exec-stopped"
    cli("create", "--name", name, "busybox", "true", check=True)
    try:
        result = cli("exec", name, "true")
        assert result.returncode != 0
        assert "is not running" in result.stderr, result.stderr
        status, body = raw(cli, "POST", f"/containers/{name}/exec", {"Cmd": ["true"]})
        assert status == 409 and "is not running" in body["message"]
    finally:
        cli("rm", "-f", name)


def test_hostile_exec_bodies_are_400(cli: Cli) -> None:
    for body in (
        {"Cmd": "x" * 10 if False else ["a"] * 100_000},
        {"Cmd": [1, 2]},
        {"Cmd": []},
        {"Cmd": ["true"], "Env": "X=1"},
        {"Cmd": ["true"], "Tty": "yes"},
        {"Cmd": ["true"], "WorkingDir": "relative"},
        {"Cmd": ["true"], "ConsoleSize": [-1, 5]},
        {"Cmd": ["true"], "DetachKeys": "ctrl-"},
    ):
        status, answer = raw(cli, "POST", f"/containers/{CTR}/exec", body)
        assert status == 400, (body if len(json.dumps(body)) < 200 else "big", answer)
        assert answer["message"]
    status, _ = raw(cli, "POST", "/exec/nope/resize?h=x&w=1", None)
    assert status == 400


# ---- TTYs, driven through a real pty ---------------------------------------------------------


class Terminal:
    """The docker CLI on the slave side of a pty we hold the master of."""

    def __init__(
        self, cli: Cli, *args: str, rows: int = 24, cols: int = 80, binary: Path = DOCKER
    ) -> None:
        argv = [str(binary), *args]
        if binary != DOCKER:
            argv[1:1] = ["-H", cli.daemon.host]
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec the CLI on the pty
            os.execve(argv[0], argv, cli.env())
        self.pid, self.fd = pid, fd
        self.seen = b""
        self.resize(rows, cols)

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        os.kill(self.pid, signal.SIGWINCH)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, needle: bytes, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen; got {self.seen[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF before {needle!r}; got {self.seen[-500:]!r}")
                self.seen += chunk

    def wait(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with_status = os.waitpid(self.pid, os.WNOHANG)
            if with_status[0]:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(with_status[1])
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:
                    pass
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError(f"the CLI did not exit; got {self.seen[-500:]!r}")


def test_exec_it_shell_through_a_pty(cli: Cli) -> None:
    term = Terminal(cli, "exec", "-it", CTR, "sh", rows=30, cols=100)
    term.send(b"echo hi-$((40+2))\r")
    term.expect(b"hi-42")
    term.send(b"stty size\r")
    term.expect(b"30 100")
    term.resize(33, 120)
    time.sleep(0.3)
    term.send(b"stty size; echo $TERM\r")
    term.expect(b"33 120")
    term.expect(b"xterm")
    term.send(b"exit 5\r")
    assert term.wait() == 5


def test_exec_it_detach_keys_leave_the_process_running(cli: Cli) -> None:
    term = Terminal(cli, "exec", "-it", CTR, "sh")
    term.send(b"exec sleep 1234\r")
    time.sleep(0.5)
    term.send(b"\x10\x11")  # ctrl-p ctrl-q
    term.wait()
    time.sleep(0.5)  # a process the detach had hung up would be gone by now
    try:
        deadline = time.monotonic() + 5
        while "sleep 1234" not in cli("exec", CTR, "ps").stdout:
            assert time.monotonic() < deadline, "the detached exec did not keep running"
            time.sleep(0.1)
    finally:
        cli("exec", CTR, "pkill", "-f", "sleep 1234")


# ---- docker-py --------------------------------------------------------------------------------


def test_docker_py_exec_run(dpy: PyContainer) -> None:
    result = dpy.exec_run("sh -c 'echo out; exit 4'")
    assert result.exit_code == 4 and result.output == b"out\n"
    result = dpy.exec_run(
        ["sh", "-c", "echo $A $(id -u) $(pwd)"],
        user="65534",
        environment={"A": "b"},
        workdir="/etc",
    )
    assert result.exit_code == 0 and result.output == b"b 65534 /etc\n"


def test_docker_py_exec_run_stream_and_demux(dpy: PyContainer) -> None:
    result = dpy.exec_run(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.1; done"], stream=True)
    assert b"".join(result.output) == b"1\n2\n3\n"
    result = dpy.exec_run(["sh", "-c", "echo o; echo e >&2"], demux=True)
    assert result.exit_code == 0 and result.output == (b"o\n", b"e\n")
    result = dpy.exec_run(["sh", "-c", "echo tty"], tty=True)
    assert result.output == b"tty\r\n"


# ---- bounded memory ---------------------------------------------------------------------------


def raw(cli: Cli, method: str, path: str, body: object) -> tuple[int, dict]:
    data = b"" if body is None else json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(cli.socket_path)
        s.sendall(
            f"{method} /v1.47{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(rest or b"{}")
    except ValueError:
        return status, {"raw": rest.decode(errors="replace")}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_client_that_never_reads_does_not_grow_daemon_memory(cli: Cli) -> None:
    status, created = raw(
        cli,
        "POST",
        f"/containers/{CTR}/exec",
        {
            "Cmd": ["sh", "-c", "yes 0123456789012345678901234567890123456789"],
            "AttachStdout": True,
        },
    )
    assert status == 201
    exec_id = created["Id"]
    daemon_pid = cli.daemon.process.pid
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(cli.socket_path)
    try:
        body = b'{"Detach":false,"Tty":false}'
        s.sendall(
            f"POST /v1.47/exec/{exec_id}/start HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(1)
        start = rss_kib(daemon_pid)
        deadline = time.monotonic() + 4
        peak = start
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(daemon_pid))
            time.sleep(0.2)
        assert peak - start < 20 * 1024, (start, peak)
    finally:
        s.close()
    # The client left: the exec goes on (as Docker's does), its output read and dropped.
    assert raw(cli, "GET", f"/exec/{exec_id}/json", None)[1]["Running"] is True
    cli("exec", CTR, "pkill", "yes")


# ---- pyengine's own client -------------------------------------------------------------------


def test_pyengine_exec(cli: Cli) -> None:
    pyengine = [str(BIN / "pyengine"), "-H", cli.daemon.host]
    result = subprocess.run(
        [*pyengine, "exec", "-e", "Y=2", CTR, "sh", "-c", "echo $X$Y; echo e >&2; exit 3"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, "from-run2\n", "e\n")
    result = subprocess.run(
        [*pyengine, "exec", "-i", CTR, "cat"],
        input="piped\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "piped\n")
    missing = subprocess.run(
        [*pyengine, "exec", "pyetest-none", "true"], capture_output=True, text=True, timeout=30
    )
    assert missing.returncode != 0 and "No such container" in missing.stderr
    assert "Traceback" not in missing.stderr
    term = Terminal(cli, "exec", "-it", CTR, "sh", binary=BIN / "pyengine", rows=20, cols=70)
    term.send(b"stty size; echo hi-$((40+2))\r")
    term.expect(b"20 70")
    term.expect(b"hi-42")
    term.send(b"exit 2\r")
    assert term.wait() == 2


def test_exec_missing_executable(cli: Cli) -> None:
    result = cli("exec", CTR, "pyetest-nosuch")
    assert result.returncode == 127, (result.returncode, result.stderr)
    assert "executable file not found" in result.stderr

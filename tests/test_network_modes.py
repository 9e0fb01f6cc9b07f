"""Network modes besides bridge networks, through the real docker CLI (28.x, API 1.41):
``--network none``, ``--network host`` and ``--network container:<name|id>``.

Per proxy mode (publishing is involved in host mode: ``-p`` is discarded with Docker's
warning, and neither a proxy nor a DNAT rule appears). Inside-the-container checks list
``/sys/class/net``; a server in one container answers a ``container:`` joiner on 127.0.0.1; a
host-mode container listens on a loopback port the host connects to. Docker's lifecycle of a
joiner: it keeps running, in a namespace with only ``lo``, when its target stops or is
removed; a target restarted gets a new namespace the joiner only joins when it restarts.
Removing containers in each mode leaves no namespace, veth or rule behind, and a daemon restart
(live restore) keeps them running. Names: bridges ``pyem0..2``, subnets in 10.184.0.0/16.
Traffic goes only to 127.0.0.1 and to the namespaces of the test's containers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker as dockerpy
import pytest

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require,
    start_daemon,
    stop_daemon,
)
from tests.dockercli import DOCKER, DockerCli

MODES = {
    True: ("pyem0", "10.184.0.1/24"),
    False: ("pyem1", "10.184.1.1/24"),
}
RESTART = ("pyem2", "10.184.2.1/24")
HOST_PORTS_WARNING = "Published ports are discarded when using host network mode"


@dataclass
class Cli(DockerCli):
    api_version: str = "1.41"

    def pid(self, ref: str) -> int:
        pid = self.inspect(ref)["State"]["Pid"]
        assert pid > 0, f"{ref} is not running"
        return int(pid)

    def interfaces(self, ref: str) -> list[str]:
        """The links of a running container's network namespace (pyengined has no exec:
        ip(8) enters it from the host)."""
        out = subprocess.run(
            ["nsenter", f"--net=/proc/{self.pid(ref)}/ns/net", "ip", "-o", "link"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())

    def file(self, ref: str, path: str) -> str:
        """A file as the running container sees it."""
        return Path(f"/proc/{self.pid(ref)}/root{path}").read_text()

    def hostname(self, ref: str) -> str:
        return subprocess.run(
            ["nsenter", f"--uts=/proc/{self.pid(ref)}/ns/uts", "hostname"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def run_output(self, *args: str) -> str:
        """What a one-shot ``docker run --rm ... busybox <args>`` prints."""
        out = self("run", "--rm", *args)
        assert out.returncode == 0, out.stderr
        return out.stdout


def _daemon(tmp: Path, name: str, bip: str, proxy: bool, busybox: Path) -> tuple[Daemon, Cli]:
    d = start_daemon(tmp, name, bip, proxy)
    d.cli("load", "-i", str(busybox), check=True)
    return d, Cli(d, tmp / "docker-config")


def _teardown(d: Daemon) -> None:
    for cid in d.cli("ps", "-a", "-q").stdout.split():
        d.cli("rm", "-f", cid)
    stop_daemon(d)
    assert_nothing_left(d)


@pytest.fixture(scope="module", params=[True, False], ids=["userland-proxy", "kernel-dnat"])
def docker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path
) -> Iterator[Cli]:
    require(DOCKER.exists(), f"needs the docker CLI at {DOCKER}")
    name, bip = MODES[request.param]
    d, cli = _daemon(tmp_path_factory.mktemp(name), name, bip, request.param, busybox_archive)
    try:
        yield cli
    finally:
        _teardown(d)


@pytest.fixture
def names(docker: Cli) -> Iterator[Callable[[str], str]]:
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"pyem-{suffix}")
        return used[-1]

    yield name
    for n in reversed(used):
        docker("rm", "-f", n)


def host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def nft_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def loopback_httpd(port: int, body: str) -> list[str]:
    """busybox httpd serving ``body`` on 127.0.0.1:port (a command for busybox)."""
    return [
        "sh",
        "-c",
        f"mkdir -p /www && echo {body} > /www/index.html && "
        f"exec httpd -f -p 127.0.0.1:{port} -h /www",
    ]


def http_body(port: int, timeout: float = 20) -> str:
    """GET / from 127.0.0.1:port until it answers; the body."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(2)
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                if b"\r\n\r\n" in data:
                    return data.split(b"\r\n\r\n", 1)[1].decode()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered on 127.0.0.1:{port}")
        time.sleep(0.2)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


# ---- none -----------------------------------------------------------------------------------


def test_none_has_only_lo(docker: Cli, names: Callable[[str], str]) -> None:
    links, spaces = host_links(), netns_names()
    c = names("none")
    docker("run", "-d", "--name", c, "--network", "none", "busybox", "sleep", "60", check=True)
    assert docker.interfaces(c) == ["lo"]
    inside = docker.run_output(
        "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net; ip addr"
    )
    assert inside.split("\n")[0] == "lo"
    assert "LOOPBACK,UP" in inside and "inet 127.0.0.1/8" in inside and "eth0" not in inside
    resolv = docker.file(c, "/etc/resolv.conf")
    assert "127.0.0.11" not in resolv
    hosts = docker.file(c, "/etc/hosts")
    assert "127.0.0.1\tlocalhost" in hosts
    info = docker.inspect(c)
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert list(info["NetworkSettings"]["Networks"]) == ["none"]
    assert info["NetworkSettings"]["Networks"]["none"]["IPAddress"] == ""
    assert host_links() == links and netns_names() == spaces  # no veth, no netd namespace
    docker("rm", "-f", c, check=True)
    assert host_links() == links and netns_names() == spaces


def test_none_accepts_and_discards_published_ports(
    docker: Cli, names: Callable[[str], str]
) -> None:
    c = names("none-p")
    port = free_port()
    docker(
        "run",
        "-d",
        "--name",
        c,
        "--network",
        "none",
        "-p",
        f"{port}:80",
        "busybox",
        "sleep",
        "60",
        check=True,
    )
    assert docker("port", c, check=True).stdout.strip() == ""
    assert refused(port)
    assert str(port) not in nft_ruleset()


# ---- host -----------------------------------------------------------------------------------


def test_host_mode_shares_the_hosts_network(docker: Cli, names: Callable[[str], str]) -> None:
    c = names("host")
    port, published = free_port(), free_port()
    rules = nft_ruleset()
    out = docker(
        "run",
        "-d",
        "--name",
        c,
        "--network",
        "host",
        "-p",
        f"{published}:80",
        "busybox",
        *loopback_httpd(port, "host-mode"),
    )
    assert out.returncode == 0, out.stderr
    assert HOST_PORTS_WARNING in out.stderr
    assert http_body(port) == "host-mode\n"
    assert docker.interfaces(c) == sorted(host_links())
    assert docker.hostname(c) == os.uname().nodename
    hosts = docker.file(c, "/etc/hosts")
    assert hosts == Path("/etc/hosts").read_text()
    resolv = docker.file(c, "/etc/resolv.conf")
    assert resolv == Path("/etc/resolv.conf").read_text()
    # -p is discarded: no proxy, no DNAT rule, nothing on the published port.
    assert refused(published)
    assert str(published) not in nft_ruleset()
    assert nft_ruleset() == rules
    info = docker.inspect(c)
    assert info["HostConfig"]["NetworkMode"] == "host"
    assert list(info["NetworkSettings"]["Networks"]) == ["host"]
    assert docker("port", c, check=True).stdout.strip() == ""
    docker("rm", "-f", c, check=True)
    assert refused(port)


def test_host_mode_takes_dns_options_and_extra_hosts(docker: Cli) -> None:
    """--dns* replace the host's lists in a copy of its resolv.conf (loopback servers would be
    kept: the host's loopback is the container's); --add-host makes a hosts file of its own."""
    out = docker.run_output(
        "--network", "host", "--dns", "10.184.9.9", "--dns-search", "pyem.example",
        "--dns-option", "ndots:3", "--add-host", "pyem-x:10.184.9.8",
        "busybox", "sh", "-c", "cat /etc/resolv.conf; echo ---; cat /etc/hosts",
    )  # fmt: skip
    resolv, hosts = out.split("---\n")
    assert resolv.splitlines() == [
        "nameserver 10.184.9.9",
        "search pyem.example",
        "options ndots:3",
    ]
    assert "10.184.9.8\tpyem-x" in hosts.splitlines()
    assert hosts != Path("/etc/hosts").read_text()


def test_host_mode_keeps_a_given_hostname(docker: Cli) -> None:
    out = docker("run", "--rm", "--network", "host", "--hostname", "pyem-h", "busybox", "hostname")
    assert out.stdout.strip() == "pyem-h", out.stderr
    assert os.uname().nodename != "pyem-h"


# ---- container:<name|id> --------------------------------------------------------------------


def test_joiner_shares_the_targets_namespace(docker: Cli, names: Callable[[str], str]) -> None:
    target, joiner = names("target"), names("joiner")
    docker(
        "run",
        "-d",
        "--name",
        target,
        "busybox",
        "sh",
        "-c",
        "while true; do echo pong | nc -l -p 7000; done",
        check=True,
    )
    target_id = docker.inspect(target)["Id"]
    docker(
        "run",
        "-d",
        "--name",
        joiner,
        "--network",
        f"container:{target}",
        "busybox",
        "sleep",
        "120",
        check=True,
    )
    assert docker.interfaces(joiner) == docker.interfaces(target) == ["eth0", "lo"]
    got = ""
    for _ in range(50):  # the target's server may not listen yet
        got = docker(
            "run",
            "--rm",
            "--network",
            f"container:{target}",
            "busybox",
            "nc",
            "-w",
            "2",
            "127.0.0.1",
            "7000",
        ).stdout
        if got:
            break
        time.sleep(0.2)
    assert got == "pong\n"
    assert docker.hostname(joiner) == docker.hostname(target)
    for f in ("/etc/hosts", "/etc/resolv.conf"):
        assert docker.file(joiner, f) == docker.file(target, f)
    info = docker.inspect(joiner)
    assert info["HostConfig"]["NetworkMode"] == f"container:{target_id}"
    assert info["NetworkSettings"]["Networks"] == {}
    target_info = docker.inspect(target)
    for key in ("HostsPath", "ResolvConfPath", "HostnamePath"):
        assert info[key] == target_info[key], key  # the target's very files
    # The target stops: the joiner runs on with only lo (Docker's behaviour).
    docker("stop", "-t", "0", target, check=True)
    assert docker.inspect(joiner)["State"]["Running"]
    assert docker.interfaces(joiner) == ["lo"]
    # Restarted, the target gets a new namespace; the joiner joins it when it restarts.
    docker("start", target, check=True)
    assert docker.interfaces(joiner) == ["lo"]
    docker("restart", "-t", "0", joiner, check=True)
    assert docker.interfaces(joiner) == ["eth0", "lo"]
    # Removing the target is allowed; the joiner keeps running, and nothing is left behind.
    docker("rm", "-f", target, check=True)
    assert docker.inspect(joiner)["State"]["Running"]
    assert f"pyengine-{target_id[:12]}" not in netns_names()
    docker("rm", "-f", joiner, check=True)
    assert not any(target_id[:12] in n for n in netns_names())


def test_joining_a_stopped_or_missing_container_fails(
    docker: Cli, names: Callable[[str], str]
) -> None:
    stopped = names("stopped")
    docker("create", "--name", stopped, "busybox", "true", check=True)
    out = docker("run", "--rm", "--network", f"container:{stopped}", "busybox", "true")
    assert out.returncode != 0
    assert (
        f"cannot join network namespace of a non running container: container {stopped} is created"
        in out.stderr
    )
    out = docker("run", "--rm", "--network", "container:pyem-nosuch", "busybox", "true")
    assert out.returncode == 125 and "No such container: pyem-nosuch" in out.stderr
    assert "Unable to find image" not in out.stderr
    out = docker("run", "--rm", "--network", "container:", "busybox", "true")
    assert out.returncode == 125 and "invalid container format" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["-p", "8080:80"],
            "conflicting options: port publishing and the container type network mode",
        ),
        (
            ["-P", "--expose", "80"],
            "conflicting options: port publishing and the container type network mode",
        ),
        (
            ["--expose", "80"],
            "conflicting options: port exposing and the container type network mode",
        ),
        (["--hostname", "x"], "conflicting options: hostname and the network mode"),
        (["--dns", "10.184.9.9"], "conflicting options: dns and the network mode"),
        (
            ["--add-host", "a:10.184.9.9"],
            "conflicting options: custom host-to-IP mapping and the network mode",
        ),
    ],
)
def test_container_mode_conflicts(
    docker: Cli, names: Callable[[str], str], args: list[str], message: str
) -> None:
    target = names("conflict-target")
    docker("run", "-d", "--name", target, "busybox", "sleep", "60", check=True)
    before = docker("ps", "-aq", check=True).stdout
    out = docker("run", "--rm", "--network", f"container:{target}", *args, "busybox", "true")
    assert out.returncode == 125
    assert message in out.stderr
    assert docker("ps", "-aq", check=True).stdout == before


@pytest.mark.parametrize("mode", ["host", "container:TARGET"])
def test_mac_address_and_aliases_conflict_through_the_api(
    docker: Cli, names: Callable[[str], str], mode: str
) -> None:
    """The docker CLI 28 refuses these itself at API 1.41; docker-py sends them as is."""
    target = names("api-target")
    docker("run", "-d", "--name", target, "busybox", "sleep", "60", check=True)
    mode = mode.replace("TARGET", target)
    api = dockerpy.APIClient(base_url=docker.daemon.host, version="1.41")
    cases = [
        (
            {"MacAddress": "02:42:0a:b8:09:09"},
            {},
            "conflicting options: mac-address and the network mode",
        ),
        (
            {},
            {"EndpointsConfig": {mode: {"Aliases": ["x"]}}},
            "network-scoped alias is supported only for containers in user defined networks",
        ),
        (
            {},
            {"EndpointsConfig": {mode: {"IPAMConfig": {"IPv4Address": "10.184.0.9"}}}},
            "user specified IP address is supported on user defined networks only",
        ),
        (
            {},
            {"EndpointsConfig": {"bridge": {}}},
            "cannot be connected to any other network",
        ),
    ]
    for config, networking, message in cases:
        body = {
            "Image": "busybox",
            "Cmd": ["true"],
            **config,
            "HostConfig": {"NetworkMode": mode},
            "NetworkingConfig": networking,
        }
        res = api._post_json(api._url("/containers/create"), data=body)
        assert res.status_code == 400, res.text
        assert message in res.json()["message"]


# ---- the predefined networks ----------------------------------------------------------------


def test_none_and_host_networks_are_listed_and_kept(
    docker: Cli, names: Callable[[str], str]
) -> None:
    listed = docker("network", "ls", "--format", "{{.Name}} {{.Driver}}", check=True).stdout.split(
        "\n"
    )
    assert "none null" in listed and "host host" in listed and "bridge bridge" in listed
    for name, driver in (("none", "null"), ("host", "host")):
        net = json.loads(docker("network", "inspect", name, check=True).stdout)[0]
        assert net["Name"] == name and net["Driver"] == driver and net["Scope"] == "local"
        out = docker("network", "rm", name)
        assert out.returncode != 0 and "pre-defined" in out.stderr
    c = names("host-connect")
    docker("run", "-d", "--name", c, "--network", "host", "busybox", "sleep", "60", check=True)
    out = docker("network", "connect", "bridge", c)
    assert out.returncode != 0
    assert (
        "container cannot be disconnected from host network or connected to host network"
        in out.stderr
    )
    b = names("bridge-connect")
    docker("run", "-d", "--name", b, "busybox", "sleep", "60", check=True)
    out = docker("network", "connect", "host", b)
    assert out.returncode != 0 and "connected to host network" in out.stderr
    # Running containers of a mode are listed on its network, without addresses.
    n = names("none-listed")
    docker("run", "-d", "--name", n, "--network", "none", "busybox", "sleep", "60", check=True)
    for net, name in (("host", c), ("none", n)):
        listed = json.loads(docker("network", "inspect", net, check=True).stdout)[0]
        entries = {v["Name"]: v for v in listed["Containers"].values()}
        assert set(entries) == {name}, entries
        assert entries[name]["IPv4Address"] == "" and len(entries[name]["EndpointID"]) == 64
        assert docker.inspect(name)["Id"] in listed["Containers"]
    docker("stop", "-t", "0", n, check=True)
    listed = json.loads(docker("network", "inspect", "none", check=True).stdout)[0]
    assert listed["Containers"] == {}


def test_a_container_disconnected_from_every_network(
    docker: Cli, names: Callable[[str], str]
) -> None:
    """Disconnected from its only network, a container starts with loopback alone; connected
    again (what compose v1 does before every start, to set aliases), it has its interface."""
    c = names("detached")
    docker("create", "--name", c, "busybox", "sleep", "60", check=True)
    docker("network", "disconnect", "bridge", c, check=True)
    assert docker.inspect(c)["NetworkSettings"]["Networks"] == {}
    docker("start", c, check=True)
    assert docker.interfaces(c) == ["lo"]
    out = docker("network", "connect", "bridge", c)
    assert out.returncode != 0 and "without a network" in out.stderr
    docker("stop", "-t", "0", c, check=True)
    docker("network", "connect", "bridge", c, check=True)
    docker("start", c, check=True)
    assert docker.interfaces(c) == ["eth0", "lo"]
    assert list(docker.inspect(c)["NetworkSettings"]["Networks"]) == ["bridge"]


def test_pyengine_client_takes_the_modes(docker: Cli, names: Callable[[str], str]) -> None:
    d = docker.daemon
    out = d.cli("run", "--rm", "--network", "none", "busybox", "ls", "/sys/class/net")
    assert out.returncode == 0 and out.stdout.split() == ["lo"], out.stderr
    target = names("client-target")
    docker("run", "-d", "--name", target, "busybox", "sleep", "60", check=True)
    out = d.cli(
        "run", "--rm", "--network", f"container:{target}", "busybox", "ls", "/sys/class/net"
    )
    assert out.returncode == 0 and out.stdout.split() == ["eth0", "lo"], out.stderr
    out = d.cli("run", "--rm", "--network", f"container:{target}", "-p", "80", "busybox", "true")
    assert out.returncode != 0 and "port publishing" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ---- daemon restart -------------------------------------------------------------------------


def test_modes_survive_a_daemon_restart(
    tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path
) -> None:
    require(DOCKER.exists(), f"needs the docker CLI at {DOCKER}")
    name, bip = RESTART
    tmp = tmp_path_factory.mktemp(name)
    d, docker = _daemon(tmp, name, bip, True, busybox_archive)
    try:
        port = free_port()
        docker(
            "run",
            "-d",
            "--name",
            "pyem-r-none",
            "--network",
            "none",
            "busybox",
            "sleep",
            "300",
            check=True,
        )
        docker(
            "run",
            "-d",
            "--name",
            "pyem-r-host",
            "--network",
            "host",
            "busybox",
            *loopback_httpd(port, "again"),
            check=True,
        )
        docker("run", "-d", "--name", "pyem-r-target", "busybox", "sleep", "300", check=True)
        docker(
            "run",
            "-d",
            "--name",
            "pyem-r-joiner",
            "--network",
            "container:pyem-r-target",
            "busybox",
            "sleep",
            "300",
            check=True,
        )
        pids = {
            n: docker.inspect(n)["State"]["Pid"]
            for n in ("pyem-r-none", "pyem-r-host", "pyem-r-joiner")
        }
        stop_daemon(d)
        d, docker = _daemon(tmp, name, bip, True, busybox_archive)
        for n, pid in pids.items():
            info = docker.inspect(n)
            assert info["State"]["Running"] and info["State"]["Pid"] == pid, n
        assert http_body(port) == "again\n"
        assert docker.interfaces("pyem-r-none") == ["lo"]
        assert docker.interfaces("pyem-r-joiner") == ["eth0", "lo"]
        assert "lost its network endpoint" not in d.log()
    finally:
        _teardown(d)


def test_runtime_spec_namespaces_per_mode(tmp_path: Path) -> None:
    """The OCI spec's network namespace: a path to join, a new one, or (host) none at all."""
    from engine.runtime import bundle

    def net(**kw: object) -> list[dict[str, str]]:
        spec = bundle.runtime_spec(
            rootfs=tmp_path,
            args=["true"],
            env=[],
            cwd="/",
            user=(0, 0, []),
            hostname="h",
            bind_files={},
            cgroups_path="/pyengine/x",
            **kw,  # type: ignore[arg-type]
        )
        return [n for n in spec["linux"]["namespaces"] if n["type"] == "network"]

    assert net(netns_path="/run/netns/pyengine-x") == [
        {"type": "network", "path": "/run/netns/pyengine-x"}
    ]
    assert net(netns_path=None) == [{"type": "network"}]
    assert net(netns_path=None, host_network=True) == []

"""The real docker CLI (Debian's docker.io, API 1.41) drives pyengined: every verb a networking
user needs, checked against the output shapes Docker documents.

One pyengined (userland-proxy mode; docker-py's tests use kernel DNAT) on its own bridge,
subnet and nft table; the user-defined networks the tests create live in 10.63.0.0/16.
DOCKER_HOST points the CLI at it and DOCKER_CONFIG at a directory of the test's own: dockerd and
/var/run/docker.sock are never touched. Traffic goes only to loopback (published ports, the test
registries) and to the bridges of that daemon. Containers talk to containers with busybox's
``nc -w 2``: the image's busybox (Debian's static 1.35) crashes on ``wget -T``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from client.http import Client
from netd.naming import bridge_name_for
from tests.conftest import (
    BIN,
    Daemon,
    assert_nothing_left,
    free_port,
    require,
    require_tool,
    start_daemon,
    stop_daemon,
)
from tests.test_e2e import http_get, wait_http

DOCKER = Path("/usr/bin/docker")  # Debian's docker.io: the 20.10 CLI, API 1.41
NAME, BIP = "pyecli0", "10.61.0.1/24"
SUBNET = IPv4Network(BIP, strict=False)
ID_RE = re.compile(r"^[0-9a-f]{64}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


@dataclass
class DockerCli:
    """``docker`` against one test pyengined, with a config directory of its own."""

    daemon: Daemon
    config_dir: Path

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.host.removeprefix("unix://"))

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DOCKER_") or k == "DOCKER_CLI_HINTS"
        }
        env.update(DOCKER_HOST=self.daemon.host, DOCKER_CONFIG=str(self.config_dir))
        return env

    def __call__(
        self,
        *args: str,
        binary: Path = DOCKER,
        input: str | None = None,
        timeout: float = 120,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binary), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=self.env(),
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def inspect(self, ref: str) -> dict:
        return json.loads(self("inspect", ref, check=True).stdout)[0]

    def client(self) -> Client:
        return Client(self.daemon.host)


@pytest.fixture(scope="module")
def docker(
    tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path, busybox_archive: Path
) -> Iterator[DockerCli]:
    require(DOCKER.exists(), f"needs Debian's docker.io CLI at {DOCKER}")
    tmp = tmp_path_factory.mktemp(NAME)
    daemon = start_daemon(tmp, NAME, BIP, userland_proxy=True)
    cli = DockerCli(daemon, tmp / "docker-config")
    try:
        for archive in (nginx_archive, busybox_archive):
            cli("load", "-i", str(archive), check=True)
        yield cli
    finally:
        for cid in daemon.cli("ps", "-a", "-q").stdout.split():
            daemon.cli("rm", "-f", cid)
        stop_daemon(daemon)
    assert_nothing_left(daemon)


@pytest.fixture
def names(docker: DockerCli) -> Iterator[Callable[[str], str]]:
    """Container names for one test (``pyetest-cli-...``), force-removed afterwards."""
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"pyetest-cli-{suffix}")
        return used[-1]

    yield name
    for n in used:
        docker("rm", "-f", n)


def host_has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
    except OSError:
        return False
    return True


def published_host_ips() -> list[str]:
    """What a ``-p PORT:80`` is published on with the userland proxy, as the 20.10 CLI prints
    it: 0.0.0.0, and "::" when the host has IPv6."""
    return ["0.0.0.0", "::"] if host_has_ipv6() else ["0.0.0.0"]


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr


# ---- system -------------------------------------------------------------------------------------


def test_version_negotiates_api_1_41(docker: DockerCli) -> None:
    """Debian's 20.10 CLI speaks 1.41, the server offers up to 1.47 (tests/test_api_versions.py
    drives the newer CLI at 1.44 and 1.47)."""
    info = json.loads(docker("version", "--format", "{{json .}}", check=True).stdout)
    server = info["Server"]
    assert server["ApiVersion"] == "1.47" and server["MinAPIVersion"] == "1.24"
    assert server["Os"] == "linux" and server["Version"]
    assert server["Components"][0]["Name"] == "Engine"
    assert server["Components"][0]["Details"]["ApiVersion"] == "1.47"
    # A newer CLI, when the machine has one, negotiates down through /_ping's Api-Version.
    for other in (Path("/usr/local/bin/docker"),):
        if other.exists():
            out = docker("version", binary=other, check=True).stdout
            assert re.search(r"API version:\s+1\.47 \(downgraded from 1\.\d+\)", out), out
    # Outside [1.24, 1.47] the daemon answers as Docker does.
    for version, words in (("1.99", "too new"), ("1.12", "too old")):
        resp = raw_request(docker.socket_path, "GET", f"/v{version}/version", [])
        assert resp.status == 400
        assert words in json.loads(resp.read_to_eof())["message"]


def test_info(docker: DockerCli) -> None:
    info = json.loads(docker("info", "--format", "{{json .}}", check=True).stdout)
    assert info["OSType"] == "linux"
    assert info["Images"] >= 2
    assert info["Containers"] == info["ContainersRunning"] + info["ContainersStopped"]
    assert info["DockerRootDir"] == str(docker.daemon.data_root)
    assert info["Driver"] == "overlay2" and info["LoggingDriver"] == "json-file"
    assert info["Swarm"]["LocalNodeState"] == "inactive"
    assert "127.0.0.0/8" in info["RegistryConfig"]["InsecureRegistryCIDRs"]
    text = docker("info", check=True).stdout
    assert "Server Version: 0.1.0" in text and "Storage Driver: overlay2" in text


# ---- run ----------------------------------------------------------------------------------------


def test_run_detached_publishes_port(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("web")
    port = free_port()
    out = docker("run", "-d", "-p", f"{port}:80", "--name", name, "nginx", check=True)
    cid = out.stdout.strip()
    assert ID_RE.match(cid), out.stdout
    status, body = wait_http(f"http://127.0.0.1:{port}/")
    assert status == 200 and "Welcome to nginx" in body

    # Docker 28: without a host address, 0.0.0.0 and (the proxy carrying it) [::] when the
    # host has IPv6. The 20.10 CLI prints the IPv6 one as ":::port".
    host_ips = published_host_ips()
    lines = "".join(f"80/tcp -> {ip}:{port}\n" for ip in host_ips)
    assert docker("port", name, check=True).stdout == lines
    assert docker("port", name, "80", check=True).stdout == "".join(
        f"{ip}:{port}\n" for ip in host_ips
    )
    ps = docker("ps", "--format", "{{.ID}} {{.Names}} {{.Ports}} {{.Status}}", check=True)
    ports = ", ".join(f"{ip}:{port}->80/tcp" for ip in host_ips)
    assert f"{cid[:12]} {name} {ports} Up" in ps.stdout

    info = docker.inspect(name)
    assert info["Id"] == cid and info["Name"] == f"/{name}"
    assert info["State"]["Running"] is True and info["State"]["Pid"] > 0
    # HostPort is a string (swagger PortBinding).
    assert info["NetworkSettings"]["Ports"] == {
        "80/tcp": [{"HostIp": ip, "HostPort": str(port)} for ip in host_ips]
    }
    bridge = info["NetworkSettings"]["Networks"]["bridge"]
    assert IPv4Address(bridge["IPAddress"]) in SUBNET
    assert bridge["Gateway"] == docker.daemon.gateway and bridge["IPPrefixLen"] == 24
    assert info["HostConfig"]["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": str(port)}]}
    assert "80/tcp" in info["Config"]["ExposedPorts"]
    assert info["Image"].startswith("sha256:") and info["Config"]["Image"] == "nginx"

    # The container itself answers on its bridge address too.
    status, _ = http_get(f"http://{bridge['IPAddress']}/")
    assert status == 200


def test_run_publish_all_and_env(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("pall")
    docker("run", "-d", "-P", "--name", name, "nginx", check=True)
    mappings = docker("port", name, "80/tcp", check=True).stdout.splitlines()
    split = [m.rpartition(":") for m in mappings]
    host_port = split[0][2]
    assert [(ip, port) for ip, _, port in split] == [(ip, host_port) for ip in published_host_ips()]
    assert int(host_port) > 0
    assert wait_http(f"http://127.0.0.1:{host_port}/")[0] == 200

    out = docker("run", "--rm", "-e", "PYETEST=hello there", "busybox", "sh", "-c", "echo $PYETEST")
    assert out.returncode == 0 and out.stdout == "hello there\n", out.stderr


def test_run_foreground_attaches(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("fg")
    script = "echo out; sleep 0.3; echo err >&2; sleep 0.3; echo last; exit 3"
    out = docker("run", "--rm", "--name", name, "busybox", "sh", "-c", script)
    assert out.returncode == 3
    assert out.stdout == "out\nlast\n"
    assert out.stderr == "err\n"
    # --rm: the daemon removed it (AutoRemove) before `wait?condition=removed` returned.
    assert name not in docker("ps", "-a", "--format", "{{.Names}}", check=True).stdout

    kept = names("fg-kept")
    out = docker("run", "--name", kept, "busybox", "echo", "kept")
    assert out.returncode == 0 and out.stdout == "kept\n"
    assert docker.inspect(kept)["State"]["Status"] == "exited"


def test_attach_hijack_with_and_without_upgrade(docker: DockerCli) -> None:
    client = docker.client()
    for upgrade in (True, False):
        cid = client.create(
            None, {"Image": "busybox", "Cmd": ["sh", "-c", "echo hello; echo oops >&2"]}
        )
        try:
            headers = ["Connection: Upgrade", "Upgrade: tcp"] if upgrade else []
            resp = raw_request(
                docker.socket_path,
                "POST",
                f"/v1.41/containers/{cid}/attach?stream=1&stdout=1&stderr=1",
                headers,
            )
            if upgrade:
                assert (resp.status, resp.reason) == (101, "UPGRADED")
                assert resp.headers["connection"] == "Upgrade" and resp.headers["upgrade"] == "tcp"
            else:
                assert (resp.status, resp.reason) == (200, "OK")
            assert resp.headers["content-type"] == "application/vnd.docker.raw-stream"
            assert "transfer-encoding" not in resp.headers
            # The docker CLI shuts its write side when it has no stdin; output still flows.
            resp.sock.shutdown(socket.SHUT_WR)
            client.start(cid)
            frames = demultiplex(resp.read_to_eof())
            assert frames == [(1, b"hello\n"), (2, b"oops\n")]
        finally:
            client.remove(cid, force=True)


# ---- create / start / wait / logs --------------------------------------------------------------


def test_create_start_wait_logs(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("cswl")
    script = "echo a; echo b >&2; sleep 0.5; echo c; exit 5"
    cid = docker("create", "--name", name, "busybox", "sh", "-c", script, check=True).stdout.strip()
    assert ID_RE.match(cid)
    ps = docker("ps", "-a", "--filter", f"name={name}", "--format", "{{.Status}}", check=True)
    assert ps.stdout.strip() == "Created"
    assert docker.inspect(name)["State"]["Status"] == "created"

    assert docker("start", name, check=True).stdout.strip() == name
    assert docker("wait", name, check=True).stdout.strip() == "5"
    state = docker.inspect(name)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 5 and not state["Running"]

    logs = docker("logs", name, check=True)  # demultiplexed by the CLI: the 8-byte framing
    assert logs.stdout == "a\nc\n" and logs.stderr == "b\n"
    assert docker("logs", "--tail", "1", name, check=True).stdout == "c\n"
    stamped = docker("logs", "-t", name, check=True)
    assert all(TIMESTAMP_RE.match(line) for line in stamped.stdout.splitlines())
    assert [line.split(" ", 1)[1] for line in stamped.stdout.splitlines()] == ["a", "c"]
    later = docker(
        "logs", "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02T00:00:00Z", name
    )
    assert later.returncode == 0 and later.stdout == ""


def test_logs_follow_ends_with_the_container(
    docker: DockerCli, names: Callable[[str], str]
) -> None:
    name = names("follow")
    script = "for i in 1 2 3; do echo line$i; sleep 0.3; done"
    docker("run", "-d", "--name", name, "busybox", "sh", "-c", script, check=True)
    out = docker("logs", "-f", name, timeout=60, check=True)
    assert out.stdout == "line1\nline2\nline3\n"
    assert docker.inspect(name)["State"]["Status"] == "exited"


# ---- stop / kill / restart / rm ------------------------------------------------------------------


def test_stop_kill_restart(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("skr")
    script = "trap 'exit 7' TERM; while true; do sleep 0.1; done"
    docker("run", "-d", "--name", name, "busybox", "sh", "-c", script, check=True)
    assert docker("stop", "-t", "20", name, check=True).stdout.strip() == name
    assert docker.inspect(name)["State"]["ExitCode"] == 7  # the TERM trap ran: no SIGKILL

    one_line_error(docker("kill", name), "is not running")

    docker("start", name, check=True)
    first = docker.inspect(name)["State"]
    assert first["Running"]
    assert docker("restart", "-t", "20", name, check=True).stdout.strip() == name
    second = docker.inspect(name)["State"]
    assert second["Running"] and second["StartedAt"] > first["StartedAt"]
    assert second["Pid"] != first["Pid"]

    assert docker("kill", name, check=True).stdout.strip() == name
    assert docker("wait", name, check=True).stdout.strip() == "137"
    assert docker.inspect(name)["State"]["ExitCode"] == 137


def test_rm_running_needs_force(docker: DockerCli, names: Callable[[str], str]) -> None:
    name = names("rmf")
    docker("run", "-d", "--name", name, "busybox", "sleep", "60", check=True)
    one_line_error(docker("rm", name), "You cannot remove a running container")
    assert docker("rm", "-f", name, check=True).stdout.strip() == name
    gone = docker("inspect", name)
    assert gone.returncode == 1 and f"No such object: {name}" in gone.stderr


def test_ps_filters(docker: DockerCli, names: Callable[[str], str]) -> None:
    up, done = names("ps-up"), names("ps-done")
    docker("run", "-d", "--name", up, "busybox", "sleep", "60", check=True)
    docker("run", "--name", done, "busybox", "true", check=True)

    def ps(*args: str) -> set[str]:
        out = docker("ps", "--format", "{{.Names}}", *args, check=True).stdout
        return set(out.split())

    assert up in ps() and done not in ps()
    assert {up, done} <= ps("-a")
    assert ps("-a", "--filter", "name=pyetest-cli-ps-") == {up, done}
    assert ps("--filter", "status=exited", "--filter", "name=pyetest-cli-ps-") == {done}
    assert ps("-a", "--filter", "status=running", "--filter", "name=pyetest-cli-ps-") == {up}
    assert ps("-a", "--filter", "exited=0", "--filter", "name=pyetest-cli-ps-") == {done}
    state = docker("ps", "-a", "--filter", f"name={done}", "--format", "{{.State}}", check=True)
    assert state.stdout.strip() == "exited"
    one_line_error(docker("ps", "--filter", "status=sleeping"), "invalid filter 'status=sleeping'")
    one_line_error(docker("ps", "--filter", "colour=red"), "invalid filter 'colour'")


# ---- images ------------------------------------------------------------------------------------


def test_images_load_tag_inspect_rmi(
    docker: DockerCli, names: Callable[[str], str], busybox_archive: Path
) -> None:
    out = docker("load", "-i", str(busybox_archive), check=True)
    assert out.stdout.strip() == "Loaded image: busybox:latest"
    image_id = docker("image", "inspect", "-f", "{{.Id}}", "busybox", check=True).stdout.strip()
    assert image_id.startswith("sha256:")

    docker("tag", "busybox", "pyetest/bb:v1", check=True)
    rows = docker("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}", check=True).stdout
    assert f"busybox:latest {image_id[7:19]}" in rows
    assert f"pyetest/bb:v1 {image_id[7:19]}" in rows
    assert docker("images", "-q", "pyetest/bb", check=True).stdout.strip() == image_id[7:19]

    image = json.loads(docker("image", "inspect", "pyetest/bb:v1", check=True).stdout)[0]
    assert image["Id"] == image_id
    assert {"busybox:latest", "pyetest/bb:v1"} <= set(image["RepoTags"])
    assert image["Os"] == "linux" and image["Architecture"] == "amd64"
    assert image["RootFS"]["Type"] == "layers" and image["RootFS"]["Layers"]
    assert isinstance(image["Size"], int) and image["Config"]["Cmd"]
    # The generic inspect tries containers first, then images.
    assert docker.inspect("pyetest/bb:v1")["Id"] == image_id

    assert docker("rmi", "pyetest/bb:v1", check=True).stdout.strip() == "Untagged: pyetest/bb:v1"
    one_line_error(docker("image", "inspect", "pyetest/bb:v1"), "No such image")

    # The last tag of an image a container uses: refused unless forced, as in Docker.
    docker("tag", "busybox", "pyetest/bb:v2", check=True)
    try:
        user = names("rmi-user")
        docker("create", "--name", user, "pyetest/bb:v2", "true", check=True)
        docker("rmi", "busybox", check=True)  # another tag remains: only untagged
        one_line_error(docker("rmi", "pyetest/bb:v2"), "conflict", "must force")
    finally:
        docker("tag", image_id, "busybox", check=True)
        docker("rmi", "pyetest/bb:v2")


# ---- networks ----------------------------------------------------------------------------------

# The user-defined networks of these tests live in 10.63.0.0/16, one /24 per test (10.63.N.0/24),
# always with an explicit subnet: automatic ones come from a pool other daemons draw on too.
HTTP_PROBE = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80"


@pytest.fixture
def networks(docker: DockerCli) -> Iterator[Callable[[str], str]]:
    """Network names for one test (``pyetest-cli-net-...``); afterwards the containers on each
    are force-removed, then the network itself."""
    used: list[str] = []

    def name(suffix: str) -> str:
        used.append(f"pyetest-cli-net-{suffix}")
        return used[-1]

    yield name
    for net in reversed(used):
        on_it = docker("ps", "-aq", "--filter", f"network={net}").stdout.split()
        if on_it:
            docker("rm", "-f", *on_it)
        docker("network", "rm", net)


def create_network(docker: DockerCli, name: str, *args: str) -> str:
    out = docker("network", "create", *args, name, check=True).stdout.strip()
    assert ID_RE.match(out), out
    return out


def network_inspect(docker: DockerCli, ref: str) -> dict[str, Any]:
    return json.loads(docker("network", "inspect", ref, check=True).stdout)[0]


def network_names(docker: DockerCli) -> list[str]:
    return docker("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()


def ip_on(docker: DockerCli, container: str, network: str) -> str:
    return docker.inspect(container)["NetworkSettings"]["Networks"][network]["IPAddress"]


def sandbox_addresses(docker: DockerCli, container: str) -> dict[str, str]:
    """Interface → IPv4 address/prefix inside a running container's network namespace."""
    nsenter = require_tool("nsenter")
    key = docker.inspect(container)["NetworkSettings"]["SandboxKey"]
    assert key, f"{container} has no network namespace"
    out = subprocess.run(
        [nsenter, f"--net={key}", "ip", "-o", "-4", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if fields[1] != "lo":
            found[fields[1]] = fields[3]
    return found


def link_exists(ifname: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", "dev", ifname], capture_output=True).returncode == 0
    )


def http_from(docker: DockerCli, network: str, ip: str) -> subprocess.CompletedProcess[str]:
    """A one-shot busybox on ``network`` asks ``ip``:80 for / with nc (2 s timeout): its exit
    code and output say whether the request got through."""
    script = HTTP_PROBE.format(ip=ip)
    return docker("run", "--rm", "--network", network, "busybox", "sh", "-c", script)


def test_network_ls_and_inspect_default_bridge(
    docker: DockerCli, names: Callable[[str], str]
) -> None:
    rows = docker(
        "network", "ls", "--filter", "type=builtin", "--format", "{{.Name}} {{.Driver}} {{.Scope}}",
        check=True,
    )  # fmt: skip
    assert sorted(rows.stdout.splitlines()) == [
        "bridge bridge local",
        "host host local",
        "none null local",
    ]
    name = names("net")
    cid = docker("run", "-d", "--name", name, "busybox", "sleep", "60", check=True).stdout.strip()
    net = network_inspect(docker, "bridge")
    assert net["Name"] == "bridge" and net["Driver"] == "bridge" and net["Scope"] == "local"
    assert net["IPAM"]["Config"] == [{"Subnet": str(SUBNET), "Gateway": docker.daemon.gateway}]
    assert net["Options"]["com.docker.network.bridge.name"] == NAME
    endpoint = net["Containers"][cid]
    assert endpoint["Name"] == name
    assert IPv4Address(endpoint["IPv4Address"].split("/")[0]) in SUBNET
    assert docker.inspect(name)["NetworkSettings"]["Networks"]["bridge"]["NetworkID"] == net["Id"]
    # Docker fills the top-level address fields from the default network's endpoint.
    settings = docker.inspect(name)["NetworkSettings"]
    assert settings["IPAddress"] == endpoint["IPv4Address"].split("/")[0]

    one_line_error(docker("network", "create", "bridge"), "pre-defined network")
    one_line_error(docker("network", "rm", "bridge"), "pre-defined network")
    one_line_error(docker("network", "inspect", "pyetest-none"), "pyetest-none")


def test_network_create_ls_inspect(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    name = networks("one")
    net_id = create_network(
        docker, name,
        "--subnet", "10.63.1.0/24", "--gateway", "10.63.1.254", "--ip-range", "10.63.1.128/25",
        "-o", "com.docker.network.bridge.enable_icc=false", "--label", "pyetest.k=v",
    )  # fmt: skip
    short = net_id[:12]
    row = "{{.ID}} {{.Name}} {{.Driver}} {{.Scope}} {{.Internal}} {{.IPv6}} {{.Labels}}"
    rows = docker("network", "ls", "--filter", f"name={name}", "--format", row, check=True)
    assert rows.stdout.splitlines() == [f"{short} {name} bridge local false false pyetest.k=v"]

    def ls_q(*filters: str) -> list[str]:
        args = [arg for f in filters for arg in ("--filter", f)]
        return docker("network", "ls", "-q", *args, check=True).stdout.split()

    assert ls_q("label=pyetest.k=v") == [short]
    assert ls_q("label=pyetest.k") == [short]
    assert ls_q("label=pyetest.k=other") == []
    assert ls_q(f"id={net_id[:8]}") == [short]
    assert ls_q("type=custom", f"name={name}") == [short]
    assert ls_q("type=builtin", f"name={name}") == []
    assert ls_q("driver=bridge", "scope=local", f"name={name}") == [short]
    assert ls_q("dangling=true", f"name={name}") == [short]  # nothing on it yet
    assert net_id in docker("network", "ls", "-q", "--no-trunc", check=True).stdout.split()

    net = network_inspect(docker, name)
    assert net["Name"] == name and net["Id"] == net_id
    assert net["Driver"] == "bridge" and net["Scope"] == "local"
    assert net["EnableIPv6"] is False and net["Internal"] is False
    assert net["IPAM"]["Driver"] == "default"
    assert net["IPAM"]["Config"] == [
        {"Subnet": "10.63.1.0/24", "Gateway": "10.63.1.254", "IPRange": "10.63.1.128/25"}
    ]
    assert net["Options"] == {"com.docker.network.bridge.enable_icc": "false"}
    assert net["Labels"] == {"pyetest.k": "v"}
    assert net["Containers"] == {}
    assert docker("network", "inspect", "-f", "{{.Name}}", short, check=True).stdout == f"{name}\n"
    # The network is a real bridge carrying the gateway address.
    bridge = bridge_name_for(net_id)
    addresses = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", bridge], capture_output=True, text=True
    ).stdout
    assert "10.63.1.254/24" in addresses, addresses

    c = names("one")
    cid = docker(
        "run", "-d", "--name", c, "--network", name, "busybox", "sleep", "300", check=True
    ).stdout.strip()
    ip = ip_on(docker, c, name)
    assert IPv4Address(ip) in IPv4Network("10.63.1.128/25"), "automatic addresses: the ip-range"
    member = network_inspect(docker, name)["Containers"][cid]
    assert member["Name"] == c and member["IPv4Address"] == f"{ip}/24"
    assert ID_RE.match(member["EndpointID"]) and member["MacAddress"].startswith("02:42:")
    assert ls_q("dangling=true", f"name={name}") == []
    assert ls_q("dangling=false", f"name={name}") == [short]


def test_network_driver_options_and_internal(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    name = networks("opts")
    bridge = "pyetestclibr2"
    create_network(
        docker, name, "--internal", "--subnet", "10.63.2.0/24",
        "-o", f"com.docker.network.bridge.name={bridge}",
        "-o", "com.docker.network.driver.mtu=1400",
    )  # fmt: skip
    net = network_inspect(docker, name)
    assert net["Internal"] is True
    assert net["Options"] == {
        "com.docker.network.bridge.name": bridge,
        "com.docker.network.driver.mtu": "1400",
    }
    assert docker(
        "network", "ls", "--filter", f"name={name}", "--format", "{{.Internal}}"
    ).stdout == ("true\n")
    assert link_exists(bridge)

    c = names("mtu")
    docker("run", "-d", "--name", c, "--network", name, "busybox", "sleep", "300", check=True)
    key = docker.inspect(c)["NetworkSettings"]["SandboxKey"]
    link = subprocess.run(
        [require_tool("nsenter"), f"--net={key}", "ip", "-o", "link", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert " mtu 1400 " in link, link

    docker("rm", "-f", c, check=True)
    assert docker("network", "rm", name, check=True).stdout == f"{name}\n"
    assert not link_exists(bridge), "the bridge goes with its network"


def test_run_with_ip_and_network_alias(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    name = networks("ip")
    net_id = create_network(docker, name, "--subnet", "10.63.3.0/24")
    c = names("ip")
    cid = docker(
        "run", "-d", "--name", c, "--network", name, "--ip", "10.63.3.10",
        "--network-alias", "web", "busybox", "sleep", "300", check=True,
    ).stdout.strip()  # fmt: skip
    info = docker.inspect(c)
    assert info["HostConfig"]["NetworkMode"] == name
    settings = info["NetworkSettings"]
    assert list(settings["Networks"]) == [name]
    endpoint = settings["Networks"][name]
    assert endpoint["NetworkID"] == net_id and ID_RE.match(endpoint["EndpointID"])
    assert endpoint["IPAddress"] == "10.63.3.10" and endpoint["IPPrefixLen"] == 24
    assert endpoint["Gateway"] == "10.63.3.1"
    assert "web" in endpoint["Aliases"]
    assert endpoint["IPAMConfig"] == {"IPv4Address": "10.63.3.10"}
    # As in Docker, the top-level fields belong to the default network only: empty here.
    assert settings["IPAddress"] == "" and settings["Gateway"] == ""
    assert settings["MacAddress"] == "" and settings["EndpointID"] == ""
    assert settings["SandboxKey"]
    assert sandbox_addresses(docker, c) == {"eth0": "10.63.3.10/24"}
    member = network_inspect(docker, name)["Containers"][cid]
    assert member["Name"] == c and member["IPv4Address"] == "10.63.3.10/24"
    ps = docker("ps", "--filter", f"network={name}", "--format", "{{.Names}} {{.Networks}}")
    assert ps.stdout == f"{c} {name}\n"

    # An address in use fails the start, not the create: the container stays, created (Docker).
    second = names("ip-taken")
    taken = docker("run", "--name", second, "--network", name, "--ip", "10.63.3.10", "busybox")
    assert taken.returncode == 125
    one_line_error(taken, "Error response from daemon", "10.63.3.10")
    state = docker.inspect(second)["State"]
    assert state["Status"] == "created" and "10.63.3.10" in state["Error"]
    assert list(network_inspect(docker, name)["Containers"]) == [cid]

    before = docker("ps", "-aq", check=True).stdout
    outside = docker("run", "--network", name, "--ip", "10.63.99.5", "busybox", "true")
    assert outside.returncode == 125
    one_line_error(outside, "Error response from daemon", "10.63.99.5")
    assert docker("ps", "-aq", check=True).stdout == before


def test_network_connect_and_disconnect_a_running_container(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    front, back = networks("front"), networks("back")
    create_network(docker, front, "--subnet", "10.63.4.0/24")
    create_network(docker, back, "--subnet", "10.63.5.0/24")
    c = names("multi")
    docker(
        "run", "-d", "--name", c, "--network", front, "--ip", "10.63.4.10",
        "busybox", "sleep", "300", check=True,
    )  # fmt: skip
    connected = docker("network", "connect", "--ip", "10.63.5.20", "--alias", "db", back, c)
    assert connected.returncode == 0 and connected.stdout == "", connected.stderr
    assert sandbox_addresses(docker, c) == {"eth0": "10.63.4.10/24", "eth1": "10.63.5.20/24"}
    nets = docker.inspect(c)["NetworkSettings"]["Networks"]
    assert set(nets) == {front, back}
    assert nets[back]["IPAddress"] == "10.63.5.20" and nets[back]["Gateway"] == "10.63.5.1"
    assert "db" in nets[back]["Aliases"]
    assert nets[back]["IPAMConfig"] == {"IPv4Address": "10.63.5.20"}
    assert nets[front]["IPAddress"] == "10.63.4.10"
    rows = docker("ps", "--filter", f"name={c}", "--format", "{{.Networks}}", check=True).stdout
    assert sorted(rows.strip().split(",")) == sorted([front, back])

    one_line_error(docker("network", "connect", back, c), "already exists")
    one_line_error(docker("network", "connect", "pyetest-none", c), "pyetest-none")
    # What pyengined cannot do on an endpoint is refused, not ignored.
    for args, needle in (
        (["--link", f"{c}:pyetest-l"], "links"),
        (["--driver-opt", "pyetest=1"], "driver options"),
        (["--link-local-ip", "169.254.7.7"], "link-local"),
        (["--ip6", "fd00:63::7"], "IPv6"),
        (["--ip", "10.63.4.99"], "10.63.4.99"),
    ):
        one_line_error(docker("network", "connect", *args, back, c), needle)

    disconnected = docker("network", "disconnect", back, c)
    assert disconnected.returncode == 0 and disconnected.stdout == "", disconnected.stderr
    assert sandbox_addresses(docker, c) == {"eth0": "10.63.4.10/24"}
    assert set(docker.inspect(c)["NetworkSettings"]["Networks"]) == {front}
    assert network_inspect(docker, back)["Containers"] == {}
    one_line_error(docker("network", "disconnect", back, c), "is not connected")

    # Created on one network only before API 1.44 (this CLI's 1.41): Docker's refusal.
    two = docker("run", "--network", front, "--network", back, "busybox", "true")
    one_line_error(two, "Error response from daemon", "cannot be connected to network endpoints")


def test_network_connect_a_created_container(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    first, second = networks("first"), networks("second")
    create_network(docker, first, "--subnet", "10.63.6.0/24")
    create_network(docker, second, "--subnet", "10.63.7.0/24")
    c = names("created")
    docker("create", "--name", c, "--network", first, "busybox", "sleep", "300", check=True)
    docker("network", "connect", "--ip", "10.63.7.7", "--alias", "later", second, c, check=True)
    info = docker.inspect(c)
    assert info["NetworkSettings"]["SandboxKey"] == ""
    nets = info["NetworkSettings"]["Networks"]
    assert set(nets) == {first, second}
    # Not running: the network is recorded, no endpoint exists yet.
    assert nets[second]["IPAddress"] == "" and nets[second]["EndpointID"] == ""
    assert nets[second]["Aliases"] == ["later"]
    assert nets[second]["IPAMConfig"] == {"IPv4Address": "10.63.7.7"}
    assert network_inspect(docker, second)["Containers"] == {}
    ps = docker("ps", "-a", "--filter", f"network={second}", "--format", "{{.Names}}")
    assert ps.stdout == f"{c}\n"

    docker("start", c, check=True)
    addresses = sandbox_addresses(docker, c)
    assert set(addresses) == {"eth0", "eth1"}
    assert IPv4Address(addresses["eth0"].split("/")[0]) in IPv4Network("10.63.6.0/24")
    assert addresses["eth1"] == "10.63.7.7/24"
    assert ip_on(docker, c, second) == "10.63.7.7"

    # A created container can leave a network again before it starts.
    c2 = names("created2")
    docker("create", "--name", c2, "--network", first, "busybox", "sleep", "300", check=True)
    docker("network", "connect", second, c2, check=True)
    docker("network", "disconnect", second, c2, check=True)
    assert set(docker.inspect(c2)["NetworkSettings"]["Networks"]) == {first}
    docker("start", c2, check=True)
    assert set(sandbox_addresses(docker, c2)) == {"eth0"}


def test_network_rm_is_refused_while_in_use(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    name = networks("busy")
    net_id = create_network(docker, name, "--subnet", "10.63.8.0/24")
    c = names("busy")
    docker("run", "-d", "--name", c, "--network", name, "busybox", "sleep", "300", check=True)
    refused = docker("network", "rm", name)
    assert refused.returncode == 1
    one_line_error(refused, "Error response from daemon", "active endpoints")
    assert name in network_names(docker)

    docker("rm", "-f", c, check=True)
    assert docker("network", "rm", name, check=True).stdout == f"{name}\n"
    assert name not in network_names(docker)
    one_line_error(docker("network", "inspect", name), "No such network")
    assert not link_exists(bridge_name_for(net_id))


def test_rename_and_ps_filter_network(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    name = networks("ren")
    net_id = create_network(docker, name, "--subnet", "10.63.9.0/24")
    old, new, elsewhere = names("old"), names("new"), names("elsewhere")
    cid = docker(
        "run", "-d", "--name", old, "--network", name, "busybox", "sleep", "300", check=True
    ).stdout.strip()
    docker("run", "-d", "--name", elsewhere, "busybox", "sleep", "300", check=True)

    renamed = docker("rename", old, new)
    assert renamed.returncode == 0 and renamed.stdout == "", renamed.stderr
    assert docker.inspect(cid)["Name"] == f"/{new}"
    assert network_inspect(docker, name)["Containers"][cid]["Name"] == new
    one_line_error(docker("inspect", old), old)

    def on(network: str) -> list[str]:
        ps = docker("ps", "--filter", f"network={network}", "--format", "{{.Names}}", check=True)
        return ps.stdout.split()

    assert on(name) == [new]
    assert on(net_id[:12]) == [new]
    assert elsewhere in on("bridge") and new not in on("bridge")

    # The CLI adds a line of its own ("Error: failed to rename container named ...").
    for target, needle in ((new, "same name"), (elsewhere, "is already in use")):
        refused = docker("rename", new, target)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "Error response from daemon: " in refused.stderr and needle in refused.stderr
    assert docker.inspect(cid)["Name"] == f"/{new}"


def test_network_prune(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    labelled, plain, used = networks("prune-l"), networks("prune-p"), networks("prune-u")
    create_network(docker, labelled, "--subnet", "10.63.10.0/24", "--label", "pyetest.prune=yes")
    create_network(docker, plain, "--subnet", "10.63.11.0/24")
    create_network(docker, used, "--subnet", "10.63.12.0/24", "--label", "pyetest.prune=yes")
    docker(
        "run", "-d", "--name", names("prune"), "--network", used, "busybox", "sleep", "300",
        check=True,
    )  # fmt: skip

    out = docker("network", "prune", "-f", "--filter", "label=pyetest.prune=yes", check=True)
    assert out.stdout == f"Deleted Networks:\n{labelled}\n\n"
    out = docker("network", "prune", "-f", check=True)
    assert out.stdout == f"Deleted Networks:\n{plain}\n\n"
    assert docker("network", "prune", "-f", check=True).stdout == ""
    assert sorted(network_names(docker)) == sorted(["bridge", "host", "none", used])
    # Every network left is younger than an hour; a malformed until is one line.
    assert docker("network", "prune", "-f", "--filter", "until=1h", check=True).stdout == ""
    one_line_error(docker("network", "prune", "-f", "--filter", "until=soon"), "time", "soon")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--subnet", "10.63.300.0/24"], 'invalid subnet "10.63.300.0/24"'),
        (["--subnet", "10.63.13.1/24"], "it should be 10.63.13.0/24"),
        (["--subnet", "10.63.13.0/31"], "too small"),
        (["--subnet", "10.63.13.0/24", "--gateway", "10.63.13.0"], "not a host address"),
        (["--subnet", "10.63.13.0/24", "--subnet", "10.63.14.0/24"], "several IPv4 subnets"),
        (["--ipv6", "--subnet", "fd00:63:1::/64", "--subnet", "fd00:63:2::/64"], "IPv6 subnets"),
        (["--subnet", "fd00:63::/64"], "needs EnableIPv6"),
        (["--subnet", "10.63.13.0/24", "-d", "overlay"], 'network driver "overlay"'),
        (["--subnet", "10.63.13.0/24", "-d", "ipvlan", "-o", "x=1"], '"x"'),
        (
            ["--subnet", "10.63.13.0/24", "-d", "macvlan", "-o", "parent=pyetest-nope0"],
            "parent interface pyetest-nope0 does not exist",
        ),
        (["--subnet", "10.63.13.0/24", "-o", "pyetest.opt=1"], '"pyetest.opt"'),
        (
            ["--subnet", "10.63.13.0/24", "-o", "com.docker.network.driver.mtu=9"],
            "com.docker.network.driver.mtu",
        ),
        (["--subnet", "10.63.13.0/24", "--aux-address", "a=10.63.13.5"], "--aux-address"),
        (["--subnet", "10.63.13.0/24", "--ipam-driver", "pyetest"], 'IPAM driver "pyetest"'),
        (["--subnet", "10.63.13.0/24", "--ipam-opt", "a=b"], "IPAM options"),
        (["--subnet", "10.63.13.0/24", "--scope", "swarm"], 'scope "swarm"'),
        (["--subnet", "10.63.13.0/24", "--config-only"], "ConfigOnly"),
    ],
)
def test_network_create_refusals(docker: DockerCli, args: list[str], needle: str) -> None:
    before = docker("network", "ls", "-q", "--no-trunc", check=True).stdout
    out = docker("network", "create", *args, "pyetest-cli-net-refused")
    assert out.returncode == 1
    one_line_error(out, "Error response from daemon", needle)
    assert docker("network", "ls", "-q", "--no-trunc", check=True).stdout == before


def test_network_create_duplicate_and_overlap(
    docker: DockerCli, networks: Callable[[str], str]
) -> None:
    name, other = networks("dup"), networks("overlap")
    create_network(docker, name, "--subnet", "10.63.15.0/24")
    again = docker("network", "create", "--subnet", "10.63.16.0/24", name)
    one_line_error(again, "Error response from daemon", f"network with name {name} already exists")
    for subnet in ("10.63.15.128/25", "10.63.0.0/16"):
        overlap = docker("network", "create", "--subnet", subnet, other)
        one_line_error(overlap, "Error response from daemon", "overlaps", name)
    bad_name = docker("network", "create", "--subnet", "10.63.16.0/24", "pyetest bad")
    one_line_error(bad_name, "Error response from daemon", "invalid network name")
    assert [n for n in network_names(docker) if n.startswith("pyetest")] == [name]


def test_published_port_on_a_user_network(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    name = networks("pub")
    create_network(docker, name, "--subnet", "10.63.17.0/24")
    c, port = names("pub"), free_port()
    docker("run", "-d", "--name", c, "--network", name, "-p", f"{port}:80", "nginx", check=True)
    status, body = wait_http(f"http://127.0.0.1:{port}/")
    assert status == 200 and "Welcome to nginx" in body
    host_ips = published_host_ips()
    assert docker("port", c, "80", check=True).stdout == "".join(
        f"{ip}:{port}\n" for ip in host_ips
    )
    settings = docker.inspect(c)["NetworkSettings"]
    assert settings["Ports"] == {
        "80/tcp": [{"HostIp": ip, "HostPort": str(port)} for ip in host_ips]
    }
    ip = settings["Networks"][name]["IPAddress"]
    assert IPv4Address(ip) in IPv4Network("10.63.17.0/24")
    # The host reaches the container through the network's bridge as well.
    assert http_get(f"http://{ip}/")[0] == 200


def test_traffic_between_containers_follows_their_networks(
    docker: DockerCli, networks: Callable[[str], str], names: Callable[[str], str]
) -> None:
    a, b, quiet = networks("a"), networks("b"), networks("noicc")
    create_network(docker, a, "--subnet", "10.63.18.0/24")
    create_network(docker, b, "--subnet", "10.63.19.0/24")
    create_network(
        docker,
        quiet,
        "--subnet",
        "10.63.20.0/24",
        "-o",
        "com.docker.network.bridge.enable_icc=false",
    )
    web = names("traffic-web")
    docker("run", "-d", "--name", web, "--network", a, "nginx", check=True)
    web_a = ip_on(docker, web, a)
    wait_http(f"http://{web_a}/")  # nginx is up (from the host, through a's bridge)

    same = http_from(docker, a, web_a)
    assert same.returncode == 0 and same.stdout.startswith("HTTP/1.1 200 OK"), same.stderr
    across = http_from(docker, b, web_a)
    assert across.returncode != 0 and "HTTP/" not in across.stdout, across

    docker("network", "connect", b, web, check=True)
    web_b = ip_on(docker, web, b)
    via_b = http_from(docker, b, web_b)
    assert via_b.returncode == 0 and via_b.stdout.startswith("HTTP/1.1 200 OK"), via_b.stderr

    # enable_icc=false: containers of that network do not reach one another.
    docker("network", "connect", quiet, web, check=True)
    web_quiet = ip_on(docker, web, quiet)
    assert wait_http(f"http://{web_quiet}/")[0] == 200  # the gateway still does
    isolated = http_from(docker, quiet, web_quiet)
    assert isolated.returncode != 0 and "HTTP/" not in isolated.stdout, isolated

    docker("network", "disconnect", b, web, check=True)
    gone = http_from(docker, b, web_b)
    assert gone.returncode != 0 and "HTTP/" not in gone.stdout, gone


# ---- what pyengined does not do: clear errors, nothing left behind ------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--network", "container:pyetest-nosuch"], "No such container: pyetest-nosuch"),
        (["--network", "pyetest-none"], "network pyetest-none not found"),
        (["--restart", "sometimes"], "invalid restart policy: unknown policy 'sometimes'"),
        (["--network", "bridge", "--ip", "10.61.0.77"], "user defined networks only"),
        (["--blkio-weight", "300"], "--blkio-weight"),
        (["--shm-size", "128m"], "--shm-size is not supported"),
        (["--oom-score-adj", "500"], "--oom-score-adj is not supported"),
        (["--cgroup-parent", "/pyetest"], "--cgroup-parent is not supported"),
    ],
)
def test_unsupported_run_options_are_refused(
    docker: DockerCli, args: list[str], needle: str
) -> None:
    before = docker("ps", "-aq", check=True).stdout
    out = docker("run", *args, "busybox", "true")
    assert out.returncode == 125
    one_line_error(out, "Error response from daemon", needle)
    assert docker("ps", "-aq", check=True).stdout == before


def test_missing_image_is_pulled_and_a_dead_registry_is_one_line(docker: DockerCli) -> None:
    port = free_port()  # nothing listens: the pull fails fast, on loopback
    ref = f"127.0.0.1:{port}/pyetest/nosuch:latest"
    out = docker("run", "--rm", ref)
    assert out.returncode == 125
    assert f"Unable to find image '{ref}' locally" in out.stderr
    assert "connection refused" in out.stderr and "Traceback" not in out.stderr


def test_bad_requests_are_json_errors(docker: DockerCli) -> None:
    privileged = {"Image": "busybox", "HostConfig": {"Privileged": True}}
    cases = [
        ("POST", "/containers/create", {"Image": "busybox", "Cmd": 42}, 400),
        ("POST", "/containers/create", {"Image": "busybox", "ExposedPorts": {"x/tcp": {}}}, 400),
        ("POST", "/containers/create", {"Image": "pyetest-none"}, 404),
        ("GET", "/containers/json?filters=%7Bnot-json", None, 400),
        ("POST", "/containers/pyetest-none/wait", None, 404),
        ("POST", "/containers/create", privileged, 501),
        ("POST", "/containers/pyetest-none/exec", {"Cmd": ["ls"]}, 404),
        ("GET", "/pyetest/unknown/route", None, 404),
    ]
    for method, path, body, status in cases:
        resp = raw_request(
            docker.socket_path,
            method,
            "/v1.41" + path,
            ["Content-Type: application/json"],
            json.dumps(body).encode() if body is not None else b"",
        )
        data = resp.read_to_eof()
        assert resp.status == status, (path, resp.status, data)
        assert resp.headers["content-type"] == "application/json", path
        message = json.loads(data)["message"]
        assert message and "\n" not in message and "Traceback" not in message


# ---- pull and login, against real registries on loopback -----------------------------------------


@pytest.fixture(scope="module")
def registries(
    tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path
) -> Iterator[dict[str, Any]]:
    from tests.registry_helpers import build_image, push_image, skopeo_push, start_registry

    require_tool("skopeo")
    tmp = tmp_path_factory.mktemp("pyetest-cli-registries")
    started = []
    try:
        open_registry = start_registry(tmp / "open", auth="none")
        started.append(open_registry)
        skopeo_push(busybox_archive, open_registry, "pyetest/busybox:latest")
        tiny = build_image([{"pyetest/hello.txt": b"hello from a registry\n"}])
        push_image(open_registry, "pyetest/tiny", tiny, tag="v1")
        locked = start_registry(tmp / "locked", auth="htpasswd")
        started.append(locked)
        skopeo_push(busybox_archive, locked, "pyetest/busybox:locked")
        yield {"open": open_registry, "locked": locked, "tiny": tiny}
    finally:
        for registry in started:
            registry.stop()


def test_pull_streams_docker_progress(docker: DockerCli, registries: dict[str, Any]) -> None:
    host = registries["open"].host
    ref = f"{host}/pyetest/tiny:v1"
    out = docker("pull", ref, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "v1: Pulling from pyetest/tiny"
    short = json.loads(registries["tiny"].manifest)["layers"][0]["digest"][7:19]
    assert f"{short}: Pull complete" in lines
    assert f"Digest: {registries['tiny'].digest}" in lines
    assert f"Status: Downloaded newer image for {ref}" in lines
    assert docker("image", "inspect", "-f", "{{.Id}}", ref, check=True).stdout.strip() == (
        registries["tiny"].image_id
    )
    again = docker("pull", ref, check=True).stdout
    assert f"Status: Image is up to date for {ref}" in again
    docker("rmi", ref, check=True)

    missing = docker("pull", f"{host}/pyetest/tiny:nosuch")
    one_line_error(missing, "manifest unknown")


def test_run_pulls_a_missing_image(docker: DockerCli, registries: dict[str, Any]) -> None:
    ref = f"{registries['open'].host}/pyetest/busybox:latest"
    docker("rmi", ref)
    out = docker("run", "--rm", ref, "echo", "pulled and ran", timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"Unable to find image '{ref}' locally" in out.stderr
    assert out.stdout.endswith("pulled and ran\n")
    docker("rmi", ref, check=True)


def test_login_then_pull_with_credentials(docker: DockerCli, registries: dict[str, Any]) -> None:
    from tests.registry_helpers import PASSWORD, USER

    host = registries["locked"].host
    ref = f"{host}/pyetest/busybox:locked"
    denied = docker("pull", ref)
    one_line_error(denied, "unauthorized")
    wrong = docker("login", host, "-u", USER, "--password-stdin", input="wrong\n")
    one_line_error(wrong, "unauthorized")
    good = docker("login", host, "-u", USER, "--password-stdin", input=f"{PASSWORD}\n")
    assert good.returncode == 0 and "Login Succeeded" in good.stdout, good.stderr
    # The CLI keeps the login itself and sends it in X-Registry-Auth.
    assert host in json.loads((docker.config_dir / "config.json").read_text())["auths"]
    pulled = docker("pull", ref, check=True)
    assert f"Status: Downloaded newer image for {ref}" in pulled.stdout
    docker("rmi", ref, check=True)


# ---- the project's own client: the same verbs ------------------------------------------------


def pyengine(
    docker: DockerCli, *args: str, config_home: Path, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``pyengine`` with its credentials under ``config_home`` (XDG_CONFIG_HOME)."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(config_home)}
    return subprocess.run(
        [str(BIN / "pyengine"), "-H", docker.daemon.host, *args],
        capture_output=True,
        text=True,
        timeout=180,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        env=env,
    )


def test_pyengine_verbs(
    docker: DockerCli, names: Callable[[str], str], registries: dict[str, Any], tmp_path: Path
) -> None:
    from tests.registry_helpers import PASSWORD, USER

    home = tmp_path / "config"

    def pye(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return pyengine(docker, *args, config_home=home, input=input)

    name = names("pye")
    script = "trap 'exit 9' TERM; while true; do sleep 0.1; done"
    created = pye("create", "--name", name, "busybox", "sh", "-c", script)
    assert ID_RE.match(created.stdout.strip()), created.stderr
    assert pye("start", name).stdout.strip() == name
    assert pye("kill", "-s", "TERM", name).stdout.strip() == name
    assert pye("wait", name).stdout.strip() == "9"
    assert pye("restart", name).stdout.strip() == name
    assert docker.inspect(name)["State"]["Running"]
    pye("kill", name)
    assert pye("wait", name).stdout.strip() == "137"

    assert pye("tag", "busybox", "pyetest/pye:v1").returncode == 0
    image = json.loads(pye("inspect", "--type", "image", "pyetest/pye:v1").stdout)[0]
    assert "pyetest/pye:v1" in image["RepoTags"] and image["Id"].startswith("sha256:")
    assert json.loads(pye("inspect", name).stdout)[0]["Name"] == f"/{name}"
    assert pye("rmi", "pyetest/pye:v1").stdout == "Untagged: pyetest/pye:v1\n"
    missing = pye("inspect", "pyetest/pye:v1")
    assert missing.returncode == 1 and "No such object: pyetest/pye:v1" in missing.stderr

    host = registries["locked"].host
    ref = f"{host}/pyetest/busybox:locked"
    denied = pye("pull", ref)
    assert denied.returncode == 1 and len(denied.stderr.splitlines()) == 1
    assert "unauthorized" in denied.stderr
    login = pye("login", "-u", USER, "--password-stdin", host, input=PASSWORD + "\n")
    assert login.returncode == 0 and login.stdout.strip() == "Login Succeeded", login.stderr
    stored = home / "pyengine" / "auth.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert host in json.loads(stored.read_text())["auths"]
    pulled = pye("pull", ref)
    assert pulled.returncode == 0, pulled.stderr
    assert f"Status: Downloaded newer image for {ref}" in pulled.stdout
    assert pulled.stdout.splitlines()[-1] == ref
    assert pye("rmi", ref).returncode == 0
    assert pye("logout", host).stdout.strip() == f"Removing login credentials for {host}"


# ---- raw HTTP over the daemon's socket ---------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    sock: socket.socket
    rest: bytes

    def read_to_eof(self, deadline_s: float = 60) -> bytes:
        data = self.rest
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.sock.close()
        return data


def raw_request(
    sock_path: Path, method: str, path: str, headers: list[str], body: bytes = b""
) -> RawResponse:
    """One HTTP/1.1 request, read up to the end of the response head; the rest is raw."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(sock_path))
    head = [f"{method} {path} HTTP/1.1", "Host: pyengine", f"Content-Length: {len(body)}"]
    if not any(h.lower().startswith("connection:") for h in headers):
        head.append("Connection: close")
    sock.sendall(("\r\n".join(head + headers) + "\r\n\r\n").encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before the response head: {data!r}")
        data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    _, status, reason = status_line.split(" ", 2)
    fields = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    if fields.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest, sock)
    return RawResponse(int(status), reason, fields, sock, rest)


def _dechunk(data: bytes, sock: socket.socket) -> bytes:
    """The whole body of a chunked response (the short error answers only)."""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2 :]
    return body


def demultiplex(data: bytes) -> list[tuple[int, bytes]]:
    """Docker's 8-byte frame headers: [stream, 0, 0, 0, size uint32 BE] + payload."""
    frames = []
    while data:
        assert len(data) >= 8 and data[1:4] == b"\0\0\0", data[:8]
        size = int.from_bytes(data[4:8], "big")
        frames.append((data[0], data[8 : 8 + size]))
        data = data[8 + size :]
    return frames

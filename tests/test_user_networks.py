"""User-defined networks end to end through the pyengine CLI: create/ls/inspect/rm,
run --network/--ip/--network-alias, connect/disconnect of running and created containers, rename,
isolation between networks, and the embedded DNS server (127.0.0.11) answering from inside real
containers.

One pyengined (userland-proxy mode) on its own bridge, subnet and nft table, started with
``--dns 127.0.0.77``: names the embedded DNS server does not know are forwarded to a fake upstream
the test runs on that loopback address, so no query leaves the machine. Traffic goes only to
loopback and to the bridges this daemon creates.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import docker as docker_py
import pytest

from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
    require_tool,
    start_daemon,
    stop_daemon,
)
from tests.dns_helpers import FakeUpstream
from tests.test_e2e import wait_http

NAME, BIP = "pyeun0", "10.65.0.1/24"
UPSTREAM = "127.0.0.77"  # the fake upstream resolver (host loopback)
FORWARDED_NAME = "pyetest.example.test"
FORWARDED_ADDRESS = "198.18.7.7"  # answered by the fake upstream, never contacted


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(UPSTREAM, FORWARDED_ADDRESS)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def d(
    tmp_path_factory: pytest.TempPathFactory,
    nginx_archive: Path,
    busybox_archive: Path,
    upstream: FakeUpstream,
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp(NAME)
    daemon = start_daemon(tmp, NAME, BIP, True, "--dns", UPSTREAM)
    try:
        daemon.cli("load", "-i", str(nginx_archive), check=True)
        daemon.cli("load", "-i", str(busybox_archive), check=True)
        yield daemon
    finally:
        for cid in daemon.cli("ps", "-a", "-q").stdout.split():
            daemon.cli("rm", "-f", cid)
        for net in daemon.cli("network", "ls", "-q", "--filter", "type=custom").stdout.split():
            daemon.cli("network", "rm", net)
        stop_daemon(daemon)
    assert_nothing_left(daemon)


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def names(d: Daemon) -> Iterator[Callable[[str], str]]:
    """Unique pyetest- names; the containers and networks made with them go at the end."""
    made: list[str] = []

    def make(kind: str) -> str:
        name = f"pyetest-{kind}{next(_counter)}"
        made.append(name)
        return name

    yield make
    for name in reversed(made):
        d.cli("rm", "-f", name)
    for name in reversed(made):
        d.cli("network", "rm", name)


_subnets = iter(range(1, 250))


def subnet() -> IPv4Network:
    return IPv4Network(f"10.66.{next(_subnets)}.0/24")


def inspect(d: Daemon, ref: str, kind: str = "container") -> dict:
    return json.loads(d.cli("inspect", "--type", kind, ref, check=True).stdout)[0]


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]


def addresses_in(d: Daemon, container: str) -> dict[str, str]:
    """ifname -> IPv4 address/prefix inside the container's namespace."""
    key = inspect(d, container)["NetworkSettings"]["SandboxKey"]
    out = subprocess.run(
        ["nsenter", f"--net={key}", "ip", "-o", "-4", "addr", "show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if fields[1] != "lo":
            found[fields[1]] = fields[3]
    return found


def run_in(d: Daemon, network: str | None, *command: str, image: str = "busybox") -> str:
    """Output of a short-lived container's command; fails the test when it fails."""
    args = ["run", "--rm"] + (["--network", network] if network else []) + [image, *command]
    result = d.cli(*args, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


def resolves(d: Daemon, network: str, name: str) -> list[str]:
    """The IPv4 addresses busybox nslookup gets for ``name`` from a container on ``network``
    ([] for NXDOMAIN)."""
    result = d.cli("run", "--rm", "--network", network, "busybox", "nslookup", "-type=a", name)
    out = result.stdout
    assert "127.0.0.11" in out, out + result.stderr
    if "NXDOMAIN" in out:
        return []
    answers = out.split(f"Name:\t{name}", 1)
    assert len(answers) == 2, out
    return [line.split()[-1] for line in answers[1].splitlines() if line.startswith("Address")]


# ---- network objects ------------------------------------------------------------------------


def test_create_ls_inspect_rm(d: Daemon, names: Callable[[str], str]) -> None:
    name = names("net")
    net = subnet()
    gateway = str(net.network_address + 254)
    ip_range = str(IPv4Network(f"{net.network_address + 128}/25"))
    created = d.cli(
        "network",
        "create",
        "--subnet",
        str(net),
        "--gateway",
        gateway,
        "--ip-range",
        ip_range,
        "-o",
        "com.docker.network.bridge.enable_icc=false",
        "--label",
        "pyetest=yes",
        name,
        check=True,
    ).stdout.strip()
    assert len(created) == 64
    listing = d.cli("network", "ls", check=True).stdout
    assert name in listing and "bridge" in listing
    assert d.cli("network", "ls", "-q", "--filter", f"name={name}").stdout.split() == [created[:12]]
    assert d.cli("network", "ls", "-q", "--filter", "label=pyetest=yes").stdout.split() == [
        created[:12]
    ]
    shape = inspect(d, name, "network")
    assert shape["Id"] == created and shape["Name"] == name
    assert shape["Driver"] == "bridge" and shape["Scope"] == "local"
    assert shape["IPAM"]["Config"] == [
        {"Subnet": str(net), "Gateway": gateway, "IPRange": ip_range}
    ]
    assert shape["Options"] == {"com.docker.network.bridge.enable_icc": "false"}
    assert shape["Labels"] == {"pyetest": "yes"} and shape["Containers"] == {}
    assert shape["Internal"] is False and shape["EnableIPv6"] is False

    one_line_error(d.cli("network", "create", name), "already exists")
    one_line_error(d.cli("network", "create", "--subnet", str(net), names("net")), "overlaps")
    one_line_error(d.cli("network", "create", "--subnet", "10.66.0.0/33", names("net")), "subnet")
    two_v6 = ["--subnet", "fd00:66:1::/64", "--subnet", "fd00:66:2::/64"]
    one_line_error(d.cli("network", "create", "--ipv6", *two_v6, names("net")), "IPv6 subnets")
    one_line_error(d.cli("network", "create", "-d", "overlay", names("net")), "overlay")
    one_line_error(d.cli("network", "create", "-o", "pyetest.bogus=1", names("net")), "bogus")
    one_line_error(d.cli("network", "rm", "bridge"), "pre-defined")

    c = names("c")
    d.cli("run", "-d", "--name", c, "--network", name, "busybox", "sleep", "300", check=True)
    ip = inspect(d, c)["NetworkSettings"]["Networks"][name]["IPAddress"]
    assert IPv4Address(ip) in IPv4Network(ip_range), "automatic addresses come from --ip-range"
    one_line_error(d.cli("network", "rm", name), "active endpoints")
    d.cli("rm", "-f", c, check=True)
    assert d.cli("network", "rm", name, check=True).stdout.strip() == name
    assert name not in d.cli("network", "ls").stdout
    missing = d.cli("network", "inspect", name)
    assert missing.returncode == 1 and f"No such network: {name}" in missing.stderr


def test_run_with_ip_and_alias(d: Daemon, names: Callable[[str], str]) -> None:
    net_name, net = names("net"), subnet()
    d.cli("network", "create", "--subnet", str(net), net_name, check=True)
    c = names("c")
    ip = str(net.network_address + 50)
    d.cli(
        "run", "-d", "--name", c, "--network", net_name, "--ip", ip,
        "--network-alias", "pyetest-web", "busybox", "sleep", "300", check=True,
    )  # fmt: skip
    settings = inspect(d, c)["NetworkSettings"]
    endpoint = settings["Networks"][net_name]
    assert list(settings["Networks"]) == [net_name]
    assert endpoint["IPAddress"] == ip and endpoint["IPPrefixLen"] == 24
    assert endpoint["Gateway"] == str(net.network_address + 1)
    # The pyengine client speaks API 1.41, where Docker adds the short id to the aliases.
    assert endpoint["Aliases"] == ["pyetest-web", inspect(d, c)["Id"][:12]]
    assert endpoint["IPAMConfig"] == {"IPv4Address": ip}
    assert endpoint["NetworkID"] == inspect(d, net_name, "network")["Id"]
    assert settings["IPAddress"] == "", "top-level fields are the default network's only"
    assert addresses_in(d, c) == {"eth0": f"{ip}/24"}
    members = inspect(d, net_name, "network")["Containers"]
    assert [m["IPv4Address"] for m in members.values()] == [f"{ip}/24"]

    taken = d.cli("run", "-d", "--network", net_name, "--ip", ip, "busybox", "sleep", "1")
    assert taken.returncode != 0 and ip in taken.stderr
    outside = d.cli("run", "--network", net_name, "--ip", "10.99.0.5", "busybox", "true")
    one_line_error(outside, "10.99.0.5")
    default_ip = d.cli("run", "--ip", "10.65.0.99", "busybox", "true")
    one_line_error(default_ip, "user defined networks only")
    one_line_error(d.cli("run", "--network", "pyetest-nonet", "busybox", "true"), "not found")


def test_connect_and_disconnect(d: Daemon, names: Callable[[str], str]) -> None:
    net_name, net = names("net"), subnet()
    d.cli("network", "create", "--subnet", str(net), net_name, check=True)
    running = names("c")
    d.cli("run", "-d", "--name", running, "busybox", "sleep", "300", check=True)
    assert list(addresses_in(d, running)) == ["eth0"]
    ip = str(net.network_address + 77)
    d.cli("network", "connect", "--ip", ip, net_name, running, check=True)
    assert addresses_in(d, running)["eth1"] == f"{ip}/24"
    assert set(inspect(d, running)["NetworkSettings"]["Networks"]) == {"bridge", net_name}
    one_line_error(d.cli("network", "connect", net_name, running), "already exists")
    d.cli("network", "disconnect", net_name, running, check=True)
    assert list(addresses_in(d, running)) == ["eth0"]
    assert list(inspect(d, running)["NetworkSettings"]["Networks"]) == ["bridge"]
    one_line_error(d.cli("network", "disconnect", net_name, running), "not connected")

    created = names("c")
    d.cli("create", "--name", created, "busybox", "sleep", "300", check=True)
    d.cli("network", "connect", "--alias", "pyetest-later", net_name, created, check=True)
    assert set(inspect(d, created)["NetworkSettings"]["Networks"]) == {"bridge", net_name}
    d.cli("start", created, check=True)
    assert sorted(addresses_in(d, created)) == ["eth0", "eth1"]
    assert IPv4Network(addresses_in(d, created)["eth1"], strict=False) == net


def test_removed_network_fails_start_cleanly(d: Daemon, names: Callable[[str], str]) -> None:
    net_name = names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_name, check=True)
    c = names("c")
    d.cli("create", "--name", c, "--network", net_name, "busybox", "sleep", "300", check=True)
    d.cli("network", "rm", net_name, check=True)  # no endpoint yet: Docker allows it
    one_line_error(d.cli("start", c), f"network {net_name} not found")
    assert inspect(d, c)["State"]["Status"] == "created"


def test_published_port_on_user_network(d: Daemon, names: Callable[[str], str]) -> None:
    net_name = names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_name, check=True)
    port = free_port()
    d.cli(
        "run", "-d", "--name", names("c"), "--network", net_name, "-p", f"{port}:80", "nginx",
        check=True,
    )  # fmt: skip
    status, _ = wait_http(f"http://127.0.0.1:{port}/")
    assert status == 200


def test_containers_reach_their_network_only(d: Daemon, names: Callable[[str], str]) -> None:
    net_a, net_b = names("net"), names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_a, check=True)
    d.cli("network", "create", "--subnet", str(subnet()), net_b, check=True)
    web = names("c")
    d.cli("run", "-d", "--name", web, "--network", net_a, "nginx", check=True)
    ip = inspect(d, web)["NetworkSettings"]["Networks"][net_a]["IPAddress"]
    # busybox's static wget crashes in glibc's NSS; nc speaks the HTTP request as well.
    request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80"
    retry = f"for i in 1 2 3 4 5 6 7 8 9 10; do {request} && exit 0; sleep 0.3; done; exit 1"
    assert "Welcome to nginx" in run_in(d, net_a, "sh", "-c", retry)
    blocked = d.cli("run", "--rm", "--network", net_b, "busybox", "sh", "-c", request)
    assert "nginx" not in blocked.stdout, "a container on another network reached it"


# ---- embedded DNS ---------------------------------------------------------------------------


def test_resolv_conf_per_network(d: Daemon, names: Callable[[str], str]) -> None:
    net_name = names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_name, check=True)
    on_user = run_in(d, net_name, "cat", "/etc/resolv.conf")
    assert on_user.splitlines()[0] == "nameserver 127.0.0.11"
    assert "ndots:0" in on_user
    on_default = run_in(d, None, "cat", "/etc/resolv.conf")
    assert on_default.split() == ["nameserver", UPSTREAM], "the default bridge keeps --dns"


def test_names_aliases_and_scope(d: Daemon, names: Callable[[str], str]) -> None:
    net_a, net_b = names("net"), names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_a, check=True)
    d.cli("network", "create", "--subnet", str(subnet()), net_b, check=True)
    web = names("c")
    d.cli(
        "run", "-d", "--name", web, "--network", net_a, "--network-alias", "pyetest-svc",
        "busybox", "sleep", "300", check=True,
    )  # fmt: skip
    info = inspect(d, web)
    ip = info["NetworkSettings"]["Networks"][net_a]["IPAddress"]
    assert resolves(d, net_a, web) == [ip]
    assert resolves(d, net_a, "pyetest-svc") == [ip]
    assert resolves(d, net_a, info["Id"][:12]) == [ip]
    assert resolves(d, net_a, web.upper()) == [ip], "names are case-insensitive"
    assert resolves(d, net_b, web) == [], "a name leaked to another network"
    assert resolves(d, net_b, "pyetest-svc") == []
    assert resolves(d, net_a, "pyetest-nobody") == []
    # getent (glibc's resolver, from the nginx image) sees the same.
    hosts = run_in(d, net_a, "getent", "hosts", web, image="nginx")
    assert hosts.split()[0] == ip


def test_container_on_two_networks_resolves_both(d: Daemon, names: Callable[[str], str]) -> None:
    net_a, net_b = names("net"), names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_a, check=True)
    d.cli("network", "create", "--subnet", str(subnet()), net_b, check=True)
    on_a, on_b = names("c"), names("c")
    d.cli("run", "-d", "--name", on_a, "--network", net_a, "busybox", "sleep", "300", check=True)
    d.cli("run", "-d", "--name", on_b, "--network", net_b, "busybox", "sleep", "300", check=True)
    ip_a = inspect(d, on_a)["NetworkSettings"]["Networks"][net_a]["IPAddress"]
    ip_b = inspect(d, on_b)["NetworkSettings"]["Networks"][net_b]["IPAddress"]
    script = f"nslookup -type=a {on_a}; nslookup -type=a {on_b}"
    both = names("c")
    d.cli("create", "--name", both, "--network", net_a, "busybox", "sh", "-c", script, check=True)
    d.cli("network", "connect", net_b, both, check=True)
    d.cli("start", both, check=True)
    d.cli("wait", both, check=True)
    out = d.cli("logs", both, check=True).stdout
    assert ip_a in out and ip_b in out, out


def test_updates_are_visible_at_once(d: Daemon, names: Callable[[str], str]) -> None:
    net_name = names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_name, check=True)
    c = names("c")
    d.cli("run", "-d", "--name", c, "busybox", "sleep", "300", check=True)
    assert resolves(d, net_name, c) == []
    d.cli("network", "connect", "--alias", "pyetest-joined", net_name, c, check=True)
    ip = inspect(d, c)["NetworkSettings"]["Networks"][net_name]["IPAddress"]
    assert resolves(d, net_name, c) == [ip]
    assert resolves(d, net_name, "pyetest-joined") == [ip]

    renamed = names("c")
    d.cli("rename", c, renamed, check=True)
    assert resolves(d, net_name, renamed) == [ip]
    assert resolves(d, net_name, c) == []

    d.cli("network", "disconnect", net_name, renamed, check=True)
    assert resolves(d, net_name, renamed) == []

    d.cli("network", "connect", net_name, renamed, check=True)
    assert resolves(d, net_name, renamed) != []
    d.cli("stop", "-t", "1", renamed, check=True)
    assert resolves(d, net_name, renamed) == [], "a stopped container still resolves"


def test_other_names_are_forwarded(
    d: Daemon, names: Callable[[str], str], upstream: FakeUpstream
) -> None:
    net_name = names("net")
    d.cli("network", "create", "--subnet", str(subnet()), net_name, check=True)
    assert resolves(d, net_name, FORWARDED_NAME) == [FORWARDED_ADDRESS]
    assert f"{FORWARDED_NAME}." in upstream.queries


# ---- PROXY protocol toward the container (label) -----------------------------------------------

PROXY_PROTOCOL_NGINX = (
    "rm -f /etc/nginx/sites-enabled/default && "
    "printf '%s\\n' 'server {' ' listen 80 proxy_protocol;' ' access_log off;' "
    "' location / { return 200 \"client=$proxy_protocol_addr via=$remote_addr\\n\"; }' '}' "
    "> /etc/nginx/conf.d/pyetest-pp.conf && exec nginx -g 'daemon off;'"
)


@pytest.mark.parametrize(
    "label", ["pyengine.proxy-protocol=v1", "pyengine.proxy-protocol.80/tcp=v2"]
)
def test_proxy_protocol_label_tells_the_container_the_client(
    d: Daemon, names: Callable[[str], str], label: str
) -> None:
    port = free_port()
    c = names("c")
    d.cli(
        "run", "-d", "--name", c, "-l", label, "-p", f"{port}:80", "nginx",
        "sh", "-c", PROXY_PROTOCOL_NGINX, check=True,
    )  # fmt: skip
    status, body = wait_http(f"http://127.0.0.1:{port}/")
    assert status == 200
    # The proxy connects from the bridge gateway; the header carries the client's address.
    assert body.strip() == f"client=127.0.0.1 via={d.gateway}"


def test_bad_proxy_protocol_label_is_refused(d: Daemon, names: Callable[[str], str]) -> None:
    bad = d.cli("run", "-d", "-l", "pyengine.proxy-protocol=v3", "nginx")
    one_line_error(bad, "want v1, v2 or off")
    udp = d.cli("run", "-d", "-l", "pyengine.proxy-protocol.53/udp=v1", "nginx")
    one_line_error(udp, "TCP ports only")


# ---- the same through Docker's own clients ------------------------------------------------------


@pytest.fixture
def docker_env(d: Daemon, tmp_path: Path) -> dict[str, str]:
    require_tool("docker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=d.host, DOCKER_CONFIG=str(tmp_path / "docker-config"))
    return env


def docker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_docker_cli_names_and_aliases(
    d: Daemon, names: Callable[[str], str], docker_env: dict[str, str]
) -> None:
    net_name, web, renamed = names("net"), names("c"), names("c")
    assert docker(docker_env, "network", "create", net_name).returncode == 0
    started = docker(
        docker_env, "run", "-d", "--name", web, "--network", net_name,
        "--network-alias", "pyetest-dockeralias", "busybox", "sleep", "300",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    ip = inspect(d, web)["NetworkSettings"]["Networks"][net_name]["IPAddress"]

    def lookup(name: str) -> str:
        out = docker(docker_env, "run", "--rm", "--network", net_name, "busybox",
                     "nslookup", "-type=a", name)  # fmt: skip
        return out.stdout

    assert f"Address: {ip}" in lookup("pyetest-dockeralias")
    assert f"Address: {ip}" in lookup(web)
    assert docker(docker_env, "rename", web, renamed).returncode == 0
    assert f"Address: {ip}" in lookup(renamed)
    assert "NXDOMAIN" in lookup(web)
    assert docker(docker_env, "stop", "-t", "1", renamed).returncode == 0
    assert "NXDOMAIN" in lookup(renamed)


def test_docker_py_connect_with_alias_resolves(d: Daemon, names: Callable[[str], str]) -> None:
    client = docker_py.DockerClient(base_url=d.host, version="1.41")
    net_name, c = names("net"), names("c")
    network = client.networks.create(net_name, driver="bridge")
    container = client.containers.run("busybox", ["sleep", "300"], name=c, detach=True)
    network.connect(container, aliases=["pyetest-pyalias"])
    container.reload()
    ip = container.attrs["NetworkSettings"]["Networks"][net_name]["IPAddress"]
    assert resolves(d, net_name, "pyetest-pyalias") == [ip]
    network.disconnect(container)
    assert resolves(d, net_name, "pyetest-pyalias") == []
    client.close()


def test_run_with_ip6_on_an_ipv6_network(d: Daemon, names: Callable[[str], str]) -> None:
    net_name, c = names("net"), names("c")
    v4 = subnet()
    d.cli(
        "network", "create", "--ipv6", "--subnet", str(v4), "--subnet", "fd00:66:99::/64",
        net_name, check=True,
    )  # fmt: skip
    d.cli(
        "run", "-d", "--name", c, "--network", net_name, "--ip6", "fd00:66:99::99",
        "busybox", "sleep", "300", check=True,
    )  # fmt: skip
    endpoint = inspect(d, c)["NetworkSettings"]["Networks"][net_name]
    assert endpoint["GlobalIPv6Address"] == "fd00:66:99::99"
    assert endpoint["GlobalIPv6PrefixLen"] == 64
    assert endpoint["IPAMConfig"] == {"IPv6Address": "fd00:66:99::99"}
    key = inspect(d, c)["NetworkSettings"]["SandboxKey"]
    out = subprocess.run(
        ["nsenter", f"--net={key}", "ip", "-o", "-6", "addr", "show", "dev", "eth0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "fd00:66:99::99/64" in out
    outside = d.cli("run", "--network", net_name, "--ip6", "fd00:77::1", "busybox", "true")
    one_line_error(outside, "fd00:77::1")

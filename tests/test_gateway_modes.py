"""Docker 28's bridge gateway modes (``com.docker.network.bridge.gateway_mode_ipv4``/``_ipv6``)
and IPv6 on the default bridge (pyengined ``--ipv6 --fixed-cidr-v6``), with real packets.

A "LAN" namespace stands in for another host that routes the containers' subnets through this
host. For each mode, on both firewall backends: is a container's unpublished port reachable by
routing, is its published one, is its outgoing traffic masqueraded; ``isolated`` keeps the host
and its containers apart. The default bridge of the same controller has an IPv6 prefix: its
container gets an address of it and reaches the LAN over IPv6 through NAT66. One pyengined end
to end through the docker CLI (API 1.41): the options' checks and inspect, and ``--ipv6``.

Names: bridges ``pyeg0``..``pyeg5``, namespaces ``pyeg-*``, veth ``pyegx0``, tables ``pyeg`` and
``pyeg5``; IPv4 in 10.188.0.0/16, IPv6 in fd47:188::/48. Traffic goes only to addresses of the
namespaces and veths these tests create.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from common.ports import PortBinding
from netd.controller import NetdConfig, NetworkController
from netd.errors import NetdError
from netd.network import Network
from tests.conftest import (
    Daemon,
    assert_nothing_left,
    require_root,
    require_tool,
    start_daemon,
    stop_daemon,
)
from tests.netns_helpers import (
    IO_TIMEOUT,
    ExternalHost,
    WhoamiServer,
    create_external_host,
    delete_external_host,
    links_with_prefix,
    netns_socket,
    netns_with_prefix,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
    tcp_whoami,
)

PREFIX = "pyeg"
TABLE = "pyeg"
LAN_HOST, LAN_EXT = "10.188.255.1", "10.188.255.2"
LAN_HOST6, LAN_EXT6 = "fd47:188:ff::1", "fd47:188:ff::2"
DEFAULT6 = "fd47:188::/64"
BLOCKED = 1.5  # seconds a connection the firewall drops is given before it counts as dropped
PUBLISHED, UNPUBLISHED = 8080, 8081  # container ports

# mode -> (subnet, bridge); the nat network is also IPv6, routed in IPv6.
NETWORKS = {
    "nat": ("10.188.1.0/24", "pyeg1"),
    "nat-unprotected": ("10.188.2.0/24", "pyeg2"),
    "routed": ("10.188.3.0/24", "pyeg3"),
    "isolated": ("10.188.4.0/24", "pyeg4"),
}
NAT_SUBNET6 = "fd47:188:1::/64"


def _cleanup(backend: str) -> None:
    for name in netns_with_prefix(f"{PREFIX}-"):
        remove_netns(name)
    for link in links_with_prefix(PREFIX):
        remove_link(link)
    remove_firewall(backend, TABLE)
    if backend == "iptables":
        prefix = f"{TABLE.upper()}-"
        for table in ("raw", "nat", "filter"):
            chains = []
            for line in run("ip6tables-save", "-t", table).splitlines():
                if line.startswith(f":{prefix}"):
                    chains.append(line[1:].split()[0])
                elif line.startswith("-A ") and f"-j {prefix}" in line:
                    builtin, _, spec = line[3:].partition(" ")
                    if not builtin.startswith(prefix):
                        run("ip6tables", "-t", table, "-D", builtin, *spec.split())
            for chain in chains:
                run("ip6tables", "-t", table, "-F", chain)
            for chain in chains:
                run("ip6tables", "-t", table, "-X", chain)


@dataclass
class Box:
    """A container stand-in: its endpoint's addresses and two whoami servers (both families)."""

    cid: str
    netns: str
    ip: str
    ipv6: str
    gateway: str
    host_port: int  # the host port PUBLISHED is published on (0.0.0.0)
    servers: list[WhoamiServer]


@dataclass
class Lab:
    ctrl: NetworkController
    backend: str
    lan: ExternalHost
    boxes: dict[str, Box]  # by mode, and "default"


def _server(netns: str, family: int, port: int) -> WhoamiServer:
    sock = netns_socket(netns, family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return WhoamiServer(sock, "tcp", sock.getsockname()[1])


def whoami(netns: str | None, ip: str, port: int, timeout: float = IO_TIMEOUT) -> str:
    return tcp_whoami(netns, ip, port, timeout)


def reachable(netns: str | None, ip: str, port: int) -> bool:
    try:
        whoami(netns, ip, port, timeout=BLOCKED)
    except OSError:
        return False
    return True


def _box(ctrl: NetworkController, name: str, network: Network | str, publish: bool) -> Box:
    cid = hashlib.sha256(name.encode()).hexdigest()
    ep = ctrl.connect(cid, network)
    host_port = 0
    if publish:
        ports = ctrl.publish(cid, ep, [PortBinding(container_port=PUBLISHED, proto="tcp")])
        host_port = next((p.host_port for p in ports if p.host_port), 0)
    servers = []
    families = [socket.AF_INET] + ([socket.AF_INET6] if ep.ipv6 else [])
    for family in families:
        for port in (PUBLISHED, UNPUBLISHED):
            servers.append(_server(ep.netns_name, family, port))
    return Box(cid, ep.netns_name, ep.ip, ep.ipv6, ep.gateway, host_port, servers)


# Both firewall backends, each in both proxy modes: the gateway modes' rules must not depend on
# whether a published port is also served by the userland proxy.
@pytest.fixture(
    scope="module",
    params=[
        ("nftables", False),
        ("nftables", True),
        ("iptables", False),
        ("iptables", True),
    ],
    ids=["nftables-dnat", "nftables-proxy", "iptables-dnat", "iptables-proxy"],
)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    backend, userland_proxy = request.param
    if backend == "iptables":
        for tool in ("iptables-restore", "ip6tables-restore", "ip6tables-save"):
            require_tool(tool)
    _cleanup(backend)
    cfg = NetdConfig(
        tmp_path_factory.mktemp("gwmodes"),
        bridge=f"{PREFIX}0",
        bridge_cidr="10.188.0.1/24",
        table=TABLE,
        userland_proxy=userland_proxy,
        firewall_backend=backend,
        netns_prefix=f"{PREFIX}-",
        ipv6=True,
        fixed_cidr_v6=DEFAULT6,
    )
    ctrl = NetworkController(cfg)
    lan: ExternalHost | None = None
    boxes: dict[str, Box] = {}
    try:
        ctrl.setup()
        lan = create_external_host(
            f"{PREFIX}-lan", f"{PREFIX}x0", f"{LAN_HOST}/30", f"{LAN_EXT}/30"
        )
        run("ip", "addr", "add", f"{LAN_HOST6}/64", "dev", lan.host_ifname, "nodad")
        run("ip", "-n", lan.netns, "addr", "add", f"{LAN_EXT6}/64", "dev", lan.ifname, "nodad")
        # The LAN host routes the containers' subnets through this host.
        run("ip", "-n", lan.netns, "route", "add", "10.188.0.0/17", "via", LAN_HOST)
        run("ip", "-n", lan.netns, "-6", "route", "add", NAT_SUBNET6, "via", LAN_HOST6)
        for mode, (subnet, bridge) in NETWORKS.items():
            options = {
                "com.docker.network.bridge.name": bridge,
                "com.docker.network.bridge.gateway_mode_ipv4": mode,
            }
            extra: dict[str, object] = {}
            if mode == "nat":
                options["com.docker.network.bridge.gateway_mode_ipv6"] = "routed"
                extra = {"enable_ipv6": True, "subnet6": NAT_SUBNET6}
            net = ctrl.create_network(
                f"pyeg-{mode}",
                subnet=subnet,
                internal=mode == "isolated",
                options=options,
                **extra,  # type: ignore[arg-type]
            )
            boxes[mode] = _box(ctrl, mode, net, publish=mode != "isolated")
        boxes["default"] = _box(ctrl, "default", "bridge", publish=False)
        yield Lab(ctrl, backend, lan, boxes)
    finally:
        for box in boxes.values():
            for server in box.servers:
                server.stop()
        try:
            ctrl.teardown(remove_networks=True)
        finally:
            if lan is not None:
                delete_external_host(lan)
            _cleanup(backend)


# mode -> (unpublished port reachable by routing, published port reachable by routing,
#          outgoing source masqueraded)
EXPECTED = {
    "nat": (False, False, True),
    "nat-unprotected": (True, True, True),
    "routed": (False, True, False),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_ipv4_gateway_mode_with_real_packets(lab: Lab, mode: str) -> None:
    box = lab.boxes[mode]
    unpublished, published, masqueraded = EXPECTED[mode]
    ext = lab.lan.netns
    assert reachable(ext, box.ip, UNPUBLISHED) is unpublished
    assert reachable(ext, box.ip, PUBLISHED) is published
    if mode == "routed":
        # Docker 28: a routed network's mapping uses no host port (docs: "Gateway modes").
        assert box.host_port == 0
        assert [(p.host_ip, p.host_port) for p in lab.ctrl.published(box.cid)] == [("0.0.0.0", 0)]
    else:
        assert whoami(ext, LAN_HOST, box.host_port) == LAN_EXT
    with _server(ext, socket.AF_INET, 9000) as server:
        seen = whoami(box.netns, LAN_EXT, server.port)
    assert seen == (LAN_HOST if masqueraded else box.ip)


def test_ipv6_routed_while_ipv4_stays_nat(lab: Lab) -> None:
    """The nat network is routed in IPv6: its IPv6 published port is open to routing, the
    unpublished one is not, and its IPv6 traffic leaves with the container's own address."""
    box = lab.boxes["nat"]
    assert IPv6Address(box.ipv6) in IPv6Network(NAT_SUBNET6)
    ext = lab.lan.netns
    assert whoami(ext, box.ipv6, PUBLISHED) == LAN_EXT6
    assert not reachable(ext, box.ipv6, UNPUBLISHED)
    with _server(ext, socket.AF_INET6, 9000) as server:
        assert whoami(box.netns, LAN_EXT6, server.port) == box.ipv6


def test_isolated_network_reaches_neither_host_nor_lan(lab: Lab) -> None:
    box = lab.boxes["isolated"]
    # Docker 28: no address on an isolated network's bridge.
    addresses = run("ip", "-o", "-4", "addr", "show", "dev", NETWORKS["isolated"][1])
    assert addresses.strip() == ""
    nat = run("ip", "-o", "-4", "addr", "show", "dev", NETWORKS["nat"][1])
    assert lab.boxes["nat"].gateway in nat  # the other modes keep theirs
    assert not reachable(None, box.ip, UNPUBLISHED)  # the host to the container
    with _server(None, socket.AF_INET, 0) as host_server:  # the container to the host
        assert not reachable(box.netns, box.gateway, host_server.port)
    assert not reachable(lab.lan.netns, box.ip, UNPUBLISHED)
    with _server(lab.lan.netns, socket.AF_INET, 9000):
        assert not reachable(box.netns, LAN_EXT, 9000)


def test_isolated_needs_internal_and_bad_modes_are_refused(lab: Lab) -> None:
    isolated = {"com.docker.network.bridge.gateway_mode_ipv6": "isolated"}
    with pytest.raises(NetdError, match="'isolated' can only be used for an internal network"):
        lab.ctrl.create_network("pyeg-bad", subnet="10.188.9.0/24", options=isolated)
    bad = {"com.docker.network.bridge.gateway_mode_ipv4": "bogus"}
    with pytest.raises(NetdError, match=r'\(invalid gateway mode "bogus"\)'):
        lab.ctrl.create_network("pyeg-bad", subnet="10.188.9.0/24", options=bad)


def test_routed_port_closes_with_its_last_mapping(lab: Lab) -> None:
    """Unpublishing takes the routed target out of the firewall; publishing opens it again."""
    box = lab.boxes["routed"]
    ep = lab.ctrl.container_endpoints(box.cid)[0]
    lab.ctrl.unpublish(box.cid)
    try:
        assert not reachable(lab.lan.netns, box.ip, PUBLISHED)
    finally:
        ports = lab.ctrl.publish(box.cid, ep, [PortBinding(container_port=PUBLISHED, proto="tcp")])
        box.host_port = next((p.host_port for p in ports if p.host_port), 0)
    assert reachable(lab.lan.netns, box.ip, PUBLISHED)


def test_default_bridge_ipv6_and_nat66(lab: Lab) -> None:
    box = lab.boxes["default"]
    assert IPv6Address(box.ipv6) in IPv6Network(DEFAULT6)
    routes = run("ip", "-n", box.netns, "-6", "route", "show", "default")
    assert "via fd47:188::1" in routes, routes
    with _server(lab.lan.netns, socket.AF_INET6, 9000) as server:
        assert whoami(box.netns, LAN_EXT6, server.port) == LAN_HOST6
    net = lab.ctrl.network("bridge")
    assert (net.enable_ipv6, net.subnet6, net.gateway6) == (True, DEFAULT6, "fd47:188::1")


# -- end to end through pyengined and the docker CLI --------------------------------------------


@pytest.fixture(scope="module")
def gwdaemon(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Daemon]:
    require_tool("docker")
    tmp = tmp_path_factory.mktemp("pyeg5")
    d = start_daemon(
        tmp, "pyeg5", "10.188.5.1/24", False, "--ipv6", "--fixed-cidr-v6", "fd47:188:5::/64"
    )
    lan: ExternalHost | None = None
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        lan = create_external_host(
            f"{PREFIX}-lan5", f"{PREFIX}x5", "10.188.254.1/30", "10.188.254.2/30"
        )
        run("ip", "addr", "add", "fd47:188:fe::1/64", "dev", lan.host_ifname, "nodad")
        run("ip", "-n", lan.netns, "addr", "add", "fd47:188:fe::2/64", "dev", lan.ifname, "nodad")
        yield d
    finally:
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        for net in d.cli("network", "ls", "-q").stdout.split():
            d.cli("network", "rm", net)
        stop_daemon(d)
        if lan is not None:
            delete_external_host(lan)
    assert_nothing_left(d)


def docker(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=d.host, DOCKER_API_VERSION="1.41")
    return subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_docker_cli_gateway_mode_options(gwdaemon: Daemon) -> None:
    d = gwdaemon
    opt4 = "com.docker.network.bridge.gateway_mode_ipv4"
    bad = docker(d, "network", "create", "-o", f"{opt4}=bogus", "pyeg-bad")
    assert bad.returncode != 0
    assert f'failed to parse {opt4} value: bogus (invalid gateway mode "bogus")' in bad.stderr
    lonely = docker(d, "network", "create", "-o", f"{opt4}=isolated", "pyeg-bad")
    assert lonely.returncode != 0
    assert "can only be used for an internal network" in lonely.stderr
    assert "pyeg-bad" not in docker(d, "network", "ls").stdout
    made = docker(
        d, "network", "create", "--subnet", "10.188.6.0/24",
        "-o", "com.docker.network.bridge.name=pyeg6", "-o", f"{opt4}=routed", "pyeg-routed",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    try:
        net = json.loads(docker(d, "network", "inspect", "pyeg-routed").stdout)[0]
        assert net["Options"][opt4] == "routed"
        run_ = docker(
            d, "run", "-d", "--name", "pyeg-routed-c", "--network", "pyeg-routed",
            "-p", "18080:8080", "busybox", "sleep", "60",
        )  # fmt: skip
        assert run_.returncode == 0, run_.stderr
        ports = docker(d, "inspect", "-f", "{{json .NetworkSettings.Ports}}", "pyeg-routed-c")
        # The host port is not used in routed mode: Docker shows it empty.
        assert json.loads(ports.stdout) == {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": ""}]}
        assert "18080" not in run("nft", "list", "table", "inet", "pyeg5")
    finally:
        docker(d, "rm", "-f", "pyeg-routed-c")
        docker(d, "network", "rm", "pyeg-routed")


def test_status_of_an_invalid_mode_is_400(gwdaemon: Daemon) -> None:
    class Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(IO_TIMEOUT)
            self.sock.connect(gwdaemon.host.removeprefix("unix://"))

    for options, internal in (
        ({"com.docker.network.bridge.gateway_mode_ipv6": "routd"}, False),
        ({"com.docker.network.bridge.gateway_mode_ipv4": "isolated"}, False),
    ):
        conn = Unix("localhost")
        body = json.dumps({"Name": "pyeg-bad", "Options": options, "Internal": internal})
        conn.request("POST", "/v1.41/networks/create", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 400, response.read()
        assert json.loads(response.read())["message"]
        conn.close()


def test_default_bridge_ipv6_through_docker(gwdaemon: Daemon) -> None:
    d = gwdaemon
    net = json.loads(docker(d, "network", "inspect", "bridge").stdout)[0]
    assert net["EnableIPv6"] is True
    assert {"Subnet": "fd47:188:5::/64", "Gateway": "fd47:188:5::1"} in net["IPAM"]["Config"]
    with _server(f"{PREFIX}-lan5", socket.AF_INET6, 9000):
        out = docker(
            d, "run", "--rm", "busybox", "sh", "-c",
            "ip -6 addr show dev eth0 scope global; ip -6 route; nc -w 3 fd47:188:fe::2 9000",
        )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "inet6 fd47:188:5::" in out.stdout, out.stdout
    assert "default via fd47:188:5::1" in out.stdout, out.stdout
    # NAT66: the peer sees the host's address on its link, not the container's.
    assert out.stdout.strip().splitlines()[-1] == "fd47:188:fe::1", out.stdout

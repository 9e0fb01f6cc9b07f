"""User-defined networks in netd: the network records, IPAM, endpoints on several networks, and
isolation proved with crafted frames (scapy) on both firewall backends and in both proxy modes.

Kernel objects: default bridge ``pyenet0`` (10.53.0.1/24), user-network bridges ``pyebr-<id9>``
or ``pyenet...`` (named by option), subnets from the test pool 10.54.0.0/22 or given in
10.55.0.0/16, nftables table ``inet pyenet`` or iptables chains ``PYENET-*``, namespaces
``pyenet-<id>``, a bridge ``pyenet-dum`` (a foreign host route) and an "external host" namespace
``pyenet-ext`` at 198.18.9.2 behind 198.18.9.1 (``pyenet-x0``). Frames are only written into the
test's own namespaces and veths.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from common.ports import parse_publish
from netd.controller import (
    Conflict,
    Endpoint,
    Forbidden,
    NetdConfig,
    NetdError,
    Network,
    NetworkController,
    NotFound,
)
from netd.ipam import Ipam
from netd.naming import host_veth_name, netns_name
from netd.network import parse_options
from netd.state import NetdState
from netd.subnetpool import HostRoute, check_no_route_overlap, pick_subnet
from tests.conftest import require_root, require_tool
from tests.netns_helpers import (
    ExternalHost,
    FrameCapture,
    bridge_ports,
    create_external_host,
    delete_external_host,
    firewall_installed,
    free_port_block,
    kernel_mappings,
    link_exists,
    link_mac,
    netns_exists,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
    send_frames,
    start_whoami_server,
    tcp_whoami,
    udp_whoami,
)

BRIDGE = "pyenet0"
TABLE = "pyenet"
GATEWAY = "10.53.0.1"
NETNS_PREFIX = "pyenet-"
POOL = (("10.54.0.0/22", 24),)  # four /24s: 10.54.0.0 .. 10.54.3.0
DUMMY = "pyenet-dum"
EXT = ("pyenet-ext", "pyenet-x0", "198.18.9.1/30", "198.18.9.2/30")

BACKENDS = ("nftables", "iptables")
NETS = [(backend, proxy) for backend in BACKENDS for proxy in (True, False)]
WINDOW = 1.5  # seconds a probe waits for frames that must not arrive (a loaded 2-core host)
ANSWER_TIMEOUT = 10.0  # seconds a positive control may take


def net_id(param: tuple[str, bool]) -> str:
    backend, proxy = param
    return f"{backend}-{'proxy' if proxy else 'dnat'}"


# -- pure logic (no privileges) -----------------------------------------------------------------


def test_options_are_parsed_and_unknown_ones_refused() -> None:
    opts = parse_options(
        {
            "com.docker.network.bridge.name": "pyex0",
            "com.docker.network.bridge.enable_icc": "false",
            "com.docker.network.bridge.enable_ip_masquerade": "0",
            "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
            "com.docker.network.driver.mtu": "1400",
        }
    )
    assert (opts.bridge_name, opts.enable_icc, opts.masquerade) == ("pyex0", False, False)
    assert (opts.host_binding_ipv4, opts.mtu) == ("127.0.0.1", 1400)
    assert parse_options(None).enable_icc is True
    for options, message in [
        ({"com.docker.network.bridge.enable_icc": "nope"}, "want true or false"),
        ({"com.docker.network.driver.mtu": "12"}, "want 68-65535"),
        ({"com.docker.network.bridge.host_binding_ipv4": "::1"}, "want an IPv4 address"),
        ({"com.docker.network.bridge.gateway_mode_ipv4": "route"}, "invalid gateway mode"),
        ({"com.docker.network.bridge.trusted_host_interfaces": "x"}, "unsupported network option"),
    ]:
        with pytest.raises(NetdError, match=message) as info:
            parse_options(options)
        assert "\n" not in str(info.value)


def test_ipam_range_preferred_addresses_and_round_robin() -> None:
    ipam = Ipam(IPv4Network("10.9.0.0/24"), IPv4Address("10.9.0.254"), IPv4Network("10.9.0.128/30"))
    assert [str(ipam.allocate(f"c{i}")) for i in range(4)] == [
        "10.9.0.128",
        "10.9.0.129",
        "10.9.0.130",
        "10.9.0.131",
    ]
    with pytest.raises(NetdError, match="no free address left in 10.9.0.128/30"):
        ipam.allocate("c4")
    ipam.release("10.9.0.129")
    assert str(ipam.allocate("c5")) == "10.9.0.129"
    # A requested address may be outside the range, never outside the subnet or reserved.
    assert str(ipam.allocate("c6", "10.9.0.7")) == "10.9.0.7"
    with pytest.raises(Conflict, match="10.9.0.7 is already in use"):
        ipam.allocate("c7", "10.9.0.7")
    for bad, message in [
        ("10.9.1.7", "not in subnet 10.9.0.0/24"),
        ("10.9.0.254", "reserved"),
        ("10.9.0.255", "reserved"),
        ("10.9.0.0", "reserved"),
        ("nope", 'invalid IPv4 address "nope"'),
    ]:
        with pytest.raises(NetdError, match=message):
            ipam.allocate("c8", bad)


def test_pick_subnet_skips_networks_and_foreign_routes() -> None:
    pools = (("10.9.0.0/22", 24), ("10.10.0.0/23", 25))
    routes = [
        HostRoute(IPv4Network("10.9.0.128/25"), "eth9"),  # foreign: blocks 10.9.0.0/24
        HostRoute(IPv4Network("10.9.1.0/24"), "pyex0"),  # via one of our bridges: ignored
    ]
    taken = [IPv4Network("10.9.1.0/24"), IPv4Network("10.9.2.0/23")]
    assert pick_subnet(pools, taken, routes, {"pyex0"}) == IPv4Network("10.10.0.0/25")
    taken.append(IPv4Network("10.10.0.0/23"))
    with pytest.raises(Conflict, match="fully subnetted"):
        pick_subnet(pools, taken, routes, {"pyex0"})
    with pytest.raises(Conflict, match="overlaps the host route 10.9.0.128/25 dev eth9"):
        check_no_route_overlap(IPv4Network("10.9.0.0/16"), routes, {"pyex0"})
    check_no_route_overlap(IPv4Network("10.9.1.0/24"), routes, {"pyex0"})


# -- fixtures -----------------------------------------------------------------------------------


@dataclass
class Nets:
    """A controller with the test's default bridge, plus what the test created through it."""

    ctrl: NetworkController
    cfg: NetdConfig
    container_ids: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.cfg.firewall_backend

    @property
    def proxy(self) -> bool:
        return self.cfg.userland_proxy

    def network(self, name: str, **kwargs: object) -> Network:
        net = self.ctrl.create_network(name, **kwargs)  # type: ignore[arg-type]
        self.bridges.append(net.bridge)
        return net

    def container(self, network: str, **kwargs: object) -> tuple[str, Endpoint]:
        cid = secrets.token_hex(32)
        self.container_ids.append(cid)
        return cid, self.ctrl.connect(cid, network, **kwargs)  # type: ignore[arg-type]


def _config(data_root: Path, backend: str, proxy: bool) -> NetdConfig:
    return NetdConfig(
        data_root=data_root,
        bridge=BRIDGE,
        bridge_cidr=f"{GATEWAY}/24",
        table=TABLE,
        userland_proxy=proxy,
        firewall_backend=backend,
        netns_prefix=NETNS_PREFIX,
        address_pools=POOL,
    )


def _privileged() -> None:
    require_root()
    for tool in ("ip", "nft", "iptables-restore", "iptables-save"):
        require_tool(tool)


@pytest.fixture(params=NETS, ids=net_id)
def nets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nets]:
    _privileged()
    backend, proxy = request.param
    cfg = _config(tmp_path, backend, proxy)
    harness = Nets(NetworkController(cfg), cfg)
    try:
        harness.ctrl.setup()
        yield harness
    finally:
        try:
            harness.ctrl.teardown(remove_networks=True)
        finally:
            # Whatever teardown missed (it is under test too): only objects this test made.
            for cid in harness.container_ids:
                for index in range(4):
                    remove_link(host_veth_name(cid, index))
                remove_netns(netns_name(NETNS_PREFIX, cid))
            for name in BACKENDS:
                remove_firewall(name, TABLE)
            for name in [*harness.bridges, BRIDGE]:
                remove_link(name)


one_mode = pytest.mark.parametrize("nets", [("nftables", True)], indirect=True, ids=net_id)
dnat_only = pytest.mark.parametrize(
    "nets", [n for n in NETS if not n[1]], indirect=True, ids=net_id
)


@pytest.fixture
def ext() -> Iterator[ExternalHost]:
    _privileged()
    host = create_external_host(*EXT)
    try:
        yield host
    finally:
        delete_external_host(host)


@pytest.fixture
def host_route() -> Iterator[IPv4Network]:
    """A foreign host route: 10.54.0.0/24 on a link of its own (the pool's first subnet); a
    bridge, as this kernel has no dummy driver."""
    _privileged()
    remove_link(DUMMY)
    with IPRoute() as ipr:
        ipr.link("add", ifname=DUMMY, kind="bridge")
        index = ipr.link_lookup(ifname=DUMMY)[0]
        ipr.addr("add", index=index, address="10.54.0.1", prefixlen=24)
        ipr.link("set", index=index, state="up")
    try:
        yield IPv4Network("10.54.0.0/24")
    finally:
        remove_link(DUMMY)


# -- networks ---------------------------------------------------------------------------------


def _bridge_addresses(name: str) -> list[str]:
    link = json.loads(run("ip", "-j", "addr", "show", "dev", name))[0]
    return [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"]


@one_mode
def test_default_network_is_listed_and_protected(nets: Nets) -> None:
    [default] = nets.ctrl.networks()
    seed = f"pyengine default network {BRIDGE} {GATEWAY}/24"
    assert default.id == hashlib.sha256(seed.encode()).hexdigest()
    assert (default.name, default.bridge, default.subnet, default.gateway) == (
        "bridge",
        BRIDGE,
        "10.53.0.0/24",
        GATEWAY,
    )
    assert default.default and default.driver == "bridge" and not default.internal
    assert nets.ctrl.network("bridge") == default == nets.ctrl.network(default.id[:5])
    with pytest.raises(Forbidden, match="bridge is a pre-defined network and cannot be removed"):
        nets.ctrl.remove_network("bridge")
    with pytest.raises(NotFound, match="network nope not found"):
        nets.ctrl.network("nope")
    for name in ("bridge", "host", "none"):
        with pytest.raises(Conflict, match=f"network with name {name} already exists"):
            nets.ctrl.create_network(name)


@one_mode
def test_create_inspect_and_remove_a_network(nets: Nets) -> None:
    net = nets.network("pyt-a", labels={"team": "net"})
    assert len(net.id) == 64 and all(c in "0123456789abcdef" for c in net.id)
    assert net.bridge == f"pyebr-{net.id[:9]}"
    assert (net.subnet, net.gateway) == ("10.54.0.0/24", "10.54.0.1")
    assert net.labels == {"team": "net"} and not net.configured_subnet
    assert _bridge_addresses(net.bridge) == ["10.54.0.1/24"]
    assert "UP" in json.loads(run("ip", "-j", "link", "show", "dev", net.bridge))[0]["flags"]
    assert [n.name for n in nets.ctrl.networks()] == ["bridge", "pyt-a"]
    assert nets.ctrl.network(net.id) == nets.ctrl.network("pyt-a") == net
    assert nets.ctrl.network(net.id[:8]) == net
    # Persisted: a restarted daemon knows the network, and setup() keeps its bridge.
    restarted = NetworkController(nets.cfg)
    assert restarted.networks()[1] == net

    with pytest.raises(Conflict, match="network with name pyt-a already exists"):
        nets.ctrl.create_network("pyt-a")
    with pytest.raises(NetdError, match='invalid network name "-x"'):
        nets.ctrl.create_network("-x")
    with pytest.raises(NetdError, match="needs IPv6 enabled"):
        nets.ctrl.create_network("pyt-v6", subnet6="fd00:51::/64")
    with pytest.raises(Conflict, match=f"bridge {BRIDGE} is already used by network"):
        nets.ctrl.create_network("pyt-b", options={"com.docker.network.bridge.name": BRIDGE})
    # Nothing of the refused requests is left.
    assert [n.name for n in nets.ctrl.networks()] == ["bridge", "pyt-a"]

    nets.ctrl.remove_network(net.id[:12])
    assert not link_exists(net.bridge)
    assert [n.name for n in nets.ctrl.networks()] == ["bridge"]
    with pytest.raises(NotFound):
        nets.ctrl.remove_network("pyt-a")
    assert NetworkController(nets.cfg).networks() == nets.ctrl.networks()


@one_mode
def test_automatic_subnets_avoid_networks_and_host_routes(
    nets: Nets, host_route: IPv4Network
) -> None:
    # 10.54.0.0/24 is a foreign host route: the pool's first free /24 is the next.
    a = nets.network("pyt-a")
    assert a.subnet == "10.54.1.0/24"
    b = nets.network("pyt-b", subnet="10.54.2.0/24")
    assert b.configured_subnet
    c = nets.network("pyt-c")
    assert c.subnet == "10.54.3.0/24"
    with pytest.raises(Conflict, match="fully subnetted") as info:
        nets.ctrl.create_network("pyt-d")
    assert "\n" not in str(info.value)
    for subnet, error, message in [
        ("10.54.1.128/25", Conflict, 'overlaps network "pyt-a" \\(10.54.1.0/24\\)'),
        ("10.53.0.0/16", Conflict, 'overlaps network "bridge" \\(10.53.0.0/24\\)'),
        ("10.54.0.0/25", Conflict, f"overlaps the host route {host_route} dev {DUMMY}"),
        ("10.55.0.5/24", NetdError, "it should be 10.55.0.0/24"),
        ("10.55.0.0/31", NetdError, "too small"),
        ("10.55.0.0/33", NetdError, 'invalid subnet "10.55.0.0/33"'),
    ]:
        with pytest.raises(error, match=message):
            nets.ctrl.create_network("pyt-x", subnet=subnet)
    nets.ctrl.remove_network("pyt-a")
    assert nets.network("pyt-e").subnet == "10.54.1.0/24"  # free again


@one_mode
def test_explicit_subnet_gateway_range_and_addresses(nets: Nets) -> None:
    net = nets.network(
        "pyt-r", subnet="10.55.0.0/24", gateway="10.55.0.254", ip_range="10.55.0.128/30"
    )
    assert (net.gateway, net.ip_range) == ("10.55.0.254", "10.55.0.128/30")
    assert _bridge_addresses(net.bridge) == ["10.55.0.254/24"]
    _c1, ep1 = nets.container("pyt-r")
    assert (ep1.ip, ep1.gateway, ep1.prefixlen) == ("10.55.0.128", "10.55.0.254", 24)
    cid2, ep2 = nets.container("pyt-r", ip="10.55.0.10")  # outside the range, inside the subnet
    assert ep2.ip == "10.55.0.10"
    for ip, error, message in [
        ("10.55.0.10", Conflict, "10.55.0.10 is already in use"),
        ("10.56.0.10", NetdError, "not in subnet 10.55.0.0/24"),
        ("10.55.0.254", NetdError, "reserved"),
    ]:
        with pytest.raises(error, match=message):
            nets.container("pyt-r", ip=ip)
    auto = nets.network("pyt-auto")
    with pytest.raises(NetdError, match="only when connecting to networks with user configured"):
        nets.container(auto.name, ip="10.54.0.9")
    with pytest.raises(NetdError, match="supported on user defined networks only"):
        nets.container("bridge", ip="10.53.0.9")
    with pytest.raises(Conflict, match="already connected to network pyt-r"):
        nets.ctrl.connect(cid2, "pyt-r")
    for kwargs, message in [
        ({"subnet": "10.55.1.0/24", "gateway": "10.55.2.1"}, "not a host address of subnet"),
        ({"subnet": "10.55.1.0/24", "ip_range": "10.55.2.0/28"}, "not inside subnet"),
        ({"gateway": "10.55.1.1"}, "needs a subnet"),
    ]:
        with pytest.raises(NetdError, match=message):
            nets.ctrl.create_network("pyt-bad", **kwargs)  # type: ignore[arg-type]
    # Failed connections released their addresses and left no namespace behind.
    state = json.loads((nets.cfg.data_root / "network" / "endpoints.json").read_text())
    assert sorted(state["networks"][net.id]["ipam"]["allocations"]) == sorted([ep1.ip, ep2.ip])
    assert len(state["sandboxes"]) == 2


# -- endpoints on several networks ----------------------------------------------------------------


def _inside(ep: Endpoint) -> dict[str, list[str]]:
    links = json.loads(run("ip", "-n", ep.netns_name, "-j", "addr", "show"))
    return {
        link["ifname"]: [
            f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"
        ]
        for link in links
    }


def _default_routes(netns: str) -> list[tuple[str, str]]:
    routes = json.loads(run("ip", "-n", netns, "-j", "route", "show", "default"))
    return [(r["gateway"], r["dev"]) for r in routes]


@one_mode
def test_second_network_adds_eth1_and_routes_follow(nets: Nets) -> None:
    a = nets.network("pyt-a")
    b = nets.network("pyt-b", subnet="10.55.3.0/24")
    cid, on_a = nets.container("pyt-a", aliases=["web", "web.local"])
    on_b = nets.ctrl.connect(cid, "pyt-b")
    assert (on_a.ifname, on_b.ifname) == ("eth0", "eth1")
    assert on_a.netns_name == on_b.netns_name == f"{NETNS_PREFIX}{cid[:12]}"
    assert on_a.host_veth == f"pye{cid[:10]}" and on_b.host_veth == host_veth_name(cid, 1)
    assert on_a.aliases == ["web", "web.local"] and len(on_a.id) == 64
    assert bridge_ports(a.bridge) == [on_a.host_veth]
    assert bridge_ports(b.bridge) == [on_b.host_veth]
    assert _inside(on_a) == {
        "lo": ["127.0.0.1/8"],
        "eth0": [f"{on_a.ip}/24"],
        "eth1": [f"{on_b.ip}/24"],
    }
    assert _default_routes(on_a.netns_name) == [(a.gateway, "eth0")]
    assert nets.ctrl.container_endpoints(cid) == [on_a, on_b]
    assert nets.ctrl.endpoints() == {cid: on_a}
    assert nets.ctrl.network_endpoints("pyt-b") == [on_b]

    # Both addresses answer, each on its own network.
    _peer_a, peer_on_a = nets.container("pyt-a")
    _peer_b, peer_on_b = nets.container("pyt-b")
    with start_whoami_server(on_a.netns_name, "tcp", port=7000):
        assert tcp_whoami(peer_on_a.netns_name, on_a.ip, 7000) == peer_on_a.ip
        assert tcp_whoami(peer_on_b.netns_name, on_b.ip, 7000) == peer_on_b.ip

    with pytest.raises(Conflict, match="network pyt-b has active endpoints"):
        nets.ctrl.remove_network("pyt-b")
    nets.ctrl.disconnect(cid, "pyt-a")
    assert not link_exists(on_a.host_veth)
    assert set(_inside(on_b)) == {"lo", "eth1"}
    assert _default_routes(on_b.netns_name) == [(b.gateway, "eth1")]  # moved to eth1
    with pytest.raises(NotFound, match=f"container {cid[:12]} is not connected to network pyt-a"):
        nets.ctrl.disconnect(cid, "pyt-a")
    again = nets.ctrl.connect(cid, a.id)
    assert again.ifname == "eth0"  # the lowest free index
    assert _default_routes(on_b.netns_name) == [(a.gateway, "eth0")]

    nets.ctrl.delete_endpoint(cid)
    assert not netns_exists(on_a.netns_name)
    assert not link_exists(on_b.host_veth) and not link_exists(again.host_veth)
    assert nets.ctrl.container_endpoints(cid) == [] and nets.ctrl.sandbox(cid) is None


@one_mode
def test_connect_joins_a_running_containers_namespace(nets: Nets) -> None:
    """A process already inside the namespace (a running container) is reachable through the
    interface connected afterwards, and keeps its namespace when all networks are gone."""
    nets.network("pyt-a")
    nets.network("pyt-b")
    cid, on_a = nets.container("pyt-a")
    _client, client = nets.container("pyt-b")
    with start_whoami_server(on_a.netns_name, "tcp", port=7001):  # "the container's process"
        on_b = nets.ctrl.connect(cid, "pyt-b")
        assert tcp_whoami(client.netns_name, on_b.ip, 7001) == client.ip
        nets.ctrl.disconnect(cid, "pyt-a")
        nets.ctrl.disconnect(cid, "pyt-b")
        # No endpoint left: the namespace stays, with only lo, for the running container.
        assert nets.ctrl.sandbox(cid) is not None and netns_exists(on_a.netns_name)
        assert set(_inside(on_a)) == {"lo"}
        assert nets.ctrl.connect(cid, "pyt-b").ifname == "eth0"


@one_mode
def test_options_take_effect(nets: Nets) -> None:
    net = nets.network(
        "pyt-o",
        options={
            "com.docker.network.bridge.name": "pyenet-o",
            "com.docker.network.bridge.host_binding_ipv4": "127.0.0.1",
            "com.docker.network.driver.mtu": "1400",
        },
    )
    assert net.bridge == "pyenet-o" and link_exists("pyenet-o")
    cid, ep = nets.container("pyt-o")
    assert Path(f"/sys/class/net/{ep.host_veth}/mtu").read_text().strip() == "1400"
    inside = json.loads(run("ip", "-n", ep.netns_name, "-j", "link", "show", "dev", "eth0"))
    assert inside[0]["mtu"] == 1400
    port = free_port_block()
    [published] = nets.ctrl.publish(cid, ep, parse_publish(f"{port}:80"))
    assert (published.host_ip, published.container_ip) == ("127.0.0.1", ep.ip)
    assert published.network_id == net.id
    assert kernel_mappings(nets.backend, TABLE) == [("127.0.0.1", "tcp", port, ep.ip, 80)]


@one_mode
def test_disconnect_unpublishes_the_ports_of_that_network(nets: Nets) -> None:
    nets.network("pyt-a")
    nets.network("pyt-b")
    cid, on_a = nets.container("pyt-a")
    nets.ctrl.connect(cid, "pyt-b")
    port = free_port_block()
    nets.ctrl.publish(cid, on_a, parse_publish(f"{port}:80"))
    assert kernel_mappings(nets.backend, TABLE) == [("0.0.0.0", "tcp", port, on_a.ip, 80)]
    nets.ctrl.disconnect(cid, "pyt-a")
    assert kernel_mappings(nets.backend, TABLE) == []
    assert nets.ctrl.published(cid) == []
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", port))  # the reservation is gone too


# -- isolation, proved with crafted frames ------------------------------------------------------

_sports: set[int] = set()


def _sport() -> int:
    while (port := secrets.randbelow(20000) + 20000) in _sports:
        pass
    _sports.add(port)
    return port


def _frame(src: Endpoint, dst_mac: str, packet: Packet) -> bytes:
    return bytes(Ether(src=src.mac, dst=dst_mac) / packet)


def _carries(sport: int) -> Callable[[bytes], bool]:
    """Matches frames of the probe with source port ``sport`` (or its replies)."""

    def match(data: bytes) -> bool:
        frame = Ether(data)
        for layer in (TCP, UDP):
            if layer in frame and sport in (frame[layer].sport, frame[layer].dport):
                return True
        return False

    return match


def _udp_whoami(netns: str, ip: str, port: int) -> str:
    """``udp_whoami`` with two more tries: UDP may lose a datagram (a conntrack flush by
    another program on the host drops the reply's NAT state)."""
    for _ in range(2):
        try:
            return udp_whoami(netns, ip, port, timeout=3.0)
        except TimeoutError:
            continue
    return udp_whoami(netns, ip, port, timeout=3.0)


def _probe_packets(src: Endpoint, dst_ip: str, port: int) -> tuple[list[Packet], list[int]]:
    """A SYN and a datagram to ``dst_ip:port``, and an echo request; their source ports."""
    tcp_sport, udp_sport = _sport(), _sport()
    packets = [
        IP(src=src.ip, dst=dst_ip) / TCP(sport=tcp_sport, dport=port, flags="S"),
        IP(src=src.ip, dst=dst_ip) / UDP(sport=udp_sport, dport=port) / b"probe",
        IP(src=src.ip, dst=dst_ip) / ICMP(id=tcp_sport & 0xFFFF),
    ]
    return packets, [tcp_sport, udp_sport]


def _icmp_from(ip: str) -> Callable[[bytes], bool]:
    def match(data: bytes) -> bool:
        frame = Ether(data)
        return ICMP in frame and IP in frame and frame[IP].src == ip

    return match


def _nothing_arrives(
    sender: Endpoint, frames: list[bytes], watch: list[tuple[str, str]], *matchers: Callable
) -> list[str]:
    """Send ``frames`` three times from ``sender``'s interface, watch the given (namespace,
    interface) pairs for ``WINDOW`` seconds, and return summaries of matching frames."""
    captures = [FrameCapture(ns, ifname) for ns, ifname in watch]
    try:
        for _ in range(3):
            send_frames(sender.netns_name, sender.ifname, frames)
            time.sleep(WINDOW / 3)
    finally:
        for capture in captures:
            capture.stop()
    return [
        Ether(data).summary()
        for capture in captures
        for data in capture.frames()
        if any(match(data) for match in matchers)
    ]


def _arrives(sender: Endpoint, frames: list[bytes], ns: str, ifname: str, match: Callable) -> bool:
    with FrameCapture(ns, ifname) as capture:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            send_frames(sender.netns_name, sender.ifname, frames)
            if capture.wait_for(match, 0.5):
                return True
    return False


def test_containers_on_different_networks_cannot_reach_each_other(nets: Nets) -> None:
    a = nets.network("pyt-a")
    nets.network("pyt-b")
    _a1, a1 = nets.container("pyt-a")
    _a2, a2 = nets.container("pyt-a")
    b1_id, b1 = nets.container("pyt-b")
    gateway_mac = link_mac(None, a.bridge)
    with (
        start_whoami_server(b1.netns_name, "tcp", port=80),
        start_whoami_server(b1.netns_name, "udp", port=80),
        start_whoami_server(a2.netns_name, "tcp", port=80),
    ):
        # Crafted straight at the other network's container, through a1's gateway.
        packets, sports = _probe_packets(a1, b1.ip, 80)
        leaked = _nothing_arrives(
            a1,
            [_frame(a1, gateway_mac, p) for p in packets],
            [(b1.netns_name, "eth0"), (a1.netns_name, "eth0")],
            *(_carries(s) for s in sports),
            _icmp_from(b1.ip),
        )
        assert leaked == []
        # The reverse direction too, and with real sockets.
        packets, sports = _probe_packets(b1, a1.ip, 80)
        b_gateway_mac = link_mac(None, nets.ctrl.network("pyt-b").bridge)
        leaked = _nothing_arrives(
            b1,
            [_frame(b1, b_gateway_mac, p) for p in packets],
            [(a1.netns_name, "eth0")],
            *(_carries(s) for s in sports),
        )
        assert leaked == []
        with pytest.raises((TimeoutError, ConnectionRefusedError, OSError)):
            tcp_whoami(a1.netns_name, b1.ip, 80)

        # Positive control: the same kind of crafted SYN reaches a container of a1's network.
        [syn, _udp, _icmp] = _probe_packets(a1, a2.ip, 80)[0]
        assert _arrives(
            a1, [_frame(a1, a2.mac, syn)], a2.netns_name, "eth0", _carries(syn[TCP].sport)
        )
        assert tcp_whoami(a1.netns_name, a2.ip, 80) == a1.ip

        if not nets.proxy:
            # A port published on the host stays reachable from every network (kernel DNAT).
            port = free_port_block()
            nets.ctrl.publish(b1_id, b1, parse_publish(f"{port}:80"))
            # Masqueraded on the way out of pyt-a's bridge, as any connection leaving it.
            assert tcp_whoami(a1.netns_name, a.gateway, port) == b1.gateway


def test_enable_icc_false_isolates_containers_of_one_network(nets: Nets, ext: ExternalHost) -> None:
    closed = nets.network("pyt-closed", options={"com.docker.network.bridge.enable_icc": "false"})
    nets.network("pyt-open")
    _c1, c1 = nets.container("pyt-closed")
    c2_id, c2 = nets.container("pyt-closed")
    _o1, o1 = nets.container("pyt-open")
    _o2, o2 = nets.container("pyt-open")
    for ep in (c1, c2):
        assert Path(f"/sys/class/net/{ep.host_veth}/brport/isolated").read_text().strip() == "1"
    assert Path(f"/sys/class/net/{o1.host_veth}/brport/isolated").read_text().strip() == "0"

    with (
        start_whoami_server(c2.netns_name, "tcp", port=80),
        start_whoami_server(o2.netns_name, "tcp", port=80),
    ):
        # A SYN framed straight to c2's MAC, and an ARP request for c2: neither gets through.
        packets, sports = _probe_packets(c1, c2.ip, 80)
        arp = Ether(src=c1.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=c1.mac, psrc=c1.ip, pdst=c2.ip
        )

        def arp_from_c1(data: bytes) -> bool:
            frame = Ether(data)
            return ARP in frame and frame[ARP].psrc == c1.ip

        leaked = _nothing_arrives(
            c1,
            [_frame(c1, c2.mac, p) for p in packets] + [bytes(arp)],
            [(c2.netns_name, "eth0")],
            *(_carries(s) for s in sports),
            arp_from_c1,
        )
        assert leaked == []
        with pytest.raises((TimeoutError, ConnectionRefusedError, OSError)):
            tcp_whoami(c1.netns_name, c2.ip, 80)

        # Positive control on the open network: the very same frames arrive.
        [syn, _udp, _icmp] = _probe_packets(o1, o2.ip, 80)[0]
        assert _arrives(
            o1, [_frame(o1, o2.mac, syn)], o2.netns_name, "eth0", _carries(syn[TCP].sport)
        )

        # The isolated containers still reach their gateway and the outside.
        with start_whoami_server(None, "tcp", closed.gateway) as server:
            assert tcp_whoami(c1.netns_name, closed.gateway, server.port) == c1.ip
        with start_whoami_server(ext.netns, "udp", port=5353):
            assert _udp_whoami(c1.netns_name, ext.ip, 5353) == ext.host_ip  # masqueraded
        # And their published ports are reachable from outside.
        port = free_port_block()
        nets.ctrl.publish(c2_id, c2, parse_publish(f"{port}:80"))
        if not nets.proxy:
            assert tcp_whoami(ext.netns, ext.host_ip, port) == ext.ip


def test_internal_network_has_no_outside_access(nets: Nets, ext: ExternalHost) -> None:
    internal = nets.network("pyt-int", internal=True)
    nets.network("pyt-out")
    i1_id, i1 = nets.container("pyt-int")
    _i2, i2 = nets.container("pyt-int")
    _n1, n1 = nets.container("pyt-out")
    assert internal.internal and not nets.ctrl.network("pyt-out").internal
    assert _default_routes(i1.netns_name) == []  # no gateway out of an internal network

    # No masquerade for its subnet, in the rules the kernel holds.
    if nets.backend == "nftables":
        rules = run("nft", "list", "table", "inet", TABLE)
        assert f"ip saddr {internal.subnet}" not in rules
        assert f'iifname "{internal.bridge}" oifname != "{internal.bridge}"' in rules
    else:
        rules = run("iptables-save")
        assert f"-s {internal.subnet} ! -o {internal.bridge} -j MASQUERADE" not in rules
        assert f"-i {internal.bridge} ! -o {internal.bridge} -j DROP" in rules

    # Crafted to the external host through the bridge (as if it had a route): dropped.
    with start_whoami_server(ext.netns, "udp", port=5353):
        packets, sports = _probe_packets(i1, ext.ip, 5353)
        leaked = _nothing_arrives(
            i1,
            [_frame(i1, link_mac(None, internal.bridge), p) for p in packets],
            [(ext.netns, ext.ifname)],
            *(_carries(s) for s in sports),
            _icmp_from(i1.ip),
        )
        assert leaked == []
        # Positive control from a normal network: the same frames get out, masqueraded.
        [_syn, datagram, _icmp] = _probe_packets(n1, ext.ip, 5353)[0]
        out_bridge = nets.ctrl.network("pyt-out").bridge

        def masqueraded(data: bytes) -> bool:
            frame = Ether(data)
            return (
                UDP in frame
                and frame[UDP].dport == 5353
                and frame[IP].src == ext.host_ip
                and frame[UDP].payload.load == b"probe"
            )

        assert _arrives(
            n1, [_frame(n1, link_mac(None, out_bridge), datagram)], ext.netns, ext.ifname,
            masqueraded,
        )  # fmt: skip
        assert _udp_whoami(n1.netns_name, ext.ip, 5353) == ext.host_ip

    # Containers of the internal network still talk to each other; nothing is published.
    with start_whoami_server(i2.netns_name, "tcp", port=80):
        assert tcp_whoami(i1.netns_name, i2.ip, 80) == i1.ip
    with pytest.raises(NetdError, match="network pyt-int is internal"):
        nets.ctrl.publish(i1_id, i1, parse_publish(f"{free_port_block()}:80"))
    assert kernel_mappings(nets.backend, TABLE) == []
    assert firewall_installed(nets.backend, TABLE)


@one_mode
def test_status_lists_networks_and_endpoints(nets: Nets) -> None:
    net = nets.network("pyt-s", internal=True)
    cid, ep = nets.container("pyt-s")
    out = subprocess.run(
        [sys.executable, "-m", "netd", "status", "--data-root", str(nets.cfg.data_root)],
        capture_output=True, text=True, timeout=60, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout  # fmt: skip
    assert "Networks (2)" in out
    assert f"  pyt-s  {net.id[:12]}  subnet {net.subnet}  gateway {net.gateway}  (internal)" in out
    assert f"    {net.bridge}  {net.gateway}/24  UP  ports: {ep.host_veth}" in out
    row = next(line for line in out.splitlines() if line.startswith(f"  {cid[:12]}  "))
    assert row.split() == [
        cid[:12], "pyt-s", "eth0", ep.netns_name, ep.host_veth, f"{ep.ip}/24", ep.mac, "yes"
    ]  # fmt: skip


# -- setup(): recovery of live endpoints -------------------------------------------------------


def _restart(nets: Nets, containers: list[str] | None = None) -> NetworkController:
    """The daemon process exits (its reserving sockets close) and a new one runs setup()."""
    for cid in nets.ctrl.sandboxes():
        for published in nets.ctrl.published(cid):
            if published.sock is not None:
                published.sock.close()
    nets.ctrl = NetworkController(nets.cfg)
    nets.ctrl.setup(containers)
    return nets.ctrl


@one_mode
def test_setup_recreates_what_live_endpoints_need(nets: Nets) -> None:
    net = nets.network("pyt-a", options={"com.docker.network.bridge.enable_icc": "false"})
    cid, ep = nets.container("pyt-a")
    cid2, ep2 = nets.container("pyt-a")
    port = free_port_block()
    nets.ctrl.publish(cid, ep, parse_publish(f"{port}:80"))
    # Behind netd's back: the bridge goes (its ports are released), one veth pair goes, the
    # other container loses its default route, and the firewall is flushed.
    remove_link(net.bridge)
    remove_link(ep.host_veth)
    run("ip", "-n", ep2.netns_name, "route", "del", "default")
    remove_firewall(nets.backend, TABLE)

    ctrl = _restart(nets, [cid, cid2])

    assert _bridge_addresses(net.bridge) == [f"{net.gateway}/24"]
    assert bridge_ports(net.bridge) == sorted([ep.host_veth, ep2.host_veth])
    for endpoint in (ep, ep2):
        isolated = Path(f"/sys/class/net/{endpoint.host_veth}/brport/isolated").read_text()
        assert isolated.strip() == "1"
        assert _inside(endpoint) == {"lo": ["127.0.0.1/8"], "eth0": [f"{endpoint.ip}/24"]}
        assert _default_routes(endpoint.netns_name) == [(net.gateway, "eth0")]
    assert ctrl.container_endpoints(cid) == [ep] and ctrl.container_endpoints(cid2) == [ep2]
    assert kernel_mappings(nets.backend, TABLE) == [("0.0.0.0", "tcp", port, ep.ip, 80)]
    published = ctrl.published(cid)
    assert [p.host_ip for p in published] == (["0.0.0.0", "::"] if nets.proxy else ["0.0.0.0"])
    assert all(p.sock is not None for p in published)
    with start_whoami_server(None, "tcp", net.gateway) as server:
        assert tcp_whoami(ep.netns_name, net.gateway, server.port) == ep.ip


@one_mode
def test_setup_forgets_containers_that_no_longer_exist(nets: Nets) -> None:
    nets.network("pyt-a")
    cid_a, a = nets.container("pyt-a")
    cid_b, b = nets.container("bridge")
    nets.ctrl.connect(cid_b, "pyt-a")
    port = free_port_block()
    nets.ctrl.publish(cid_b, b, parse_publish(f"{port}:80"))

    ctrl = _restart(nets, containers=[cid_a])

    assert list(ctrl.sandboxes()) == [cid_a] and ctrl.container_endpoints(cid_a) == [a]
    assert not netns_exists(b.netns_name)
    assert not link_exists(b.host_veth) and not link_exists(host_veth_name(cid_b, 1))
    assert kernel_mappings(nets.backend, TABLE) == []
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", port))
    state = json.loads((nets.cfg.data_root / "network" / "endpoints.json").read_text())
    allocations = {n["name"]: n["ipam"]["allocations"] for n in state["networks"].values()}
    assert allocations == {"bridge": {}, "pyt-a": {a.ip: cid_a}}


def test_first_slice_state_is_read_as_default_network_endpoints(tmp_path: Path) -> None:
    """A state file of the first slice (one bridge, addresses in ipam.json) still loads."""
    cid = "ab" * 32
    endpoint = {
        "container_id": cid,
        "netns_name": f"pyengine-{cid[:12]}",
        "netns_path": f"/run/netns/pyengine-{cid[:12]}",
        "host_veth": f"pye{cid[:10]}",
        "ip": "10.53.0.2",
        "prefixlen": 24,
        "gateway": GATEWAY,
        "mac": "02:42:0a:35:00:02",
    }
    port = {
        "proto": "tcp",
        "host_ip": "0.0.0.0",
        "host_port": 8080,
        "container_ip": "10.53.0.2",
        "container_port": 80,
    }
    (tmp_path / "endpoints.json").write_text(
        json.dumps({"endpoints": {cid: endpoint}, "ports": {cid: [port]}})
    )
    (tmp_path / "ipam.json").write_text(
        json.dumps({"subnet": "10.53.0.0/24", "allocations": {"10.53.0.2": cid}, "last": "x"})
    )
    default = Network(
        id="d" * 64, name="bridge", bridge=BRIDGE, subnet="10.53.0.0/24", gateway=GATEWAY,
        default=True,
    )  # fmt: skip
    state = NetdState.load(tmp_path / "endpoints.json", default, tmp_path / "ipam.json")
    assert list(state.networks) == [default.id]
    [ep] = state.endpoints.values()
    assert (ep.network_id, ep.network_name, ep.ifname, ep.ip) == (
        default.id,
        "bridge",
        "eth0",
        endpoint["ip"],
    )
    assert state.sandboxes[cid].netns_name == endpoint["netns_name"]
    assert [p.network_id for p in state.ports[cid]] == [default.id]
    assert state.ipams[default.id].allocations == {"10.53.0.2": cid}
    # Saved back, it is the current format and loads the same.
    state.save(tmp_path / "endpoints.json")
    again = NetdState.load(tmp_path / "endpoints.json", default, tmp_path / "ipam.json")
    assert again.endpoints == state.endpoints and again.sandboxes == state.sandboxes

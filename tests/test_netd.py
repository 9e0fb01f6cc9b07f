"""netd against the real kernel: bridge, namespaces, veths, firewall rules and real packets.

Every privileged test runs on both firewall backends and in both proxy modes (the ``net``
fixture), so the backends cannot drift apart.

Kernel objects: bridge ``pyetest0`` (10.48.0.1/24), nftables table ``inet pyetest`` or iptables
chains ``PYETEST-*`` (jumps tagged ``pyetest``), namespaces ``pyetest-<id>`` and ``pyetest-ext``
(an "external host" at 198.18.0.2 behind 198.18.0.1).
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.jsonstate import read_json
from common.ports import (
    PortBinding,
    parse_port_bindings,
    parse_publish,
    to_docker_port_bindings,
)
from netd.controller import Endpoint, NetdConfig, NetdError, NetworkController, PublishedPort
from netd.firewall import make_firewall
from netd.firewall.iptables import IptablesFirewall, TableState
from netd.naming import host_veth_name, netns_name
from tests.conftest import require, require_root, require_tool
from tests.netns_helpers import (
    ExternalHost,
    create_external_host,
    delete_external_host,
    firewall_installed,
    free_port_block,
    iptables_owned_lines,
    kernel_mappings,
    link_exists,
    listening_socket,
    netns_exists,
    netns_socket,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
    start_whoami_server,
    tcp_whoami,
    udp_whoami,
)

BRIDGE = "pyetest0"
TABLE = "pyetest"
GATEWAY = "10.48.0.1"
NETNS_PREFIX = "pyetest-"

# -- parse_publish --------------------------------------------------------------------------

GOOD_SPECS = [
    ("8080:80", [PortBinding(80, "tcp", "", 8080)]),
    ("127.0.0.1:8080:80", [PortBinding(80, "tcp", "127.0.0.1", 8080)]),
    ("127.0.0.1::80", [PortBinding(80, "tcp", "127.0.0.1", 0)]),
    ("80", [PortBinding(80)]),
    ("80/udp", [PortBinding(80, "udp")]),
    ("53:53/UDP", [PortBinding(53, "udp", "", 53)]),
    ("8000-8010:80", [PortBinding(80, "tcp", "", 8000, 8010)]),
    (
        "9000-9002:9000-9002",
        [
            PortBinding(9000, "tcp", "", 9000),
            PortBinding(9001, "tcp", "", 9001),
            PortBinding(9002, "tcp", "", 9002),
        ],
    ),
    ("80-81", [PortBinding(80), PortBinding(81)]),
    ("[::1]:8080:80", [PortBinding(80, "tcp", "::1", 8080)]),
    ("[::]::80/udp", [PortBinding(80, "udp", "::", 0)]),
    ("0.0.0.0:8080:80/tcp", [PortBinding(80, "tcp", "0.0.0.0", 8080)]),
]

BAD_SPECS = [
    ("8080:abc", 'invalid publish spec "8080:abc": invalid container port "abc"'),
    ("", 'invalid publish spec "": empty'),
    ("0", 'invalid container port "0"'),
    ("70000:80", 'invalid host port "70000"'),
    ("8080:80/sctp", 'invalid protocol "sctp"'),
    ("8010-8000:80", 'invalid host port range "8010-8000"'),
    ("8000-8002:80-81", "differ"),
    ("1.2.3:8080:80", 'invalid host IP "1.2.3"'),
    ("127.0.0.1:80", 'invalid host port "127.0.0.1"'),
    ("::1:8080:80", "too many colons"),
    ("[::1]8080:80", "expected"),
    ("[nope]:8080:80", 'invalid host IP "[nope]"'),
    (" 80", "padded"),
]


@pytest.mark.parametrize(("spec", "expected"), GOOD_SPECS, ids=[s for s, _ in GOOD_SPECS])
def test_parse_publish_accepts_docker_forms(spec: str, expected: list[PortBinding]) -> None:
    assert parse_publish(spec) == expected


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[s or "empty" for s, _ in BAD_SPECS])
def test_parse_publish_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_publish(spec)
    text = str(info.value)
    assert message in text
    assert text.startswith(f'invalid publish spec "{spec}": ')
    assert "\n" not in text


def test_docker_port_bindings_round_trip() -> None:
    bindings = [
        PortBinding(80, "tcp", "127.0.0.1", 8000, 8010),
        PortBinding(80, "tcp", "", 8080),
        PortBinding(53, "udp", "::1", 0),
        PortBinding(443),
    ]
    api = to_docker_port_bindings(bindings)
    assert api == {
        "80/tcp": [
            {"HostIp": "127.0.0.1", "HostPort": "8000-8010"},
            {"HostIp": "", "HostPort": "8080"},
        ],
        "53/udp": [{"HostIp": "::1", "HostPort": ""}],
        "443/tcp": [{"HostIp": "", "HostPort": ""}],
    }
    assert sorted(parse_port_bindings(api), key=repr) == sorted(bindings, key=repr)


def test_parse_port_bindings_edge_cases() -> None:
    assert parse_port_bindings(None) == []
    assert parse_port_bindings({"80/tcp": None, "81": []}) == []
    assert parse_port_bindings({"81": [{}]}) == [PortBinding(81)]
    with pytest.raises(ValueError, match="invalid port binding"):
        parse_port_bindings({"80/tcp": [{"HostIp": "", "HostPort": "x"}]})


# -- fixtures for the privileged tests -------------------------------------------------------


@dataclass
class Net:
    """A controller on the test bridge, plus what the test created through it."""

    ctrl: NetworkController
    cfg: NetdConfig
    container_ids: list[str] = field(default_factory=list)

    @property
    def proxy(self) -> bool:
        return self.cfg.userland_proxy

    @property
    def backend(self) -> str:
        return self.cfg.firewall_backend

    def mappings(self) -> list[tuple[str, str, int, str, int]]:
        """The mappings in the kernel, read without netd."""
        return kernel_mappings(self.backend, TABLE)

    def endpoint(self) -> tuple[str, Endpoint]:
        cid = secrets.token_hex(32)
        self.container_ids.append(cid)
        return cid, self.ctrl.create_endpoint(cid)


def _make_config(data_root: Path, userland_proxy: bool, backend: str) -> NetdConfig:
    return NetdConfig(
        data_root=data_root,
        bridge=BRIDGE,
        bridge_cidr=f"{GATEWAY}/24",
        table=TABLE,
        userland_proxy=userland_proxy,
        firewall_backend=backend,
        netns_prefix=NETNS_PREFIX,
    )


def _installed(backend: str) -> bool:
    return firewall_installed(backend, TABLE)


@pytest.fixture
def privileged() -> None:
    require_root()
    require_tool("ip")
    require_tool("nft")
    require_tool("iptables-restore")
    require_tool("iptables-save")


BACKENDS = ("nftables", "iptables")
# (firewall backend, userland proxy) for the ``net`` fixture.
NETS = [(backend, proxy) for backend in BACKENDS for proxy in (True, False)]


def net_id(param: tuple[str, bool]) -> str:
    backend, proxy = param
    return f"{backend}-{'proxy' if proxy else 'dnat'}"


@pytest.fixture(params=NETS, ids=net_id)
def net(request: pytest.FixtureRequest, tmp_path: Path, privileged: None) -> Iterator[Net]:
    backend, proxy = request.param
    cfg = _make_config(tmp_path, proxy, backend)
    ctrl = NetworkController(cfg)
    harness = Net(ctrl, cfg)
    try:
        ctrl.setup()
        yield harness
    finally:
        try:
            ctrl.teardown()
        finally:
            # Whatever teardown missed (it is under test too): only objects this test made.
            for cid in harness.container_ids:
                remove_link(host_veth_name(cid))
                remove_netns(netns_name(NETNS_PREFIX, cid))
            for backend in BACKENDS:
                remove_firewall(backend, TABLE)
            remove_link(BRIDGE)


@pytest.fixture
def ext(privileged: None) -> Iterator[ExternalHost]:
    host = create_external_host()
    try:
        yield host
    finally:
        delete_external_host(host)


def assert_port_free(port: int, proto: str = "tcp", ip: str = "0.0.0.0") -> None:
    """Nothing of ours holds ``port``: a bind without SO_REUSEADDR succeeds."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((ip, port))


def publish(net: Net, cid: str, ep: Endpoint, *specs: str) -> list[PublishedPort]:
    return net.ctrl.publish(cid, ep, [b for spec in specs for b in parse_publish(spec)])


DNAT_ONLY = pytest.mark.parametrize("net", [n for n in NETS if not n[1]], indirect=True, ids=net_id)
PROXY_ONLY = pytest.mark.parametrize("net", [n for n in NETS if n[1]], indirect=True, ids=net_id)


# -- endpoints ------------------------------------------------------------------------------


def test_setup_configures_bridge_and_sysctls(net: Net) -> None:
    link = json.loads(run("ip", "-j", "-d", "addr", "show", "dev", BRIDGE))[0]
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [
        (GATEWAY, 24)
    ]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    localnet = Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").read_text().strip()
    assert localnet == ("0" if net.proxy else "1")
    net.ctrl.setup()  # idempotent
    assert _installed(net.backend)


def test_create_endpoint_plumbs_namespace(net: Net) -> None:
    cid, ep = net.endpoint()
    assert ep.netns_name == f"{NETNS_PREFIX}{cid[:12]}"
    assert ep.netns_path == f"/run/netns/{ep.netns_name}"
    assert ep.host_veth == f"pye{cid[:10]}" and len(ep.host_veth) <= 15
    assert ep.gateway == GATEWAY and ep.prefixlen == 24
    assert netns_exists(ep.netns_name)
    assert Path(f"/sys/class/net/{ep.host_veth}/master").resolve().name == BRIDGE
    hairpin = Path(f"/sys/class/net/{ep.host_veth}/brport/hairpin_mode").read_text().strip()
    assert hairpin == ("0" if net.proxy else "1")

    inside = json.loads(run("ip", "-n", ep.netns_name, "-j", "addr", "show"))
    by_name = {link["ifname"]: link for link in inside}
    assert set(by_name) == {"lo", "eth0"}
    assert "UP" in by_name["lo"]["flags"] and "UP" in by_name["eth0"]["flags"]
    assert by_name["eth0"]["address"] == ep.mac
    assert [
        (a["local"], a["prefixlen"]) for a in by_name["eth0"]["addr_info"] if a["family"] == "inet"
    ] == [(ep.ip, 24)]
    routes = json.loads(run("ip", "-n", ep.netns_name, "-j", "route", "show", "default"))
    assert [(r["dst"], r["gateway"], r["dev"]) for r in routes] == [("default", GATEWAY, "eth0")]

    # The gateway answers from inside the namespace.
    with start_whoami_server(None, "tcp", GATEWAY) as server:
        assert tcp_whoami(ep.netns_name, GATEWAY, server.port) == ep.ip

    # Endpoints are persisted: a new controller (a restarted daemon) sees the same ones.
    assert NetworkController(net.cfg).endpoints() == {cid: ep}


def test_endpoints_get_distinct_addresses_and_talk(net: Net) -> None:
    cid_a, a = net.endpoint()
    cid_b, b = net.endpoint()
    assert a.ip != b.ip and a.mac != b.mac
    with start_whoami_server(b.netns_name, "tcp", port=7000) as server:
        assert tcp_whoami(a.netns_name, b.ip, server.port) == a.ip
    with pytest.raises(NetdError, match="already has an endpoint"):
        net.ctrl.create_endpoint(cid_a)


def test_delete_endpoint_leaves_nothing(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"{port}:80", f"127.0.0.1:{port}:53/udp")
    assert len(net.mappings()) == 2

    net.ctrl.delete_endpoint(cid)

    assert not link_exists(ep.host_veth)
    assert not netns_exists(ep.netns_name)
    assert net.mappings() == []
    assert net.ctrl.endpoints() == {} and net.ctrl.published(cid) == []
    state = read_json(net.cfg.data_root / "network" / "endpoints.json")
    assert [n["ipam"]["allocations"] for n in state["networks"].values()] == [{}]
    assert state["endpoints"] == {} and state["sandboxes"] == {}
    assert_port_free(port, "tcp")
    assert_port_free(port, "udp", "127.0.0.1")
    net.ctrl.delete_endpoint(cid)  # idempotent


def test_teardown_leaves_no_table_bridge_or_state(net: Net) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"{port}:80")

    net.ctrl.teardown()

    assert not _installed(net.backend)
    assert not link_exists(BRIDGE)
    assert not link_exists(ep.host_veth)
    assert not netns_exists(ep.netns_name)
    assert not (net.cfg.data_root / "network").exists()
    assert_port_free(port)


def test_restarted_controller_restores_mappings(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"{port}:80")
    for published in net.ctrl.published(cid):  # the old daemon process exits
        assert published.sock is not None
        published.sock.close()

    restarted = NetworkController(net.cfg)
    restarted.setup()

    assert restarted.endpoints() == {cid: ep}
    restored, *ipv6 = restarted.published(cid)
    # With the proxy, [::] too (netd/test_netd_ipv6.py covers it).
    assert [p.host_ip for p in ipv6] == (["::"] if net.proxy else [])
    assert (restored.host_port, restored.container_ip, restored.sock is not None) == (
        port,
        ep.ip,
        True,
    )
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        assert tcp_whoami(ext.netns, ext.host_ip, port) == ext.ip
    restarted.teardown()
    assert not _installed(net.backend) and not link_exists(BRIDGE)


# -- published ports: reachability -------------------------------------------------------------


def test_published_port_reachable_from_external_host(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    published, *ipv6 = publish(net, cid, ep, f"{port}:80")
    assert (published.proto, published.host_ip, published.host_port) == ("tcp", "0.0.0.0", port)
    assert [(p.host_ip, p.host_port) for p in ipv6] == ([("::", port)] if net.proxy else [])
    assert (published.container_ip, published.container_port) == (ep.ip, 80)
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        # Kernel DNAT keeps the client's address (the proxy would not).
        assert tcp_whoami(ext.netns, ext.host_ip, port) == ext.ip


def test_published_port_on_one_host_address(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"{ext.host_ip}:{port}:80")
    assert net.mappings() == [(ext.host_ip, "tcp", port, ep.ip, 80)]
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        assert tcp_whoami(ext.netns, ext.host_ip, port) == ext.ip


@DNAT_ONLY
def test_dnat_mode_serves_loopback_and_hairpin(net: Net) -> None:
    cid, ep = net.endpoint()
    _other_id, other = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"{port}:80")
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        # Host loopback: DNATed via route_localnet, masqueraded to the gateway address.
        assert tcp_whoami(None, "127.0.0.1", port) == GATEWAY
        # Another container through the gateway (hairpin NAT), masqueraded as well.
        assert tcp_whoami(other.netns_name, GATEWAY, port) == GATEWAY
        # The container itself through its own published port (bridge port hairpin mode).
        assert tcp_whoami(ep.netns_name, GATEWAY, port) == GATEWAY


@DNAT_ONLY
def test_dnat_mode_loopback_binding(net: Net) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"127.0.0.1:{port}:80")
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        assert tcp_whoami(None, "127.0.0.1", port) == GATEWAY


@PROXY_ONLY
def test_proxy_mode_leaves_loopback_and_hairpin_to_the_proxy(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    _other_id, other = net.endpoint()
    port = free_port_block()
    published, _ipv6 = publish(net, cid, ep, f"{port}:80")
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        # Not DNATed: they reach the host's reserving socket, which is bound but not listening.
        with pytest.raises(ConnectionRefusedError):
            tcp_whoami(None, "127.0.0.1", port)
        with pytest.raises(ConnectionRefusedError):
            tcp_whoami(other.netns_name, GATEWAY, port)
        assert tcp_whoami(ext.netns, ext.host_ip, port) == ext.ip
        # Once the proxy listens on the reserved socket, loopback reaches it.
        assert published.sock is not None
        published.sock.listen(1)
        with netns_socket(None) as client:
            client.connect(("127.0.0.1", port))
            conn, _peer = published.sock.accept()
            conn.close()


def test_masquerade_to_external_host(net: Net, ext: ExternalHost) -> None:
    _cid, ep = net.endpoint()
    with start_whoami_server(ext.netns, "tcp", port=8080) as server:
        assert tcp_whoami(ep.netns_name, ext.ip, server.port) == ext.host_ip
    with start_whoami_server(ext.netns, "udp", port=8053) as server:
        assert udp_whoami(ep.netns_name, ext.ip, server.port) == ext.host_ip


def test_udp_through_dnat(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    published = publish(net, cid, ep, f"{port}:53/udp")[0]
    assert published.proto == "udp"
    assert net.mappings() == [("0.0.0.0", "udp", port, ep.ip, 53)]
    with start_whoami_server(ep.netns_name, "udp", port=53):
        assert udp_whoami(ext.netns, ext.host_ip, port) == ext.ip


def _conntrack_udp_entries(port: int) -> str:
    result = subprocess.run(
        ["conntrack", "-L", "-p", "udp", "--orig-port-dst", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout


def test_udp_publish_flushes_stale_conntrack_for_host_port(net: Net, ext: ExternalHost) -> None:
    require_tool("conntrack")
    cid, ep = net.endpoint()
    port = free_port_block()
    source_port = free_port_block()
    # A flow to the host port before it is published: conntrack records it un-NATed.
    with netns_socket(ext.netns, socket.AF_INET, socket.SOCK_DGRAM) as early:
        early.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        early.bind(("0.0.0.0", source_port))
        early.sendto(b"early", (ext.host_ip, port))
    assert f"dport={port}" in _conntrack_udp_entries(port)

    publish(net, cid, ep, f"{port}:53/udp")  # container port differs from the host port

    with start_whoami_server(ep.netns_name, "udp", port=53):
        # Same 5-tuple as the early flow: only a flushed entry lets the new DNAT apply.
        assert udp_whoami(ext.netns, ext.host_ip, port, source_port=source_port) == ext.ip


# -- published ports: reservation ------------------------------------------------------------


@pytest.mark.parametrize("listen_ip", ["127.0.0.1", "0.0.0.0"])
def test_port_in_use_fails_cleanly(net: Net, listen_ip: str) -> None:
    cid, ep = net.endpoint()
    busy, spare = free_port_block(), free_port_block()
    with listening_socket(listen_ip, busy):
        with pytest.raises(NetdError) as info:
            publish(net, cid, ep, f"{spare}:81", f"{busy}:80")
        assert str(info.value) == f"port {busy}/tcp on 0.0.0.0 is already in use"
        assert net.mappings() == []
        assert net.ctrl.published(cid) == []
        assert_port_free(spare)  # the first binding's reservation was released


def test_port_held_by_another_container_is_in_use(net: Net) -> None:
    cid_a, a = net.endpoint()
    cid_b, b = net.endpoint()
    port = free_port_block()
    publish(net, cid_a, a, f"{port}:80")
    with pytest.raises(NetdError, match=f"port {port}/tcp on 127.0.0.1 is already in use"):
        publish(net, cid_b, b, f"127.0.0.1:{port}:80")
    other = free_port_block()
    with pytest.raises(NetdError, match=f"port {other}/tcp on 0.0.0.0 is already in use"):
        publish(net, cid_b, b, f"{other}:80", f"{other}:81")  # clash inside one request
    assert_port_free(other)
    assert net.ctrl.published(cid_b) == []
    udp = publish(net, cid_b, b, f"{port}:80/udp")  # another protocol is another port
    assert [p.host_port for p in udp] == [port] * (2 if net.proxy else 1)  # with [::]


def test_ephemeral_port(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    tcp, udp = [p for p in publish(net, cid, ep, "80", "53/udp") if p.host_ip == "0.0.0.0"]
    assert low <= tcp.host_port <= high and low <= udp.host_port <= high
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        assert tcp_whoami(ext.netns, ext.host_ip, tcp.host_port) == ext.ip


def test_range_picks_first_free_port(net: Net, ext: ExternalHost) -> None:
    cid, ep = net.endpoint()
    first = free_port_block(3)
    with listening_socket("0.0.0.0", first):
        published = publish(net, cid, ep, f"{first}-{first + 2}:80")[0]
        assert published.host_port == first + 1
        with start_whoami_server(ep.netns_name, "tcp", port=80):
            assert tcp_whoami(ext.netns, ext.host_ip, first + 1) == ext.ip
        # The rest of the range: first+1 is ours now, first is busy, first+2 is free.
        second = publish(net, cid, ep, f"{first}-{first + 2}:81")[0]
        assert second.host_port == first + 2
        with pytest.raises(NetdError, match=f"no free port in {first}-{first + 2}/tcp"):
            publish(net, cid, ep, f"{first}-{first + 2}:82")


@DNAT_ONLY
def test_ipv6_host_address_is_refused_without_the_proxy(net: Net) -> None:
    cid, ep = net.endpoint()
    with pytest.raises(NetdError, match="the userland proxy is disabled"):
        publish(net, cid, ep, "[::1]:8080:80")
    assert net.ctrl.published(cid) == []


def test_udp_reservation_drops_until_handed_over(net: Net) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    [published] = publish(net, cid, ep, f"127.0.0.1:{port}:53/udp")
    assert published.sock is not None
    if net.proxy:
        # The drop filter is detached: the proxy will receive on this socket.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"to-proxy", ("127.0.0.1", port))
            published.sock.settimeout(5)
            assert published.sock.recv(64) == b"to-proxy"
    else:
        # DNAT mode: the socket only reserves the port, and keeps dropping.
        with start_whoami_server(ep.netns_name, "udp", port=53):
            assert udp_whoami(None, "127.0.0.1", port) == GATEWAY
        published.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            published.sock.recv(64)


# -- firewall state and transactions ----------------------------------------------------------


def test_mappings_follow_publish_and_unpublish(net: Net) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    ports = publish(net, cid, ep, f"{port}:80", f"127.0.0.1:{port}:81/udp")
    expected = [("0.0.0.0", "tcp", port, ep.ip, 80), ("127.0.0.1", "udp", port, ep.ip, 81)]
    assert net.mappings() == expected
    # The backend reads back what it wrote.
    firewall = make_firewall(net.backend, TABLE, net.proxy)
    assert (
        sorted(
            (m.host_ip, m.proto, m.host_port, m.container_ip, m.container_port)
            for m in firewall.mappings()
        )
        == expected
    )
    if net.backend == "nftables":
        # One rule per map (two maps per family), whatever the number of ports.
        chain = json.loads(run("nft", "-j", "list", "chain", "inet", TABLE, "published_dnat"))
        assert sum(1 for item in chain["nftables"] if "rule" in item) == 4
    else:
        # One DNAT rule per port, and a raw drop for the port bound to loopback only.
        lines = iptables_owned_lines(TABLE)
        assert sum(1 for line in lines if line.startswith("-A PYETEST-DNAT ")) == 2
        assert (
            f"-A PYETEST-PREROUTING -d 127.0.0.1/32 ! -i lo -p udp -m udp --dport {port} -j DROP"
            in lines
        )

    net.ctrl.unpublish(cid)

    assert net.mappings() == []
    assert all(p.sock is None for p in ports)
    assert_port_free(port, "tcp")
    assert_port_free(port, "udp", "127.0.0.1")
    if net.backend == "iptables":
        assert not any("--dport" in line for line in iptables_owned_lines(TABLE))
    net.ctrl.unpublish(cid)  # nothing left to do


def test_failed_firewall_transaction_rolls_back(net: Net) -> None:
    cid, ep = net.endpoint()
    port, spare = free_port_block(), free_port_block()
    # Someone else's mapping of the same host port makes the transaction fail.
    if net.backend == "nftables":
        element = f"{{ tcp . {port} : 10.48.0.99 . 80 }}"
        run("nft", "add", "element", "inet", TABLE, "published_on_any", element)
    else:
        run(
            "iptables", "-t", "nat", "-A", "PYETEST-DNAT", "-p", "tcp", "--dport", str(port),
            "-j", "DNAT", "--to-destination", "10.48.0.99:80",
        )  # fmt: skip

    with pytest.raises(NetdError, match=net.backend):
        publish(net, cid, ep, f"{spare}:81", f"{port}:80")

    assert net.mappings() == [("0.0.0.0", "tcp", port, "10.48.0.99", 80)]
    assert net.ctrl.published(cid) == []
    assert_port_free(spare)
    assert_port_free(port)


@pytest.mark.parametrize("net", [("iptables", False)], indirect=True, ids=net_id)
def test_iptables_batch_failing_in_a_later_table_is_undone(net: Net) -> None:
    """iptables-restore commits table by table: a failure in the raw section (our raw chain
    was deleted behind our back) comes after the nat section committed, and must undo it."""
    cid, ep = net.endpoint()
    before = iptables_owned_lines(TABLE)
    run("iptables", "-t", "raw", "-D", "PREROUTING", "-m", "comment", "--comment", TABLE,
        "-j", "PYETEST-PREROUTING")  # fmt: skip
    run("iptables", "-t", "raw", "-F", "PYETEST-PREROUTING")
    run("iptables", "-t", "raw", "-X", "PYETEST-PREROUTING")
    port, spare = free_port_block(), free_port_block()

    with pytest.raises(NetdError, match="PYETEST-PREROUTING"):
        publish(net, cid, ep, f"{spare}:80", f"127.0.0.1:{port}:81")

    assert net.mappings() == []  # the committed nat section was put back
    assert net.ctrl.published(cid) == []
    assert_port_free(spare)
    assert_port_free(port, "tcp", "127.0.0.1")
    # setup() reinstalls the whole ruleset, the raw chain included.
    net.ctrl.setup()
    assert iptables_owned_lines(TABLE) == before
    publish(net, cid, ep, f"127.0.0.1:{port}:81")
    assert net.mappings() == [("127.0.0.1", "tcp", port, ep.ip, 81)]


def test_setup_and_teardown_leave_foreign_rules_alone(net: Net) -> None:
    """Objects that merely look like ours (another table/prefix, an untagged rule) survive."""
    foreign_table = f"{TABLE}_x"  # nftables table / iptables chain prefix PYETEST_X-
    if net.backend == "nftables":
        run("nft", "add", "table", "inet", foreign_table)
        run("nft", "add", "chain", "inet", foreign_table, "published_dnat")
    else:
        run("iptables", "-t", "nat", "-N", "PYETEST_X-DNAT")
        run("iptables", "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment",
            foreign_table, "-j", "PYETEST_X-DNAT")  # fmt: skip
        run("iptables", "-t", "filter", "-A", "FORWARD", "-o", BRIDGE, "-j", "ACCEPT")
    try:
        cid, ep = net.endpoint()
        publish(net, cid, ep, f"{free_port_block()}:80")
        net.ctrl.setup()
        net.ctrl.teardown()
        assert not _installed(net.backend)
        if net.backend == "nftables":
            assert "published_dnat" in run("nft", "list", "table", "inet", foreign_table)
        else:
            nat = run("iptables-save", "-t", "nat")
            assert ":PYETEST_X-DNAT" in nat
            assert f"-A PREROUTING -m comment --comment {foreign_table} -j PYETEST_X-DNAT" in nat
            assert f"-A FORWARD -o {BRIDGE} -j ACCEPT" in run("iptables-save", "-t", "filter")
    finally:
        remove_firewall(net.backend, foreign_table)
        if net.backend == "iptables":
            subprocess.run(
                ["iptables", "-t", "filter", "-D", "FORWARD", "-o", BRIDGE, "-j", "ACCEPT"],
                capture_output=True,
                timeout=30,
            )


@pytest.mark.parametrize("net", NETS[:1], indirect=True, ids=net_id)
@pytest.mark.parametrize("new_backend", ["iptables", "nftables"])
def test_switching_backend_removes_the_previous_rules(
    net: Net, ext: ExternalHost, new_backend: str
) -> None:
    """A daemon restarted with another backend takes the old backend's rules away."""
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"{port}:80")
    old_backend = net.backend
    if new_backend == old_backend:
        # Go to iptables and back: the second switch is the one under test.
        for published in net.ctrl.published(cid):
            assert published.sock is not None
            published.sock.close()
        net.ctrl = NetworkController(_make_config(net.cfg.data_root, net.proxy, "iptables"))
        net.ctrl.setup()
        old_backend = "iptables"
    for published in net.ctrl.published(cid):
        assert published.sock is not None
        published.sock.close()

    net.cfg = _make_config(net.cfg.data_root, net.proxy, new_backend)
    net.ctrl = NetworkController(net.cfg)
    net.ctrl.setup()

    assert not _installed(old_backend)
    assert _installed(new_backend)
    assert net.mappings() == [("0.0.0.0", "tcp", port, ep.ip, 80)]
    with start_whoami_server(ep.netns_name, "tcp", port=80):
        assert tcp_whoami(ext.netns, ext.host_ip, port) == ext.ip


def test_status_shows_bridge_endpoint_and_published_port(net: Net) -> None:
    cid, ep = net.endpoint()
    port = free_port_block()
    publish(net, cid, ep, f"127.0.0.1:{port}:80")
    result = subprocess.run(
        [sys.executable, "-m", "netd", "status", "--data-root", str(net.cfg.data_root),
         "--table", TABLE],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{BRIDGE}  {GATEWAY}/24  UP  ports: {ep.host_veth}" in out
    endpoint_row = next(line for line in out.splitlines() if line.startswith(f"  {cid[:12]}  "))
    assert endpoint_row.split() == [
        cid[:12], "bridge", "eth0", ep.netns_name, ep.host_veth, f"{ep.ip}/24", ep.mac, "yes"
    ]  # fmt: skip
    mapping = f"tcp 127.0.0.1:{port} -> {ep.ip}:80"
    assert f"  {cid[:12]}  {mapping}  yes" in out
    # The live firewall: the map element (nftables) or the DNAT rule (iptables).
    if net.backend == "nftables":
        assert "Firewall (nftables, table inet pyetest)" in out
        assert f"127.0.0.1 . tcp . {port} : {ep.ip} . 80" in out
    else:
        variant = IptablesFirewall(TABLE, net.proxy).variant()
        assert variant in ("nf_tables", "legacy")
        assert (
            f"Firewall (iptables, {variant} API, chains PYETEST-* and their jumps tagged pyetest)"
        ) in out
        assert (
            f"-A PYETEST-DNAT -d 127.0.0.1/32 -p tcp -m tcp --dport {port} "
            f"-j DNAT --to-destination {ep.ip}:80"
        ) in out

    # A mapping the state does not know about is pointed out.
    net.ctrl.unpublish(cid)
    make_firewall(net.backend, TABLE, net.proxy).add_mappings(
        [PublishedPort("udp", "0.0.0.0", port, ep.ip, 53).mapping()]
    )
    out = subprocess.run(
        [sys.executable, "-m", "netd", "status", "--data-root", str(net.cfg.data_root)],
        capture_output=True, text=True, timeout=60, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout  # fmt: skip
    assert "Published ports (0)" in out
    assert f"in the kernel but not in the state: udp 0.0.0.0:{port} -> {ep.ip}:53" in out


# -- the iptables backend's text handling (no privileges needed) -------------------------------

IPTABLES_SAVE_SAMPLE = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:PYEX-DNAT - [0:0]
:PYEX_2-DNAT - [0:0]
[3:180] -A PREROUTING -m comment --comment pyex -j PYEX-PREROUTING
[0:0] -A PREROUTING -m comment --comment other -j PYEX-PREROUTING
[0:0] -A PREROUTING -j PYEX-DNAT
[1:60] -A PYEX-DNAT -d 127.0.0.1/32 -p udp -m udp --dport 81 -j DNAT --to-destination 10.1.0.2:53
[0:0] -A PYEX-DNAT -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.1.0.3:80
[0:0] -A PYEX_2-DNAT -p tcp -m tcp --dport 1 -j DNAT --to-destination 10.1.0.3:80
COMMIT
"""


def _iptables_firewall(table: str = "pyex") -> IptablesFirewall:
    if shutil.which("iptables-restore") is None or shutil.which("iptables-save") is None:
        require(False, "needs iptables-restore and iptables-save on PATH")
    return IptablesFirewall(table, userland_proxy=False)


def test_iptables_parse_finds_only_our_chains_and_tagged_jumps() -> None:
    fw = _iptables_firewall()
    state = fw._parse(IPTABLES_SAVE_SAMPLE)
    assert state["nat"].chains == {
        "PYEX-DNAT": [
            "-d 127.0.0.1/32 -p udp -m udp --dport 81 -j DNAT --to-destination 10.1.0.2:53",
            "-p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.1.0.3:80",
        ]
    }
    assert state["nat"].jumps == [
        ("PREROUTING", "-m comment --comment pyex -j PYEX-PREROUTING")
    ]  # fmt: skip
    assert state["raw"].empty() and state["filter"].empty()


def test_iptables_converge_rewrites_chains_and_keeps_jumps() -> None:
    fw = _iptables_firewall()
    current = fw._parse(IPTABLES_SAVE_SAMPLE)["nat"]
    jump = ("PREROUTING", "-m comment --comment pyex -j PYEX-PREROUTING")
    target = TableState({"PYEX-PREROUTING": ["-j PYEX-DNAT"], "PYEX-DNAT": []}, [jump])
    assert fw._converge("nat", current, target) == [
        "*nat",
        ":PYEX-DNAT - [0:0]",
        ":PYEX-PREROUTING - [0:0]",
        "-A PYEX-PREROUTING -j PYEX-DNAT",
        "COMMIT",
    ]
    assert fw._converge("nat", target, target) == []
    assert fw._converge("nat", current, TableState()) == [
        "*nat",
        ":PYEX-DNAT - [0:0]",
        "-D PREROUTING -m comment --comment pyex -j PYEX-PREROUTING",
        "-X PYEX-DNAT",
        "COMMIT",
    ]


@pytest.mark.parametrize("table", ["", "9lives", "a-b", "waytoolongtablename"])
def test_iptables_refuses_bad_table_names(table: str) -> None:
    with pytest.raises(NetdError, match="invalid table name"):
        IptablesFirewall(table, userland_proxy=True)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(NetdError, match='unsupported firewall backend "pf"'):
        make_firewall("pf", TABLE, True)

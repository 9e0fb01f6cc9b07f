"""IPv6 bridge networks (``network create --ipv6``): netd on both firewall backends in both
modes (addresses and routes inside the namespace, TCP between containers of one network,
isolation from another network, a published port reached over IPv6 from a "LAN" namespace,
NAT66 of outgoing connections, the direct-routing drop), the pure planning rules, and one
pyengined end to end (inspect shapes, AAAA from the embedded DNS, [::1] through the proxy).

Names: bridges ``pyev6n*``, namespaces ``pyev6n-*``, tables ``pyev6n``; IPv4 subnets
10.86.x.0/24 and IPv6 subnets in fd00:86::/48; the LAN namespace is 198.18.86.0/30 and
fd00:86:ff::/64. The daemon end to end: bridge ``pyev6e0``, 10.87.0.1/24, fd00:87::/64.
Traffic goes only to loopback and to addresses of namespaces and veths these tests create.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest

from common.ports import PortBinding
from netd.controller import NetdConfig, NetworkController
from netd.errors import Conflict, NetdError
from netd.ipam import Ipam
from netd.network import Network, NetworkRequest, plan_network
from netd.subnetpool import HostRoute
from tests.conftest import (
    Daemon,
    assert_nothing_left,
    free_port,
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
)

PREFIX = "pyev6n"
TABLE = "pyev6n"
LAN_HOST6, LAN_EXT6 = "fd00:86:ff::1", "fd00:86:ff::2"
BLOCKED = 2.0  # seconds a connection that the firewall drops is given before it counts as such


# -- pure planning rules (no privileges) ------------------------------------------------------


def _plan(request: NetworkRequest, existing: list[Network] | None = None) -> Network:
    routes = [HostRoute(IPv6Network("fd00::/64"), "eth0")]
    return plan_network(request, existing or [], routes, [("10.86.128.0/17", 24)])


def test_plan_gives_an_ipv6_network_both_subnets() -> None:
    net = _plan(NetworkRequest("v6", enable_ipv6=True, subnet6="fd00:86:10::/64"))
    assert (net.subnet6, net.gateway6, net.configured_subnet6) == (
        "fd00:86:10::/64",
        "fd00:86:10::1",
        True,
    )
    assert net.subnet == "10.86.128.0/24" and net.enable_ipv6
    auto = _plan(NetworkRequest("auto", enable_ipv6=True), [net])
    assert IPv6Network(auto.subnet6).subnet_of(IPv6Network("fdd0:5079:656e::/48"))
    assert IPv6Network(auto.subnet6).prefixlen == 64 and not auto.configured_subnet6
    plain = _plan(NetworkRequest("plain"))
    assert (plain.subnet6, plain.enable_ipv6) == ("", False)


def test_plan_refuses_bad_ipv6_requests() -> None:
    with pytest.raises(NetdError, match="needs IPv6 enabled"):
        _plan(NetworkRequest("x", subnet6="fd00:86:10::/64"))
    with pytest.raises(Conflict, match="overlaps the host route fd00::/64"):
        _plan(NetworkRequest("x", enable_ipv6=True, subnet6="fd00::/48"))
    with pytest.raises(NetdError, match="it should be fd00:86:10::/64"):
        _plan(NetworkRequest("x", enable_ipv6=True, subnet6="fd00:86:10::5/64"))
    with pytest.raises(NetdError, match="not a host address"):
        _plan(NetworkRequest("x", enable_ipv6=True, subnet6="fd00:86:10::/64", gateway6="fd00::1"))
    first = _plan(NetworkRequest("a", enable_ipv6=True, subnet6="fd00:86:10::/64"))
    with pytest.raises(Conflict, match='overlaps network "a"'):
        _plan(NetworkRequest("b", enable_ipv6=True, subnet6="fd00:86:10::/56"), [first])


def test_ipv6_ipam_is_sequential_and_honours_a_requested_address() -> None:
    ipam = Ipam(IPv6Network("fd00:86:10::/64"), IPv6Address("fd00:86:10::1"))
    assert str(ipam.allocate("a")) == "fd00:86:10::2"
    assert str(ipam.allocate("b", "fd00:86:10::99")) == "fd00:86:10::99"
    assert str(ipam.allocate("c")) == "fd00:86:10::3"
    with pytest.raises(Conflict):
        ipam.allocate("d", "fd00:86:10::99")
    with pytest.raises(NetdError, match="reserved"):
        ipam.allocate("d", "fd00:86:10::")  # the Subnet-Router anycast address
    with pytest.raises(NetdError, match='invalid IPv6 address "10.0.0.1"'):
        ipam.allocate("d", "10.0.0.1")


# -- netd on the real kernel -----------------------------------------------------------------


@dataclass
class Lab:
    ctrl: NetworkController
    backend: str
    proxy: bool
    net_a: Network
    net_b: Network
    lan: ExternalHost


def _cleanup(backend: str) -> None:
    for name in netns_with_prefix(f"{PREFIX}-"):
        remove_netns(name)
    for link in links_with_prefix(PREFIX):
        remove_link(link)
    remove_firewall(backend, TABLE)
    if backend == "iptables":
        _remove_ip6tables_chains()


def _remove_ip6tables_chains() -> None:
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


def _give_lan_ipv6(lan: ExternalHost) -> None:
    """The LAN namespace's link gets fd00:86:ff::/64 on both ends (nodad: usable at once)."""
    run("ip", "addr", "add", f"{LAN_HOST6}/64", "dev", lan.host_ifname, "nodad")
    run("ip", "-n", lan.netns, "addr", "add", f"{LAN_EXT6}/64", "dev", lan.ifname, "nodad")


@pytest.fixture(
    scope="module",
    params=[
        ("nftables", True),
        ("nftables", False),
        ("iptables", True),
        ("iptables", False),
    ],
    ids=["nft-proxy", "nft-dnat", "ipt-proxy", "ipt-dnat"],
)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    backend, proxy = request.param
    if backend == "iptables":
        for tool in ("iptables-restore", "ip6tables-restore", "ip6tables-save"):
            require_tool(tool)
    _cleanup(backend)
    cfg = NetdConfig(
        tmp_path_factory.mktemp("v6net"),
        bridge=f"{PREFIX}0",
        bridge_cidr="10.86.0.1/24",
        table=TABLE,
        userland_proxy=proxy,
        firewall_backend=backend,
        netns_prefix=f"{PREFIX}-",
    )
    ctrl = NetworkController(cfg)
    lan: ExternalHost | None = None
    try:
        ctrl.setup()
        net_a = ctrl.create_network(
            "pyev6-a",
            subnet="10.86.1.0/24",
            enable_ipv6=True,
            subnet6="fd00:86:1::/64",
            options={"com.docker.network.bridge.name": f"{PREFIX}a"},
        )
        net_b = ctrl.create_network(
            "pyev6-b",
            subnet="10.86.2.0/24",
            enable_ipv6=True,
            subnet6="fd00:86:2::/64",
            options={"com.docker.network.bridge.name": f"{PREFIX}b"},
        )
        lan = create_external_host(
            f"{PREFIX}-lan", f"{PREFIX}x0", "198.18.86.1/30", "198.18.86.2/30"
        )
        _give_lan_ipv6(lan)
        yield Lab(ctrl, backend, proxy, net_a, net_b, lan)
    finally:
        try:
            ctrl.teardown(remove_networks=True)
        finally:
            if lan is not None:
                delete_external_host(lan)
            _cleanup(backend)


@pytest.fixture
def containers(lab: Lab) -> Iterator[dict[str, str]]:
    """Three containers: a1 and a2 on network a (a2 at a requested IPv6 address), b1 on b."""
    ids = {name: (name * 32)[:64] for name in ("a1", "a2", "b1")}
    try:
        lab.ctrl.connect(ids["a1"], lab.net_a)
        lab.ctrl.connect(ids["a2"], lab.net_a, ip6="fd00:86:1::a2")
        lab.ctrl.connect(ids["b1"], lab.net_b)
        yield ids
    finally:
        for cid in ids.values():
            lab.ctrl.delete_endpoint(cid)


def _endpoint(lab: Lab, cid: str):  # noqa: ANN202 - netd's Endpoint
    return lab.ctrl.container_endpoints(cid)[0]


def whoami6(netns: str | None, port: int = 0) -> WhoamiServer:
    """A TCP whoami server on [::]:port inside ``netns``."""
    sock = netns_socket(netns, socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return WhoamiServer(sock, "tcp", sock.getsockname()[1])


def tcp_whoami6(netns: str | None, ip: str, port: int, timeout: float = IO_TIMEOUT) -> str:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with netns_socket(netns, family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def test_addresses_and_routes_inside_the_namespace(lab: Lab, containers: dict[str, str]) -> None:
    a1, a2 = _endpoint(lab, containers["a1"]), _endpoint(lab, containers["a2"])
    assert (a1.ipv6, a1.ipv6_prefixlen, a1.ipv6_gateway) == ("fd00:86:1::2", 64, "fd00:86:1::1")
    assert a2.ipv6 == "fd00:86:1::a2"
    path = f"--net={a1.netns_path}"
    addrs = json.loads(run("nsenter", path, "ip", "-j", "-6", "addr", "show", "eth0"))
    globals_ = [
        (a["local"], a["prefixlen"]) for a in addrs[0]["addr_info"] if a["scope"] == "global"
    ]
    assert globals_ == [("fd00:86:1::2", 64)]
    routes = json.loads(run("nsenter", path, "ip", "-j", "-6", "route", "show", "default"))
    assert [(r["gateway"], r["dev"]) for r in routes] == [("fd00:86:1::1", "eth0")]
    bridge = json.loads(run("ip", "-j", "-6", "addr", "show", lab.net_a.bridge))
    assert ("fd00:86:1::1", 64) in [
        (a["local"], a["prefixlen"]) for a in bridge[0]["addr_info"] if a["scope"] == "global"
    ]


def test_tcp_between_containers_of_one_network_and_isolation(
    lab: Lab, containers: dict[str, str]
) -> None:
    a1, a2 = _endpoint(lab, containers["a1"]), _endpoint(lab, containers["a2"])
    b1 = _endpoint(lab, containers["b1"])
    with whoami6(a2.netns_name) as server:
        assert tcp_whoami6(a1.netns_name, a2.ipv6, server.port) == a1.ipv6
        # The gateway (the host) reaches it too.
        assert tcp_whoami6(None, a2.ipv6, server.port) == lab.net_a.gateway6
        # Another network's container does not.
        with pytest.raises(OSError):
            tcp_whoami6(b1.netns_name, a2.ipv6, server.port, timeout=BLOCKED)


def test_published_port_over_ipv6_from_the_lan(lab: Lab, containers: dict[str, str]) -> None:
    a1 = _endpoint(lab, containers["a1"])
    with whoami6(a1.netns_name) as server6:
        published = lab.ctrl.publish(
            containers["a1"], a1, [PortBinding(container_port=server6.port, proto="tcp")]
        )
        try:
            by_host = {p.host_ip: p for p in published}
            assert set(by_host) == {"0.0.0.0", "::"}
            # The [::] binding (DNAT, or the proxy's target) is the container's IPv6 address.
            assert by_host["::"].container_ip == a1.ipv6
            assert by_host["0.0.0.0"].container_ip == a1.ip
            port = by_host["::"].host_port
            assert tcp_whoami6(lab.lan.netns, LAN_HOST6, port) == LAN_EXT6
            if not lab.proxy:
                # ::1 cannot be DNATed to a container: the reserving socket refuses it.
                with pytest.raises(ConnectionRefusedError):
                    tcp_whoami6(None, "::1", port)
        finally:
            lab.ctrl.unpublish(containers["a1"])


def test_outgoing_ipv6_is_masqueraded(lab: Lab, containers: dict[str, str]) -> None:
    a1 = _endpoint(lab, containers["a1"])
    with whoami6(lab.lan.netns) as server:
        assert tcp_whoami6(a1.netns_name, LAN_EXT6, server.port) == LAN_HOST6


def test_direct_routing_to_a_container_address_is_dropped(
    lab: Lab, containers: dict[str, str]
) -> None:
    """A LAN host routing straight at the container's IPv6 address (a route it adds through
    this host) gets nothing, though the container listens."""
    a1 = _endpoint(lab, containers["a1"])
    run("ip", "-n", lab.lan.netns, "-6", "route", "replace", "fd00:86:1::/64", "via", LAN_HOST6)
    try:
        with whoami6(a1.netns_name) as server:
            with pytest.raises(OSError):
                tcp_whoami6(lab.lan.netns, a1.ipv6, server.port, timeout=BLOCKED)
            assert tcp_whoami6(a1.netns_name, a1.ipv6, server.port) == a1.ipv6
    finally:
        run("ip", "-n", lab.lan.netns, "-6", "route", "del", "fd00:86:1::/64")
    if lab.backend == "nftables":
        ruleset = run("nft", "list", "chain", "inet", TABLE, "raw_prerouting")
        line = next(ln for ln in ruleset.splitlines() if "fd00:86:1::/64" in ln)
        assert "packets 0 " not in line, line
    else:
        raw = run("ip6tables-save", "-c", "-t", "raw")
        line = next(ln for ln in raw.splitlines() if "-d fd00:86:1::/64" in ln)
        assert not line.startswith("[0:"), line


def test_publishing_on_ipv6_loopback_needs_the_proxy(lab: Lab, containers: dict[str, str]) -> None:
    a1 = _endpoint(lab, containers["a1"])
    binding = PortBinding(container_port=80, host_ip="::1", proto="tcp")
    if lab.proxy:
        (port,) = lab.ctrl.publish(containers["a1"], a1, [binding])
        try:
            assert port.container_ip == a1.ipv6 and not port.in_firewall
        finally:
            lab.ctrl.unpublish(containers["a1"])
    else:
        with pytest.raises(NetdError, match='cannot publish on "::1"'):
            lab.ctrl.publish(containers["a1"], a1, [binding])


def test_state_survives_a_new_controller(lab: Lab, containers: dict[str, str]) -> None:
    """A second controller reading the state file sees the IPv6 parts (the daemon restarted)."""
    again = NetworkController(lab.ctrl.cfg)
    net = again.network("pyev6-a")
    assert (net.subnet6, net.gateway6) == ("fd00:86:1::/64", "fd00:86:1::1")
    ep = again.container_endpoints(containers["a2"])[0]
    assert (ep.ipv6, ep.ipv6_gateway) == ("fd00:86:1::a2", "fd00:86:1::1")


# -- end to end through pyengined ---------------------------------------------------------------


@pytest.fixture(scope="module")
def v6daemon(
    tmp_path_factory: pytest.TempPathFactory, nginx_archive: Path, busybox_archive: Path
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("pyev6e0")
    d = start_daemon(tmp, "pyev6e0", "10.87.0.1/24", True)
    try:
        d.cli("load", "-i", str(nginx_archive), check=True)
        d.cli("load", "-i", str(busybox_archive), check=True)
        yield d
    finally:
        for cid in d.cli("ps", "-a", "-q").stdout.split():
            d.cli("rm", "-f", cid)
        for net in d.cli("network", "ls", "-q").stdout.split():
            d.cli("network", "rm", net)
        stop_daemon(d)
    assert_nothing_left(d)


def _inspect(d: Daemon, *args: str) -> dict:
    return json.loads(d.cli(*args, check=True).stdout)[0]


def test_ipv6_network_end_to_end(v6daemon: Daemon) -> None:
    d = v6daemon
    d.cli(
        "network",
        "create",
        "--ipv6",
        "--subnet",
        "fd00:87::/64",
        "--subnet",
        "10.87.1.0/24",
        "-o",
        "com.docker.network.bridge.name=pyev6e1",
        "pyev6e-net",
        check=True,
    )
    try:
        net = _inspect(d, "network", "inspect", "pyev6e-net")
        assert net["EnableIPv6"] is True
        assert sorted(c["Subnet"] for c in net["IPAM"]["Config"]) == [
            "10.87.1.0/24",
            "fd00:87::/64",
        ]
        port = free_port()
        d.cli(
            "run", "-d", "--name", "pyev6e-web", "--network", "pyev6e-net",
            "-p", f"{port}:80", "busybox", "httpd", "-f", "-p", "80", "-h", "/",
            check=True,
        )  # fmt: skip
        c = _inspect(d, "inspect", "pyev6e-web")
        settings = c["NetworkSettings"]["Networks"]["pyev6e-net"]
        assert settings["GlobalIPv6Address"] == "fd00:87::2"
        assert settings["GlobalIPv6PrefixLen"] == 64
        assert settings["IPv6Gateway"] == "fd00:87::1"
        net = _inspect(d, "network", "inspect", "pyev6e-net")
        assert net["Containers"][c["Id"]]["IPv6Address"] == "fd00:87::2/64"
        # AAAA from the embedded DNS, asked by another container of the network.
        out = d.cli(
            "run", "--rm", "--network", "pyev6e-net", "busybox",
            "nslookup", "-type=aaaa", "pyev6e-web",
        )  # fmt: skip
        assert "fd00:87::2" in out.stdout, out.stdout + out.stderr
        # The [::] binding through the proxy to the container's IPv6 address.
        with socket.create_connection(("::1", port), timeout=IO_TIMEOUT) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.")
        refused = d.cli(
            "network", "create", "--ipv6", "--subnet", "fd00:87:1::/64",
            "--subnet", "fd00:87:2::/64", "pyev6e-two",
        )  # fmt: skip
        assert refused.returncode != 0 and "several IPv6 subnets" in refused.stderr
    finally:
        d.cli("rm", "-f", "pyev6e-web")
        d.cli("network", "rm", "pyev6e-net")
    routes = run("ip", "-6", "route")
    assert "fd00:87::" not in routes, routes

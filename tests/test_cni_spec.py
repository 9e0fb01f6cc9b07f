"""pyengine-cni driven as cnitool drives a plugin (CNI_* environment, configuration on stdin)
against namespaces made with ``ip netns add``: ADD, CHECK, DEL (twice, and without a
namespace), GC, STATUS, VERSION and errors; concurrent ADDs; chained after the reference
``bridge`` plugin; both firewall backends; proxy mode. Every test leaves nothing behind."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cni_helpers import (
    REFERENCE_PLUGINS,
    allocations,
    invoke,
    leftovers,
    ok,
    proxies_of,
    pyecni_iptables_lines,
    sweep,
)
from tests.conftest import require, require_root
from tests.netns_helpers import (
    create_external_host,
    delete_external_host,
    kernel_mappings,
    link_exists,
    remove_netns,
    run,
    start_whoami_server,
    tcp_whoami,
)

pytestmark = pytest.mark.privileged

SUBNET = "10.197.10.0/24"
GATEWAY = "10.197.10.1"
PORT = 18080


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    require_root()
    sweep()
    yield
    left = leftovers()
    sweep()
    assert left == [], f"left behind: {left}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "pyecni-data"


def conf_for(data_dir: Path, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "pyecni-spec",
        "type": "pyengine",
        "bridge": "pyecni0",
        "table": "pyecni_spec",
        "dataDir": str(data_dir),
        "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]]},
    }
    conf.update(extra)
    return conf


def with_ports(conf: dict[str, Any], *ports: tuple[int, int]) -> dict[str, Any]:
    out = copy.deepcopy(conf)
    out["runtimeConfig"] = {
        "portMappings": [{"hostPort": h, "containerPort": c, "protocol": "tcp"} for h, c in ports]
    }
    return out


def new_netns(name: str) -> str:
    run("ip", "netns", "add", name)
    return f"/run/netns/{name}"


def addresses_in(netns: str, ifname: str = "eth0") -> str:
    return run("ip", "-n", netns, "-o", "addr", "show", "dev", ifname)


def test_version_and_error_json(data_dir: Path) -> None:
    reply = invoke("VERSION", {"cniVersion": "1.1.0"})
    assert reply.rc == 0
    assert reply.out == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    bad_version = invoke("ADD", {**conf_for(data_dir), "cniVersion": "0.2.0"}, "c1", "/run/x")
    assert (bad_version.rc, bad_version.out["code"]) == (1, 1)
    bad_subnet = conf_for(data_dir, ipam={"ranges": [[{"subnet": "10.197.10.0/33"}]]})
    reply = invoke("ADD", bad_subnet, "c1", "/run/netns/none")
    assert reply.rc == 1 and reply.out["code"] == 7 and "subnet" in reply.out["msg"]
    assert set(reply.out) <= {"cniVersion", "code", "msg", "details"}
    reply = invoke("ADD", conf_for(data_dir), "bad/id", "/run/netns/none")
    assert reply.out["code"] == 4
    ports = with_ports(conf_for(data_dir), (0, 80))
    assert invoke("ADD", ports, "c1", "/run/netns/none").out["code"] == 7
    assert not data_dir.exists(), "a refused configuration must change nothing"


def test_add_check_del_nftables(data_dir: Path) -> None:
    conf = with_ports(conf_for(data_dir), (PORT, 80))
    netns = new_netns("pyecni-spec1")
    ext = create_external_host("pyecni-ext", "pyecni-x0", "10.197.250.1/30", "10.197.250.2/30")
    try:
        result = ok(invoke("ADD", conf, "spec1", netns))
        assert result["cniVersion"] == "1.0.0"
        (ip,) = result["ips"]
        assert ip["gateway"] == GATEWAY and ip["address"].startswith("10.197.10.")
        assert result["interfaces"][ip["interface"]]["sandbox"] == netns
        container_ip = ip["address"].split("/")[0]
        assert f"inet {ip['address']}" in addresses_in("pyecni-spec1")
        assert f"default via {GATEWAY}" in run("ip", "-n", "pyecni-spec1", "route")
        assert kernel_mappings("nftables", "pyecni_spec") == [
            ("0.0.0.0", "tcp", PORT, container_ip, 80)
        ]
        with start_whoami_server("pyecni-spec1", port=80):
            # From the host's loopback (DNAT in output) and from a client namespace (prerouting).
            assert tcp_whoami(None, "127.0.0.1", PORT)
            assert tcp_whoami(ext.netns, ext.host_ip, PORT) == ext.ip
        assert ok(invoke("CHECK", {**conf, "prevResult": result}, "spec1", netns)) == {}
        ok(invoke("DEL", conf, "spec1", netns))
        ok(invoke("DEL", conf, "spec1", netns))  # idempotent
        assert invoke("CHECK", conf, "spec1", netns).rc == 1
        assert allocations(data_dir) == {}
        assert not link_exists("pyecni0"), "the last attachment takes the bridge along"
        assert "eth0" not in run("ip", "-n", "pyecni-spec1", "link")
    finally:
        delete_external_host(ext)
        remove_netns("pyecni-spec1")


def test_del_without_netns(data_dir: Path) -> None:
    conf = conf_for(data_dir, cniVersion="0.4.0")
    netns = new_netns("pyecni-gone")
    result = ok(invoke("ADD", conf, "gone", netns))
    assert result["ips"][0]["version"] == "4"  # 0.4.0's shape
    remove_netns("pyecni-gone")
    ok(invoke("DEL", conf, "gone", ""))
    ok(invoke("DEL", conf, "never-added", ""))
    assert allocations(data_dir) == {}


def test_gc_frees_leaked_attachments(data_dir: Path) -> None:
    conf = conf_for(data_dir, cniVersion="1.1.0")
    keep, leak = new_netns("pyecni-keep"), new_netns("pyecni-leak")
    try:
        ok(invoke("ADD", with_ports(conf, (PORT, 80)), "keep", keep))
        leaked = ok(invoke("ADD", with_ports(conf, (PORT + 1, 80)), "leak", leak))
        leaked_ip = leaked["ips"][0]["address"].split("/")[0]
        assert len(allocations(data_dir)) == 2
        valid = {"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}
        ok(invoke("GC", {**conf, **valid}))
        assert leaked_ip not in allocations(data_dir)
        assert "eth0" not in run("ip", "-n", "pyecni-leak", "link")
        assert [m[2] for m in kernel_mappings("nftables", "pyecni_spec")] == [PORT]
        ok(invoke("GC", {**conf, "cni.dev/valid-attachments": []}))
        assert allocations(data_dir) == {}
    finally:
        remove_netns("pyecni-keep")
        remove_netns("pyecni-leak")


def test_status(data_dir: Path, tmp_path: Path) -> None:
    conf = conf_for(data_dir, cniVersion="1.1.0")
    reply = invoke("STATUS", conf)
    assert (reply.rc, reply.out) == (0, {})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    reply = invoke("STATUS", conf_for(blocker / "data", cniVersion="1.1.0"))
    assert reply.rc == 1 and reply.out["code"] == 50


def test_concurrent_adds_and_dels(data_dir: Path) -> None:
    conf = conf_for(data_dir)
    names = [f"pyecni-c{i}" for i in range(8)]
    paths = [new_netns(n) for n in names]
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            replies = list(pool.map(lambda i: invoke("ADD", conf, f"c{i}", paths[i]), range(8)))
        addresses = [ok(r)["ips"][0]["address"] for r in replies]
        assert len(set(addresses)) == 8
        assert len(allocations(data_dir)) == 8
        with ThreadPoolExecutor(len(names)) as pool:
            for reply in pool.map(lambda i: invoke("DEL", conf, f"c{i}", paths[i]), range(8)):
                ok(reply)
        assert allocations(data_dir) == {}
    finally:
        for name in names:
            remove_netns(name)


def test_chained_after_reference_bridge(data_dir: Path, tmp_path: Path) -> None:
    require((REFERENCE_PLUGINS / "bridge").exists(), "needs containernetworking-plugins")
    bridge_conf = {
        "cniVersion": "1.0.0",
        "name": "pyecni-chain",
        "type": "bridge",
        "bridge": "pyecni1",
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.197.11.0/24"}]],
            "dataDir": str(tmp_path / "host-local"),
        },
    }
    netns = new_netns("pyecni-chain")
    prev: dict[str, Any] = {}
    try:
        prev = ok(invoke("ADD", bridge_conf, "chain", netns, plugin=REFERENCE_PLUGINS / "bridge"))
        container_ip = prev["ips"][0]["address"].split("/")[0]
        ours = {
            "cniVersion": "1.0.0",
            "name": "pyecni-chain",
            "type": "pyengine",
            "table": "pyecni_chain",
            "dataDir": str(data_dir),
            "runtimeConfig": {"portMappings": [{"hostPort": PORT + 2, "containerPort": 80}]},
            "prevResult": prev,
        }
        result = ok(invoke("ADD", ours, "chain", netns))
        assert result["ips"] == prev["ips"]  # passed through
        assert kernel_mappings("nftables", "pyecni_chain") == [
            ("0.0.0.0", "tcp", PORT + 2, container_ip, 80)
        ]
        with start_whoami_server("pyecni-chain", port=80):
            assert tcp_whoami(None, "127.0.0.1", PORT + 2)
        ok(invoke("CHECK", ours, "chain", netns))
        ok(invoke("DEL", {k: v for k, v in ours.items() if k != "prevResult"}, "chain", netns))
        ok(invoke("DEL", ours, "chain", netns))
        assert "eth0" in run("ip", "-n", "pyecni-chain", "link"), "the bridge plugin's interface"
    finally:
        invoke("DEL", bridge_conf, "chain", netns, plugin=REFERENCE_PLUGINS / "bridge")
        remove_netns("pyecni-chain")
        subprocess.run(["ip", "link", "del", "pyecni1"], capture_output=True, timeout=30)


def test_iptables_backend(data_dir: Path) -> None:
    require_tool_ok = subprocess.run(["iptables-save"], capture_output=True, timeout=30)
    require(require_tool_ok.returncode == 0, "needs iptables")
    conf = with_ports(conf_for(data_dir, firewallBackend="iptables"), (PORT + 3, 80))
    netns = new_netns("pyecni-ipt")
    try:
        result = ok(invoke("ADD", conf, "ipt", netns))
        container_ip = result["ips"][0]["address"].split("/")[0]
        assert kernel_mappings("iptables", "pyecni_spec") == [
            ("0.0.0.0", "tcp", PORT + 3, container_ip, 80)
        ]
        with start_whoami_server("pyecni-ipt", port=80):
            assert tcp_whoami(None, "127.0.0.1", PORT + 3)
        ok(invoke("DEL", conf, "ipt", netns))
        assert pyecni_iptables_lines() == []
    finally:
        remove_netns("pyecni-ipt")


def test_userland_proxy(data_dir: Path) -> None:
    conf = with_ports(conf_for(data_dir, userlandProxy=True), (PORT + 4, 80))
    netns = new_netns("pyecni-proxy")
    pids: list[int] = []
    try:
        ok(invoke("ADD", conf, "proxy", netns))
        pids = proxies_of(data_dir)
        assert pids, "a proxy serves the published port"
        with start_whoami_server("pyecni-proxy", port=80):
            # Through the proxy: the container sees the bridge's gateway as the client.
            assert tcp_whoami(None, "127.0.0.1", PORT + 4) == GATEWAY
        ok(invoke("CHECK", conf, "proxy", netns))
        ok(invoke("DEL", conf, "proxy", netns))
        _wait_gone(pids)
        assert not [p for p in pids if _is_live(p)], "DEL stops the proxies"
        # GC stops the proxies of an attachment the runtime lost track of.
        ok(invoke("ADD", conf, "proxy-leak", netns))
        pids = proxies_of(data_dir)
        assert pids
        ok(invoke("GC", {**conf, "cniVersion": "1.1.0", "cni.dev/valid-attachments": []}))
        _wait_gone(pids)
        assert not [p for p in pids if _is_live(p)], "GC stops the proxies"
    finally:
        for pid in pids:
            subprocess.run(["kill", str(pid)], capture_output=True, timeout=10)
        remove_netns("pyecni-proxy")


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_is_live(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_live(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_ipv6_and_another_ifname(data_dir: Path) -> None:
    """An IPv4 and an IPv6 range set: an address of each, a default route of each, a port
    mapped in both families; the interface is named as CNI_IFNAME says."""
    ranges = [[{"subnet": "10.197.12.0/24"}], [{"subnet": "fd00:197:12::/64"}]]
    conf = with_ports(conf_for(data_dir, ipam={"ranges": ranges}), (PORT + 5, 80))
    netns = new_netns("pyecni-v6")
    try:
        result = ok(invoke("ADD", conf, "v6", netns, ifname="net1"))
        assert [ip["address"] for ip in result["ips"]] == ["10.197.12.2/24", "fd00:197:12::2/64"]
        assert "inet6 fd00:197:12::2/64" in addresses_in("pyecni-v6", "net1")
        assert "default via fd00:197:12::1" in run("ip", "-n", "pyecni-v6", "-6", "route")
        with start_whoami_server("pyecni-v6", port=80):
            assert tcp_whoami(None, "127.0.0.1", PORT + 5)
        ok(invoke("CHECK", conf, "v6", netns, ifname="net1"))
        ok(invoke("DEL", conf, "v6", netns, ifname="net1"))
        assert allocations(data_dir) == {}
    finally:
        remove_netns("pyecni-v6")


def test_failed_add_leaves_nothing(data_dir: Path) -> None:
    """A host port someone else holds fails the ADD after the veth and address were made: the
    plugin answers an error and rolls everything back, so a runtime's DEL finds nothing."""
    netns = new_netns("pyecni-busy")
    holder = socket.create_server(("0.0.0.0", PORT + 6))
    try:
        reply = invoke("ADD", with_ports(conf_for(data_dir), (PORT + 6, 80)), "busy", netns)
        assert reply.rc == 1 and reply.out["code"] == 100
        assert "already in use" in reply.out["msg"]
        assert allocations(data_dir) == {}
        assert "eth0" not in run("ip", "-n", "pyecni-busy", "link")
        ok(invoke("DEL", conf_for(data_dir), "busy", netns))
    finally:
        holder.close()
        remove_netns("pyecni-busy")


def test_networks_are_isolated(tmp_path: Path) -> None:
    """Two networks of the plugin: a container of one cannot open a connection to a container
    of the other (each network's table drops what is routed into its bridge)."""
    one = conf_for(tmp_path / "one")
    two = conf_for(
        tmp_path / "two",
        name="pyecni-two",
        bridge="pyecni1",
        table="pyecni_two",
        ipam={"ranges": [[{"subnet": "10.197.13.0/24"}]]},
    )
    a, b = new_netns("pyecni-iso-a"), new_netns("pyecni-iso-b")
    try:
        ok(invoke("ADD", one, "iso-a", a))
        target = ok(invoke("ADD", two, "iso-b", b))["ips"][0]["address"].split("/")[0]
        with start_whoami_server("pyecni-iso-b", port=80):
            assert tcp_whoami("pyecni-iso-b", target, 80) == target  # the server answers
            with pytest.raises(OSError):
                tcp_whoami("pyecni-iso-a", target, 80, timeout=1)
        ok(invoke("DEL", one, "iso-a", a))
        ok(invoke("DEL", two, "iso-b", b))
    finally:
        remove_netns("pyecni-iso-a")
        remove_netns("pyecni-iso-b")


def test_gateway_mode_for_hosts_that_route(data_dir: Path) -> None:
    """A cluster routes a node's pod subnet to the node: in the default ``nat`` mode such
    traffic is dropped (Docker 28's direct-routing protection), ``nat-unprotected`` lets it
    reach the container with the client's own address."""
    netns = new_netns("pyecni-route")
    ext = create_external_host("pyecni-rext", "pyecni-rx0", "10.197.252.1/30", "10.197.252.2/30")
    try:
        run("ip", "-n", ext.netns, "route", "add", SUBNET, "via", ext.host_ip)
        for mode, reachable in (("nat", False), ("nat-unprotected", True)):
            conf = conf_for(data_dir, gatewayMode=mode)
            result = ok(invoke("ADD", conf, "route", netns))
            container_ip = result["ips"][0]["address"].split("/")[0]
            try:
                with start_whoami_server("pyecni-route", port=80):
                    if reachable:
                        assert tcp_whoami(ext.netns, container_ip, 80, timeout=5) == ext.ip
                    else:
                        with pytest.raises(OSError):
                            tcp_whoami(ext.netns, container_ip, 80, timeout=1)
            finally:
                ok(invoke("DEL", conf, "route", netns))
    finally:
        delete_external_host(ext)
        remove_netns("pyecni-route")


def test_bench_cni_smoke(tmp_path: Path) -> None:
    """``pyengine-bench cni`` runs end to end (a few samples, a few ports) and cleans up."""
    require((REFERENCE_PLUGINS / "portmap").exists(), "needs containernetworking-plugins")
    out = tmp_path / "cni.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "cni", "--repeat", "1", "--repeat-ports", "1",
         "--ports", "5", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "| bridge + portmap |" in result.stdout
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"reference", "pyengine-nft", "pyengine-ipt", "chained"}
    assert not [line for line in run("iptables-save", "-t", "nat").splitlines() if "pyecni" in line]

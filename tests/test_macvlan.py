"""macvlan (and ipvlan) networks end to end through the real docker CLI (API 1.41).

The "LAN" is a veth pair the test makes: ``pyev1`` on the host is the macvlan parent, its peer
sits in namespace ``pyev-lan`` with 10.186.1.1/24, standing in for the LAN's router. Containers
on the macvlan network get addresses of 10.186.1.0/24 and reach it (and it them) with real
packets through the parent, with no bridge, NAT or firewall rule on the way. ipvlan and 802.1q
sub-interface parents depend on kernel modules: their tests assert netd's one-line error when
the kernel lacks them (found by trying ``ip link add``), and the real path otherwise.

One pyengined (bridge pyev0, 10.187.0.1/24, nftables). Traffic stays inside the namespaces and
links the test creates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, assert_nothing_left, require_tool, start_daemon
from tests.conftest import stop_daemon as stop
from tests.netns_helpers import (
    link_exists,
    links_with_prefix,
    netns_exists,
    netns_socket,
    remove_link,
    remove_netns,
)

NAME, BIP = "pyev0", "10.187.0.1/24"
PARENT, LAN_IF, LAN_NS = "pyev1", "pyev2", "pyev-lan"
SUBNET, LAN_HOST = "10.186.1.0/24", "10.186.1.1"
DOCKER = "/usr/local/bin/docker"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def kernel_can(*link_args: str) -> bool:
    """Whether ``ip link add <link_args>`` works here (the link is removed again)."""
    name = link_args[link_args.index("name") + 1]
    ok = subprocess.run(["ip", "link", "add", *link_args], capture_output=True).returncode == 0
    remove_link(name)
    return ok


@pytest.fixture(scope="module")
def lan() -> Iterator[None]:
    for name in (PARENT, LAN_IF):
        remove_link(name)
    remove_netns(LAN_NS)
    try:
        sh("ip", "netns", "add", LAN_NS)
        sh("ip", "link", "add", PARENT, "type", "veth", "peer", "name", LAN_IF)
        sh("ip", "link", "set", LAN_IF, "netns", LAN_NS)
        sh("ip", "-n", LAN_NS, "addr", "add", f"{LAN_HOST}/24", "dev", LAN_IF)
        sh("ip", "-n", LAN_NS, "link", "set", LAN_IF, "up")
        sh("ip", "-n", LAN_NS, "link", "set", "lo", "up")
        sh("ip", "link", "set", PARENT, "up")
        yield
    finally:
        remove_link(PARENT)
        remove_netns(LAN_NS)
    assert not link_exists(PARENT) and not netns_exists(LAN_NS)


@pytest.fixture(scope="module")
def d(
    tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path, lan: None
) -> Iterator[Daemon]:
    require_tool("runc")
    daemon = start_daemon(tmp_path_factory.mktemp(NAME), NAME, BIP, True)
    try:
        daemon.cli("load", "-i", str(busybox_archive), check=True)
        yield daemon
    finally:
        for cid in daemon.cli("ps", "-a", "-q").stdout.split():
            daemon.cli("rm", "-f", cid)
        for net in daemon.cli("network", "ls", "-q", "--filter", "type=custom").stdout.split():
            daemon.cli("network", "rm", net)
        stop(daemon)
    assert_nothing_left(daemon)
    assert links_with_prefix("pyemv-") == [], "a stand-in parent was left behind"


DockerCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def docker(d: Daemon) -> Iterator[DockerCli]:
    env = {**os.environ, "DOCKER_HOST": d.host, "DOCKER_API_VERSION": "1.41"}
    env.pop("DOCKER_CONFIG", None)
    made: list[tuple[str, str]] = []

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([DOCKER, *args], capture_output=True, text=True, env=env, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: {out.stderr.strip()}")
        if args[:2] == ("network", "create") and out.returncode == 0:
            made.append(("network", args[-1]))
        return out

    yield run
    for cid in d.cli("ps", "-a", "-q").stdout.split():
        d.cli("rm", "-f", cid)
    for _, net in made:
        run("network", "rm", net)


def one_line_error(out: subprocess.CompletedProcess[str], needle: str) -> None:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def busybox(
    docker: DockerCli, name: str, network: str, *extra: str, cmd: str = "sleep 600"
) -> None:
    argv = ["run", "-d", "--name", name, "--network", network, *extra, "busybox", "sh", "-c", cmd]
    docker(*argv, check=True)


def probe(docker: DockerCli, network: str, script: str) -> str:
    """Run ``script`` in a throwaway container on ``network`` (after showing its routes and
    eth0); its output."""
    full = f"ip route; {script}"
    out = docker("run", "--rm", "--network", network, "busybox", "sh", "-c", full)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def lan_tcp(ip: str, port: int) -> str:
    """Connect from the LAN host to ``ip:port`` and read what is sent."""
    deadline = time.monotonic() + 10
    while True:
        with netns_socket(LAN_NS) as s:
            try:
                s.connect((ip, port))
                return s.recv(100).decode()
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.2)


def test_macvlan_reaches_the_lan_and_each_other(d: Daemon, docker: DockerCli) -> None:
    net = "pyetest-mv"
    docker(
        "network", "create", "-d", "macvlan", "--subnet", SUBNET, "--gateway", LAN_HOST,
        "--ip-range", "10.186.1.128/25", "-o", f"parent={PARENT}", net, check=True,
    )  # fmt: skip
    info = json.loads(docker("network", "inspect", net, check=True).stdout)[0]
    assert info["Driver"] == "macvlan" and info["Options"] == {"parent": PARENT}
    nft_before = sh("nft", "list", "table", "inet", NAME)

    # -p is ignored on macvlan (as Docker): the container's own LAN address serves the port.
    busybox(docker, "pyetest-mv1", net, "--ip", "10.186.1.10", "-p", "17000:7000",
            cmd="echo pyetest-hello | nc -l -p 7000")  # fmt: skip
    busybox(docker, "pyetest-mv2", net)
    c2 = json.loads(docker("inspect", "pyetest-mv2", check=True).stdout)[0]
    ip2 = c2["NetworkSettings"]["Networks"][net]["IPAddress"]
    assert ip2.startswith("10.186.1.") and int(ip2.rsplit(".", 1)[1]) >= 128  # from --ip-range

    # LAN host → container
    assert lan_tcp("10.186.1.10", 7000).strip() == "pyetest-hello"
    # container → LAN host, container → container by name (embedded DNS)
    out = probe(docker, net, f"ping -c 1 -W 3 {LAN_HOST} && ping -c 1 -W 3 pyetest-mv2")
    assert out.count(" 0% packet loss") == 2, out
    assert f"default via {LAN_HOST} dev eth0" in out
    key = c2["NetworkSettings"]["SandboxKey"]
    link = sh("nsenter", f"--net={key}", "ip", "-d", "link", "show", "eth0")
    assert "macvlan mode bridge" in link and f"@{PARENT}" not in link  # a child, moved in
    # no NAT, no rule: the firewall did not change
    assert sh("nft", "list", "table", "inet", NAME) == nft_before
    assert "17000" not in nft_before

    status = subprocess.run(
        [sys.executable, "-m", "netd", "status", "--data-root", str(d.data_root)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"macvlan bridge on parent {PARENT} (UP)" in status, status

    docker("rm", "-f", "pyetest-mv1", "pyetest-mv2", check=True)
    docker("network", "rm", net, check=True)
    assert link_exists(PARENT)  # the user's parent stays


def test_no_parent_is_internal_on_a_standin(d: Daemon, docker: DockerCli) -> None:
    net = "pyetest-mvint"
    docker("network", "create", "-d", "macvlan", "--subnet", "10.186.2.0/24", net, check=True)
    made = links_with_prefix("pyemv-")
    assert len(made) == 1
    info = json.loads(docker("network", "inspect", net, check=True).stdout)[0]
    assert info["Internal"] is True
    busybox(docker, "pyetest-mvi2", net)
    out = probe(docker, net, "ping -c 1 -W 3 pyetest-mvi2")
    assert " 0% packet loss" in out
    assert "default" not in out
    # a running container connected later gets eth1, a child of the stand-in; disconnect
    # removes it from its namespace
    busybox(docker, "pyetest-mvi3", "bridge")
    docker("network", "connect", net, "pyetest-mvi3", check=True)
    c3 = json.loads(docker("inspect", "pyetest-mvi3", check=True).stdout)[0]
    ns = f"--net={c3['NetworkSettings']['SandboxKey']}"
    assert "macvlan mode bridge" in sh("nsenter", ns, "ip", "-d", "link", "show", "eth1")
    assert " 0% packet loss" in probe(docker, net, "ping -c 1 -W 3 pyetest-mvi3")
    docker("network", "disconnect", net, "pyetest-mvi3", check=True)
    assert "eth1" not in sh("nsenter", ns, "ip", "link")
    docker("rm", "-f", "pyetest-mvi2", "pyetest-mvi3", check=True)
    docker("network", "rm", net, check=True)
    assert links_with_prefix("pyemv-") == []


def test_vlan_subinterface_parent(d: Daemon, docker: DockerCli) -> None:
    vlan = f"{PARENT}.42"
    args = ["network", "create", "-d", "macvlan", "--subnet", "10.186.3.0/24"]
    out = docker(*args, "-o", f"parent={vlan}", "pyetest-mvvlan")
    if not kernel_can("link", PARENT, "name", "pyev3", "type", "vlan", "id", "43"):
        one_line_error(out, "802.1q VLAN sub-interfaces are not available in this kernel")
        assert not link_exists(vlan)
        assert "pyetest-mvvlan" not in docker("network", "ls", check=True).stdout
        return
    assert out.returncode == 0, out.stderr
    assert "vlan protocol 802.1Q id 42" in sh("ip", "-d", "link", "show", vlan)
    docker("network", "rm", "pyetest-mvvlan", check=True)
    assert not link_exists(vlan)


def test_ipvlan(d: Daemon, docker: DockerCli) -> None:
    args = ["network", "create", "-d", "ipvlan", "--subnet", SUBNET, "--gateway", LAN_HOST]
    out = docker(*args, "-o", f"parent={PARENT}", "-o", "ipvlan_mode=l2", "pyetest-iv")
    if not kernel_can("link", PARENT, "name", "pyev4", "type", "ipvlan", "mode", "l2"):
        one_line_error(out, "ipvlan is not available in this kernel")
        assert "pyetest-iv" not in docker("network", "ls", check=True).stdout
        assert links_with_prefix("pyeprb") == []
        return
    assert out.returncode == 0, out.stderr
    out = probe(docker, "pyetest-iv", f"ping -c 1 -W 3 {LAN_HOST}")
    assert " 0% packet loss" in out
    docker("network", "rm", "pyetest-iv", check=True)


@pytest.mark.parametrize(
    "opts, needle",
    [
        (["-o", "parent=pyev-nope"], "parent interface pyev-nope does not exist"),
        (["-o", f"parent={PARENT}", "-o", "macvlan_mode=bogus"], "macvlan mode 'bogus'"),
        (["-o", f"parent={PARENT}", "-o", "macvlan_mode=passthru"], "passthru"),
        (["-o", "parent=lo"], "loopback interface"),
        (["-o", f"parent={PARENT}", "-o", "com.docker.network.bridge.name=x"], "unsupported"),
    ],
)
def test_refusals(d: Daemon, docker: DockerCli, opts: list[str], needle: str) -> None:
    out = docker("network", "create", "-d", "macvlan", "--subnet", "10.186.4.0/24", *opts,
                 "pyetest-mvbad")  # fmt: skip
    one_line_error(out, needle)


def test_one_network_per_parent(d: Daemon, docker: DockerCli) -> None:
    base = ["network", "create", "-d", "macvlan", "-o", f"parent={PARENT}"]
    docker(*base, "--subnet", "10.186.5.0/24", "pyetest-mvp1", check=True)
    out = docker(*base, "--subnet", "10.186.6.0/24", "pyetest-mvp2")
    one_line_error(out, f"already using parent interface {PARENT}")


def test_crash_leftovers_are_rolled_back(tmp_path: Path, lan: None) -> None:
    """A crash after the state recorded a network being created (its stand-in parent made)
    and one being removed: the next setup() removes both parents netd made."""
    from netd import NetdConfig, NetworkController

    cfg = NetdConfig(data_root=tmp_path, bridge="pyev5", bridge_cidr="10.187.5.1/24", table="pyev5")
    ctl = NetworkController(cfg)
    ctl.setup()
    try:
        kept = ctl.create_network("pyetest-keep", subnet="10.186.7.0/24", driver="macvlan")
        gone = ctl.create_network("pyetest-gone", subnet="10.186.8.0/24", driver="macvlan")
        cid = "f" * 64
        ctl.connect(cid, kept)
        # simulate the crash: "gone" was being removed, the state says so, the link remains
        state = json.loads((tmp_path / "network" / "endpoints.json").read_text())
        state["networks"][gone.id]["state"] = "removing"
        (tmp_path / "network" / "endpoints.json").write_text(json.dumps(state))
        # and "kept"'s container link vanished (e.g. someone deleted it)
        sh("ip", "-n", ctl.sandbox(cid).netns_name, "link", "del", "eth0")  # type: ignore[union-attr]
        again = NetworkController(cfg)
        again.setup(containers=[cid])
        assert not link_exists(gone.parent)
        assert link_exists(kept.parent)
        assert "eth0" in sh("ip", "-n", again.sandbox(cid).netns_name, "link")  # type: ignore[union-attr]
        assert [n.name for n in again.networks()][1:] == ["pyetest-keep"]
        ctl = again
    finally:
        ctl.teardown(remove_networks=True)
    assert links_with_prefix("pyemv-") == []
    assert not link_exists("pyev5")

"""Per-container DNS and names end to end: ``--dns``, ``--dns-search``, ``--dns-option``,
``--add-host`` (host-gateway too), ``--hostname``/``--domainname``, through the real docker CLI
(API 1.41), docker-py and the ``pyengine`` client, read back from inside busybox containers on
the default bridge and on a user-defined network.

One pyengined (userland-proxy mode) on bridge pyen0 (10.185.0.1/24), started with ``--dns
127.0.185.2`` and ``--host-gateway-ip 10.185.9.9``. Two fake upstream resolvers on host loopback
(127.0.185.1 for a container's own ``--dns``, 127.0.185.2 for the daemon's) answer different
addresses, so the test sees which one the embedded DNS asked; no query leaves the machine.
Addresses written into resolv.conf on the default bridge (10.185.53.x) are never contacted.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker as docker_py
import pytest

from netd.dns.containers import ContainerDns, DnsRequest
from netd.dns.hosts import ExtraHost, hosts_file
from netd.dns.resolvconf import DnsOverrides, bridge_resolv_conf, container_resolv_conf
from netd.errors import NetdError
from netd.state import Endpoint
from tests.conftest import (
    BIN,
    Daemon,
    assert_nothing_left,
    require_tool,
    start_daemon,
    stop_daemon,
)
from tests.dns_helpers import FakeUpstream

NAME, BIP = "pyen0", "10.185.0.1/24"
NET, NET_SUBNET = "pyen-net1", "10.185.1.0/24"
OWN_UPSTREAM, OWN_ANSWER = "127.0.185.1", "198.18.185.1"
DAEMON_UPSTREAM, DAEMON_ANSWER = "127.0.185.2", "198.18.185.2"
HOST_GATEWAY = "10.185.9.9"
API = "1.41"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    own = FakeUpstream(OWN_UPSTREAM, OWN_ANSWER)
    try:
        daemon_wide = FakeUpstream(DAEMON_UPSTREAM, DAEMON_ANSWER)
        try:
            yield own, daemon_wide
        finally:
            daemon_wide.close()
    finally:
        own.close()


@pytest.fixture(scope="module")
def d(
    tmp_path_factory: pytest.TempPathFactory,
    busybox_archive: Path,
    upstreams: tuple[FakeUpstream, FakeUpstream],
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp(NAME)
    daemon = start_daemon(
        tmp, NAME, BIP, True, "--dns", DAEMON_UPSTREAM, "--host-gateway-ip", HOST_GATEWAY
    )
    try:
        daemon.cli("load", "-i", str(busybox_archive), check=True)
        daemon.cli("network", "create", "--subnet", NET_SUBNET, NET, check=True)
        yield daemon
    finally:
        for cid in daemon.cli("ps", "-a", "-q").stdout.split():
            daemon.cli("rm", "-f", cid)
        daemon.cli("network", "rm", NET)
        stop_daemon(daemon)
    assert_nothing_left(daemon)


@pytest.fixture
def docker_env(d: Daemon, tmp_path: Path) -> dict[str, str]:
    require_tool("docker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(
        DOCKER_HOST=d.host,
        DOCKER_API_VERSION=API,
        DOCKER_CONFIG=str(tmp_path / "docker-config"),
    )
    return env


def docker(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


SHOW = (
    "hostname; cat /etc/hostname; cat /proc/sys/kernel/domainname; echo ---; "
    "cat /etc/resolv.conf; echo ---; cat /etc/hosts"
)


def sections(out: str) -> tuple[list[str], list[str], list[str]]:
    """(hostname, /etc/hostname, domainname), resolv.conf lines, hosts lines."""
    names, resolv, hosts = out.split("---\n")
    return names.splitlines(), resolv.splitlines(), hosts.splitlines()


def kernel_domainname(wanted: str) -> str:
    """What the container's uts namespace says of a ``--domainname``: runtime-spec 1.1's
    ``domainname``, which runc sets from 1.2 on (``runc features`` then reports spec 1.1+);
    an older runc leaves the kernel's "(none)" (the FQDN still goes into /etc/hosts)."""
    features = subprocess.run(["runc", "features"], capture_output=True, text=True)
    try:
        version = json.loads(features.stdout)["ociVersionMax"]
    except (ValueError, KeyError):
        return "(none)"
    major, minor = (int(x) for x in version.split("-")[0].split(".")[:2])
    return wanted if (major, minor) >= (1, 1) else "(none)"


def own_lines(hosts: list[str]) -> list[str]:
    """The hosts lines after Docker's fixed header."""
    return hosts[6:]


# ---- the files, through the docker CLI ---------------------------------------------------------


def test_default_bridge_docker_cli(docker_env: dict[str, str]) -> None:
    out = docker(
        docker_env, "run", "--rm", "--dns", "10.185.53.1", "--dns", "fd85::53",
        "--dns-search", "pyen.test", "--dns-search", "b.pyen.test", "--dns-option", "ndots:3",
        "--dns-option", "timeout:1", "--add-host", "pyen-a:10.185.7.7",
        "--add-host", "pyen-b:fd85::7", "--add-host", "pyen-gw:host-gateway",
        "--hostname", "pyenhost", "--domainname", "pyen.example",
        "busybox", "sh", "-c", SHOW,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    names, resolv, hosts = sections(out.stdout)
    assert names == ["pyenhost", "pyenhost", kernel_domainname("pyen.example")]
    assert resolv == [
        "nameserver 10.185.53.1",
        "nameserver fd85::53",
        "search pyen.test b.pyen.test",
        "options ndots:3 timeout:1",
    ]
    assert hosts[0] == "127.0.0.1\tlocalhost"
    ip = own_lines(hosts)[-1].split("\t")[0]
    assert ip.startswith("10.185.0."), hosts
    assert own_lines(hosts) == [
        "10.185.7.7\tpyen-a",
        "fd85::7\tpyen-b",
        f"{HOST_GATEWAY}\tpyen-gw",
        f"{ip}\tpyenhost.pyen.example pyenhost",
    ]


def test_default_bridge_without_options_keeps_daemon_dns(docker_env: dict[str, str]) -> None:
    out = docker(docker_env, "run", "--rm", "busybox", "sh", "-c", SHOW)
    assert out.returncode == 0, out.stderr
    names, resolv, hosts = sections(out.stdout)
    assert names[0] == names[1] and len(names[0]) == 12  # the short id
    assert names[2] in ("", "(none)")
    assert resolv[0] == f"nameserver {DAEMON_UPSTREAM}"
    (own,) = own_lines(hosts)
    assert own.endswith(f"\t{names[0]}")


def test_user_network_docker_cli(
    docker_env: dict[str, str], upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    own, daemon_wide = upstreams
    script = SHOW + "; echo ---; nslookup -type=a pyen-own.example.test"
    out = docker(
        docker_env, "run", "--rm", "--network", NET, "--network-alias", "pyen-alias",
        "--dns", OWN_UPSTREAM, "--dns-search", "pyen.test", "--dns-option", "attempts:2",
        "--add-host", "pyen-gw:host-gateway", "--hostname", "pyenfq.pyen.example",
        "busybox", "sh", "-c", script,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    head, lookup = out.stdout.rsplit("---\n", 1)
    names, resolv, hosts = sections(head)
    assert names[:2] == ["pyenfq.pyen.example", "pyenfq.pyen.example"]
    # The embedded DNS stays the nameserver; the search/options are the container's.
    assert resolv == [
        "nameserver 127.0.0.11",
        "search pyen.test",
        "options attempts:2 ndots:0",
    ]
    extra, mine = own_lines(hosts)
    assert extra == f"{HOST_GATEWAY}\tpyen-gw"
    assert mine.startswith("10.185.1.") and mine.endswith("\tpyenfq.pyen.example pyenfq")
    # The container's own upstream answered, not the daemon's.
    assert f"Address: {OWN_ANSWER}" in lookup, lookup
    assert "pyen-own.example.test." in own.queries
    assert "pyen-own.example.test." not in daemon_wide.queries


def test_user_network_without_dns_uses_the_daemons_upstream(
    docker_env: dict[str, str], upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    own, daemon_wide = upstreams
    out = docker(
        docker_env, "run", "--rm", "--network", NET, "busybox",
        "nslookup", "-type=a", "pyen-daemon.example.test",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"Address: {DAEMON_ANSWER}" in out.stdout
    assert "pyen-daemon.example.test." in daemon_wide.queries
    assert "pyen-daemon.example.test." not in own.queries


def test_docker_cli_errors(docker_env: dict[str, str]) -> None:
    """The docker CLI checks --add-host itself; a --dns-option it passes on gets the daemon's
    400, printed by the CLI as one error line (then its usual usage hint)."""
    out = docker(docker_env, "run", "--rm", "--add-host", "pyen-x:not-an-ip", "busybox", "true")
    assert out.returncode != 0
    assert "invalid IP address in add-host" in out.stderr.strip().splitlines()[0], out.stderr
    out = docker(docker_env, "run", "--rm", "--dns-option", "ndots:1 rotate", "busybox", "true")
    assert out.returncode != 0
    first = out.stderr.strip().splitlines()[0]
    assert "Error response from daemon" in first and "invalid DNS option" in first, out.stderr


def test_connect_and_disconnect_update_hosts_in_place(
    d: Daemon, docker_env: dict[str, str]
) -> None:
    """As Docker: a running container's /etc/hosts gains a line for the network it is
    connected to and loses it on disconnect; read through the container's own mount namespace
    (/proc/PID/root), so the bind mount is known to show the new text."""
    started = docker(
        docker_env, "run", "-d", "--name", "pyen-conn", "--hostname", "pyenconn",
        "--add-host", "pyen-a:10.185.7.7", "busybox", "sleep", "120",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        info = json.loads(d.cli("inspect", "pyen-conn", check=True).stdout)[0]
        hosts = Path(f"/proc/{info['State']['Pid']}/root/etc/hosts")
        (before,) = own_lines(hosts.read_text().splitlines())[1:]
        assert before.endswith("\tpyenconn")
        connected = docker(docker_env, "network", "connect", NET, "pyen-conn")
        assert connected.returncode == 0, connected.stderr
        lines = own_lines(hosts.read_text().splitlines())
        assert lines[:2] == ["10.185.7.7\tpyen-a", before]
        (added,) = lines[2:]
        assert added.startswith("10.185.1.") and added.endswith("\tpyenconn")
        gone = docker(docker_env, "network", "disconnect", NET, "pyen-conn")
        assert gone.returncode == 0, gone.stderr
        assert own_lines(hosts.read_text().splitlines()) == ["10.185.7.7\tpyen-a", before]
    finally:
        d.cli("rm", "-f", "pyen-conn")


# ---- docker-py and the API's 400s --------------------------------------------------------------


def test_docker_py_files(d: Daemon) -> None:
    client = docker_py.DockerClient(base_url=d.host, version=API)
    try:
        out = client.containers.run(
            "busybox", ["sh", "-c", SHOW], remove=True, network=NET,
            dns=["10.185.53.2"], dns_search=["."], dns_opt=["ndots:1"],
            extra_hosts={"pyen-py": "10.185.7.8"}, hostname="pyenpy", domainname="pyen.py",
        ).decode()  # fmt: skip
    finally:
        client.close()
    names, resolv, hosts = sections(out)
    assert names == ["pyenpy", "pyenpy", kernel_domainname("pyen.py")]
    # "." stands for no search domains; ndots from --dns-option wins over Docker's ndots:0.
    assert resolv == ["nameserver 127.0.0.11", "options ndots:1"]
    extra, mine = own_lines(hosts)
    assert extra == "10.185.7.8\tpyen-py"
    assert mine.endswith("\tpyenpy.pyen.py pyenpy")


@pytest.mark.parametrize(
    ("host_config", "message"),
    [
        ({"ExtraHosts": ["pyen-nocolon"]}, "bad format for add-host"),
        ({"ExtraHosts": [":10.185.7.7"]}, "bad format for add-host"),
        ({"ExtraHosts": ["pyen-x:10.185.7"]}, "invalid IP address in add-host"),
        ({"ExtraHosts": ["pyen x:10.185.7.7"]}, "bad format for add-host"),
        ({"Dns": ["pyen-not-an-ip"]}, "IP address is not correctly formatted"),
        ({"DnsSearch": ["a\nnameserver 10.185.53.9"]}, "invalid search domain"),
        ({"DnsOptions": ["ndots:1 rotate"]}, "invalid DNS option"),
    ],
)
def test_api_rejects_bad_entries_with_400(
    d: Daemon, host_config: dict[str, list[str]], message: str
) -> None:
    api = docker_py.APIClient(base_url=d.host, version=API)
    try:
        with pytest.raises(docker_py.errors.APIError) as e:
            api.create_container("busybox", ["true"], host_config=host_config)
    finally:
        api.close()
    assert e.value.status_code == 400
    assert message in e.value.explanation


def test_api_rejects_a_bad_hostname_with_400(d: Daemon) -> None:
    api = docker_py.APIClient(base_url=d.host, version=API)
    try:
        with pytest.raises(docker_py.errors.APIError) as e:
            api.create_container("busybox", ["true"], hostname="x" * 65)
    finally:
        api.close()
    assert e.value.status_code == 400 and "invalid hostname" in e.value.explanation


# ---- the pyengine client -----------------------------------------------------------------------


def test_pyengine_client_flags(d: Daemon, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(
        "# a comment\n\nPYEN_A=one two \n  PYEN_B=b=c\nPYEN_FROM_CLIENT\nPYEN_UNSET_HERE\n"
    )
    os.environ["PYEN_FROM_CLIENT"] = "client-value"
    try:
        out = d.cli(
            "run", "--rm", "-h", "pyencli", "--domainname", "pyen.cli", "-w", "/tmp",
            "-u", "65534:65534", "--env-file", str(env_file), "-e", "PYEN_B=override",
            "--dns", "10.185.53.3", "--dns-search", "cli.pyen.test", "--dns-option", "ndots:4",
            "--add-host", "pyen-eq=10.185.7.9", "--add-host", "pyen-v6:[fd85::9]",
            "busybox", "sh", "-c",
            SHOW + "; echo ---; pwd; id -u; id -g; env | grep ^PYEN_ | sort",
        )  # fmt: skip
    finally:
        del os.environ["PYEN_FROM_CLIENT"]
    assert out.returncode == 0, out.stderr
    head, rest = out.stdout.rsplit("---\n", 1)
    names, resolv, hosts = sections(head)
    assert names == ["pyencli", "pyencli", kernel_domainname("pyen.cli")]
    assert resolv == [
        "nameserver 10.185.53.3",
        "search cli.pyen.test",
        "options ndots:4",
    ]
    extra_eq, extra_v6, mine = own_lines(hosts)
    assert (extra_eq, extra_v6) == ("10.185.7.9\tpyen-eq", "fd85::9\tpyen-v6")
    assert mine.endswith("\tpyencli.pyen.cli pyencli")
    assert rest.splitlines() == [
        "/tmp",
        "65534",
        "65534",
        "PYEN_A=one two ",
        "PYEN_B=override",
        "PYEN_FROM_CLIENT=client-value",
    ]


def test_pyengine_client_bad_add_host_is_one_line(d: Daemon, tmp_path: Path) -> None:
    out = d.cli("run", "--rm", "--add-host", "pyen-bad", "busybox", "true")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad format for add-host" in lines[0], out.stderr
    missing = d.cli("run", "--rm", "--env-file", str(tmp_path / "nope"), "busybox", "true")
    assert missing.returncode == 125
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


# ---- the rules, without a daemon ---------------------------------------------------------------


def test_resolv_conf_rules() -> None:
    host = "search host.test\nnameserver 10.185.53.5\nnameserver 127.0.0.53\noptions edns0\n"
    given = DnsOverrides.parse(["10.185.53.6"], None, None)
    assert bridge_resolv_conf(host, (), given) == (
        "nameserver 10.185.53.6\nsearch host.test\noptions edns0\n"
    )
    search_only = DnsOverrides.parse(None, ["x.test"], None)
    assert bridge_resolv_conf(host, (), search_only) == (
        "nameserver 10.185.53.5\nsearch x.test\noptions edns0\n"
    )
    assert container_resolv_conf(host, overrides=DnsOverrides.parse(None, ["."], None)) == (
        "nameserver 127.0.0.11\noptions edns0 ndots:0\n"
    )
    assert given.upstreams() == [("10.185.53.6", 53)]
    assert DnsOverrides().upstreams() is None


def test_hosts_rules() -> None:
    assert ExtraHost.parse("a:fd85::1") == ExtraHost("a", "fd85::1")
    assert ExtraHost.parse("a:[fd85::1]") == ExtraHost("a", "fd85::1")
    assert ExtraHost.parse("a:host-gateway") == ExtraHost("a", "host-gateway")
    text = hosts_file("h", "", ["10.185.0.2", "fd85::2"], [ExtraHost("a", "10.185.7.1")])
    assert text.splitlines()[6:] == ["10.185.7.1\ta", "10.185.0.2\th", "fd85::2\th"]
    ep = Endpoint("c", "n", "/run/netns/n", "veth", "10.185.0.2", 24, "10.185.0.1", "m")
    request = DnsRequest.of({"Hostname": "h"}, {"ExtraHosts": ["gw:host-gateway"]})
    no_gateway = ContainerDns(None, "default")
    with pytest.raises(NetdError, match="unable to derive the IP value for host-gateway"):
        no_gateway.hosts(request, [ep])
    both = ContainerDns(None, "default", host_gateway=["10.185.0.1", "fd85::1"])
    assert both.hosts(request, [ep]).splitlines()[6:] == [
        "10.185.0.1\tgw",
        "fd85::1\tgw",
        "10.185.0.2\th",
    ]


# ---- after a daemon restart, and the daemon's flag ---------------------------------------------


def test_own_upstream_survives_a_daemon_restart(
    tmp_path: Path, busybox_archive: Path, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """Live restore: the adopted container's new responder forwards to its own --dns again."""
    own, daemon_wide = upstreams
    name, bip, args = "pyen1", "10.185.2.1/24", ("--dns", DAEMON_UPSTREAM)
    first = start_daemon(tmp_path, name, bip, True, *args)
    second: Daemon | None = None
    try:
        first.cli("load", "-i", str(busybox_archive), check=True)
        first.cli("network", "create", "--subnet", "10.185.3.0/24", "pyen-net3", check=True)
        # One lookup a second, for at most 60 s: some of them while no daemon runs.
        script = "for i in $(seq 60); do nslookup -type=a pyen-restart.example.test; sleep 1; done"
        first.cli(
            "run", "-d", "--name", "pyen-restart", "--network", "pyen-net3",
            "--dns", OWN_UPSTREAM, "busybox", "sh", "-c", script, check=True,
        )  # fmt: skip
        stop_daemon(first)
        asked_before = own.queries.count("pyen-restart.example.test.")
        second = start_daemon(tmp_path, name, bip, True, *args)
        deadline = time.monotonic() + 20
        while own.queries.count("pyen-restart.example.test.") <= asked_before:
            assert time.monotonic() < deadline, "the adopted container's upstream was not asked"
            time.sleep(0.2)
        assert "pyen-restart.example.test." not in daemon_wide.queries
    finally:
        d = second or first
        if second is None and first.process.poll() is not None:
            d = start_daemon(tmp_path, name, bip, True, *args)
        d.cli("rm", "-f", "pyen-restart")
        d.cli("network", "rm", "pyen-net3")
        stop_daemon(d)
    assert_nothing_left(d)


def test_daemon_refuses_a_bad_host_gateway_ip(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "pyengined"), "-H", f"unix://{tmp_path}/s.sock", "--data-root",
         str(tmp_path / "data"), "--host-gateway-ip", "pyen-nope"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert out.returncode != 0
    assert "--host-gateway-ip" in out.stderr and "not an IP address" in out.stderr, out.stderr
    assert not (tmp_path / "data").exists()

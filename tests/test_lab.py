"""The namespace lab (lab/, python -m lab): ``up``/``down``/``status`` and every exercise of
docs/lab.md, run through the real command line against real daemons, namespaces and packets.

The lab under test uses names and addresses no other test uses: prefix ``pyelabt`` (links
``pyelabt-*``, namespace ``pyelabt-client``, nft tables ``pyelabt_*``), the client link
198.18.202.0/24 and bridges 10.202.0.0/24 and 10.202.1.0/24; the rollback and iptables tests
use ``pyelabr`` / ``pyelabi`` and their own subnets. Traffic goes only to 127.0.0.1, to the
lab's client namespace and to the lab's bridges.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.plan import LabError, LabOptions, plan
from tests.conftest import REPO, require_root, require_tool
from tests.netns_helpers import free_port_block, links_with_prefix, netns_with_prefix

LAB_TOOLS = ("ip", "runc", "curl", "tcpdump", "conntrack", "ab", "ss", "nft", "iptables-save")
UP_TIMEOUT = 300  # seconds: builds the nginx image first when it is not cached (~30 s)


@dataclass(frozen=True)
class LabUnderTest:
    directory: Path
    prefix: str
    client_subnet: str
    proxy_bip: str
    dnat_bip: str
    proxy_port: int
    dnat_port: int
    backend: str = "nftables"

    @property
    def host_ip(self) -> str:
        return self.client_subnet.rsplit(".", 1)[0] + ".1"

    @property
    def client_ip(self) -> str:
        return self.client_subnet.rsplit(".", 1)[0] + ".2"

    @property
    def proxy_gateway(self) -> str:
        return self.proxy_bip.split("/")[0]

    @property
    def dnat_gateway(self) -> str:
        return self.dnat_bip.split("/")[0]

    def up_args(self) -> list[str]:
        return [
            "up",
            "--prefix",
            self.prefix,
            "--client-subnet",
            self.client_subnet,
            "--proxy-bip",
            self.proxy_bip,
            "--dnat-bip",
            self.dnat_bip,
            "--proxy-port",
            str(self.proxy_port),
            "--dnat-port",
            str(self.dnat_port),
            "--firewall-backend",
            self.backend,
        ]

    def state(self) -> dict:
        return json.loads((self.directory / "lab.json").read_text())

    def inspect_web(self, role: str) -> dict:
        """``pyengine inspect web`` of the ``role`` daemon."""
        host = f"unix://{self.directory / role / f'{role}.sock'}"
        out = subprocess.run(
            [str(Path(sys.executable).parent / "pyengine"), "-H", host, "inspect", "web"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return json.loads(out)[0]

    def web_ip(self, role: str) -> str:
        return self.inspect_web(role)["NetworkSettings"]["IPAddress"]


def lab_command(
    lab_dir: Path, *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", "--dir", str(lab_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def exercise(lab: LabUnderTest, name: str) -> str:
    result = lab_command(lab.directory, "exercise", name)
    assert result.returncode == 0, f"exercise {name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def section(output: str, title_part: str) -> str:
    """The text of the ``## ...`` section whose title contains ``title_part``."""
    for part in output.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        if title_part in title:
            return body
    raise AssertionError(f"no section {title_part!r} in:\n{output}")


def assert_lab_gone(lab: LabUnderTest) -> None:
    assert links_with_prefix(f"{lab.prefix}-") == []
    assert netns_with_prefix(f"{lab.prefix}-") == []
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert f"inet {lab.prefix}_" not in tables
    saved = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert f"{lab.prefix.upper()}_" not in saved
    procs = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert str(lab.directory) not in procs, "a process of the lab is still running"
    assert str(lab.directory) not in Path("/proc/mounts").read_text()
    assert not (lab.directory / "lab.json").exists()


def bring_down(lab: LabUnderTest) -> None:
    if (lab.directory / "lab.json").exists():
        result = lab_command(lab.directory, "down")
        assert result.returncode == 0, result.stderr
    assert_lab_gone(lab)


def require_lab_tools() -> None:
    require_root()
    for tool in LAB_TOOLS:
        require_tool(tool)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabUnderTest]:
    require_lab_tools()
    port = free_port_block(2)
    under_test = LabUnderTest(
        directory=tmp_path_factory.mktemp("lab") / "pyelabt",
        prefix="pyelabt",
        client_subnet="198.18.202.0/24",
        proxy_bip="10.202.0.1/24",
        dnat_bip="10.202.1.1/24",
        proxy_port=port,
        dnat_port=port + 1,
    )
    try:
        result = lab_command(under_test.directory, *under_test.up_args(), timeout=UP_TIMEOUT)
        assert result.returncode == 0, f"lab up failed:\n{result.stdout}\n{result.stderr}"
        yield under_test
    finally:
        bring_down(under_test)


# -- without privileges ---------------------------------------------------------------------


def test_plan_names_fit_interface_names() -> None:
    lab = plan(LabOptions(directory=Path("/nonexistent"), prefix="pyelab123"))
    names = [d.bridge for d in lab.daemons]
    assert lab.client is not None
    names.append(lab.client.host_if)
    assert all(len(name) <= 15 for name in names), names
    assert [d.table for d in lab.daemons] == ["pyelab123_proxy", "pyelab123_dnat"]
    assert lab.client.host_ip == "198.18.200.1" and lab.client.client_ip == "198.18.200.2"
    assert [d.userland_proxy for d in lab.daemons] == [True, False]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (LabOptions(prefix="lab"), "invalid prefix"),
        (LabOptions(prefix="pyelab1234"), "invalid prefix"),
        (LabOptions(proxy_port=9000, dnat_port=9000), "different host ports"),
        (LabOptions(client_subnet="198.18.200.0/31"), "too small"),
        (LabOptions(client_subnet="198.18.200.1/24"), "invalid client subnet"),
        (LabOptions(dnat_bip="10.201.1.0/24"), "must be a host address"),
        (LabOptions(firewall_backend="pf"), "unknown firewall backend"),
    ],
)
def test_plan_rejects_bad_options(options: LabOptions, message: str) -> None:
    with pytest.raises(LabError, match=message):
        plan(options)


def test_commands_without_a_lab_say_so(tmp_path: Path) -> None:
    for args in (["status"], ["down"], ["exercise", "publish"]):
        result = lab_command(tmp_path / "none", *args)
        assert result.returncode == 1
        assert "no lab is up in" in result.stderr


# -- the lab and its exercises (in docs/lab.md's order) ---------------------------------------


def test_status_shows_both_daemons_answering(lab: LabUnderTest) -> None:
    result = lab_command(lab.directory, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"client: netns {lab.prefix}-client (present), eth0 {lab.client_ip}/24" in out
    assert f"host end: {lab.prefix}-veth {lab.host_ip}/24 (present)" in out
    assert "proxy: pyengined --userland-proxy=true pid" in out
    assert "dnat: pyengined --userland-proxy=false pid" in out
    assert out.count(" answering") == 2
    assert f"bridge {lab.prefix}-proxy {lab.proxy_bip} (present)" in out
    assert f"bridge {lab.prefix}-dnat {lab.dnat_bip} (present)" in out


def test_up_refuses_a_second_lab_in_the_same_directory(lab: LabUnderTest) -> None:
    result = lab_command(lab.directory, *lab.up_args())
    assert result.returncode == 1
    assert "a lab is already up in" in result.stderr
    assert lab_command(lab.directory, "status").stdout.count(" answering") == 2


def test_exercise_publish(lab: LabUnderTest) -> None:
    out = exercise(lab, "publish")
    for role, port in (("proxy", lab.proxy_port), ("dnat", lab.dnat_port)):
        mode = "userland proxy" if role == "proxy" else "kernel DNAT"
        published = section(out, f"{mode} (pyengined")
        # Docker 28: with the proxy, [::] too (tests/test_netd_ipv6.py).
        ports = f"0.0.0.0:{port}->80/tcp" + (f", [::]:{port}->80/tcp" if role == "proxy" else "")
        assert f"{ports}   web" in published
        assert f"80/tcp -> 0.0.0.0:{port}" in published
        assert (f"80/tcp -> [::]:{port}" in published) == (role == "proxy")
        assert f'"IPAddress": "{lab.web_ip(role)}"' in published
        reached = section(out, f"{mode}: reach it")
        assert f"200 from {lab.host_ip}:{port}" in reached
        assert f"200 from 127.0.0.1:{port}" in reached


def test_exercise_packets(lab: LabUnderTest) -> None:
    out = exercise(lab, "packets")
    host_if, client, host = f"{lab.prefix}-veth", lab.client_ip, lab.host_ip
    proxy_web, dnat_web = lab.web_ip("proxy"), lab.web_ip("dnat")
    port = r"\.\d+"

    def has(text: str, pattern: str) -> None:
        assert re.search(pattern, text, re.M), f"{pattern!r} not in:\n{text}"

    # From the client, both modes: DNAT in prerouting, the client's address kept.
    for role, web, hport in (
        ("dnat", dnat_web, lab.dnat_port),
        ("proxy", proxy_web, lab.proxy_port),
    ):
        mode = "kernel DNAT" if role == "dnat" else "userland proxy"
        text = section(out, f"{mode}: the client connects")
        bridge = f"{lab.prefix}-{role}"
        has(text, rf"^{host_if} In  IP {client}{port} > {host}\.{hport}: Flags \[S\]")
        has(text, rf"^{bridge} Out IP {client}{port} > {web}\.80: Flags \[S\]")
        has(text, rf"^{bridge} In  IP {web}\.80 > {client}{port}: Flags \[S\.\]")
        has(text, rf"^{host_if} Out IP {host}\.{hport} > {client}{port}: Flags \[S\.\]")
    # Loopback through the proxy: one connection on lo, another from the gateway.
    text = section(out, "userland proxy: the host connects to 127.0.0.1")
    has(text, rf"^lo\s+In  IP 127\.0\.0\.1{port} > 127\.0\.0\.1\.{lab.proxy_port}: Flags \[S\]")
    gateway = re.escape(lab.proxy_gateway)
    has(text, rf"^{lab.prefix}-proxy Out IP {gateway}{port} > {proxy_web}\.80: Flags \[S\]")
    # Loopback with kernel DNAT: never on lo, masqueraded to the gateway on the bridge.
    text = section(out, "kernel DNAT: the host connects to 127.0.0.1")
    gateway = re.escape(lab.dnat_gateway)
    has(text, rf"^{lab.prefix}-dnat Out IP {gateway}{port} > {dnat_web}\.80: Flags \[S\]")
    assert not re.search(r"^lo\s", text, re.M), text


def test_exercise_conntrack(lab: LabUnderTest) -> None:
    out = exercise(lab, "conntrack")
    proxy_web, dnat_web = lab.web_ip("proxy"), lab.web_ip("dnat")
    text = section(out, "kernel DNAT: the client's connection")
    assert re.search(
        rf"src={lab.client_ip} dst={lab.host_ip} sport=\d+ dport={lab.dnat_port} "
        rf"src={dnat_web} dst={lab.client_ip} sport=80 ",
        text,
    ), text
    text = section(out, "kernel DNAT: a loopback connection")
    assert re.search(
        rf"src=127\.0\.0\.1 dst=127\.0\.0\.1 sport=\d+ dport={lab.dnat_port} "
        rf"src={dnat_web} dst={lab.dnat_gateway} sport=80 ",
        text,
    ), text
    text = section(out, "userland proxy: a loopback connection is two")
    assert re.search(
        rf"src=127\.0\.0\.1 dst=127\.0\.0\.1 sport=\d+ dport={lab.proxy_port} "
        rf"src=127\.0\.0\.1 dst=127\.0\.0\.1 sport={lab.proxy_port} ",
        text,
    ), text
    assert re.search(
        rf"src={lab.proxy_gateway} dst={proxy_web} sport=\d+ dport=80 "
        rf"src={proxy_web} dst={lab.proxy_gateway} sport=80 ",
        text,
    ), text


def _drop_counter(listing: str, subnet: str) -> int:
    found = re.search(
        rf"ip daddr {re.escape(subnet)} .*counter packets (\d+) bytes \d+ drop", listing
    )
    assert found, listing
    return int(found.group(1))


def test_exercise_counters(lab: LabUnderTest) -> None:
    out = exercise(lab, "counters")
    dnat_web = lab.web_ip("dnat")
    status = section(out, "kernel DNAT: what netd installed")
    assert "userland proxy: off (kernel DNAT only)" in status
    assert re.search(rf"tcp 0\.0\.0\.0:{lab.dnat_port} -> {dnat_web}:80\s+yes", status), status
    assert f"Firewall (nftables, table inet {lab.prefix}_dnat), live from the kernel" in status
    text = section(out, "routes straight to the container")
    assert "curl: (28)" in text  # the SYNs were dropped: the connection timed out
    assert _drop_counter(text, "10.202.1.0/24") > 0
    status = section(out, "userland proxy: what netd installed")
    assert "userland proxy: on" in status
    assert f'iifname "{lab.prefix}-proxy" return' in status


def test_exercise_proxy(lab: LabUnderTest) -> None:
    out = exercise(lab, "proxy")
    proxy_web = re.escape(lab.web_ip("proxy"))
    text = section(out, "userland proxy: listening sockets")
    assert re.search(rf"LISTEN .* 0\.0\.0\.0:{lab.proxy_port} .*\"pyengine-proxy\"", text), text
    assert "HTTP/1.1 200 OK" in text
    upstream = (
        rf"{re.escape(lab.proxy_gateway)}:\d+\s+{proxy_web}:80\s+users:\(\(\"pyengine-proxy\""
    )
    assert re.search(upstream, text), text
    assert re.search(rf"127\.0\.0\.1:{lab.proxy_port}\s+127\.0\.0\.1:\d+ .*pyengine-proxy", text)
    text = section(out, "kernel DNAT: listening sockets")
    assert "HTTP/1.1 200 OK" in text
    assert "pyengine-proxy" not in text and "LISTEN" not in text
    assert re.search(rf"127\.0\.0\.1:\d+\s+127\.0\.0\.1:{lab.dnat_port}\s+users:\(\(\"bash\"", text)


def test_exercise_client_address(lab: LabUnderTest) -> None:
    out = exercise(lab, "client-address")
    for mode, gateway in (
        ("userland proxy", lab.proxy_gateway),
        ("kernel DNAT", lab.dnat_gateway),
    ):
        seen = {}
        for line in section(out, f"{mode}: four clients").splitlines():
            found = re.match(
                r'^(\S+) - - \[.*\] "GET / HTTP/1\.[01]" 200 \d+ "-" "(lab-[a-z-]+)"$', line
            )
            if found:
                seen[found.group(2)] = found.group(1)
        assert seen == {
            "lab-client-netns": lab.client_ip,
            "lab-host-loopback": gateway,
            "lab-host-veth": lab.host_ip,
            "lab-container": gateway,
        }, out


def test_exercise_bench(lab: LabUnderTest) -> None:
    out = exercise(lab, "bench")
    assert len(re.findall(r"^Failed requests:\s+0$", out, re.M)) == 4, out
    assert len(re.findall(r"^Requests per second:\s+[\d.]+ \[#/sec\] \(mean\)$", out, re.M)) == 4


# -- failures and other backends --------------------------------------------------------------


def test_failed_up_leaves_nothing(tmp_path: Path) -> None:
    """An image that cannot be loaded fails ``up`` after the namespace and both daemons exist:
    all of it is removed again."""
    require_lab_tools()
    cache = tmp_path / "images"
    cache.mkdir()
    for name in ("nginx", "busybox"):
        (cache / f"{name}-oci.tar").write_bytes(b"not a tar archive")
    port = free_port_block(2)
    failing = LabUnderTest(
        directory=tmp_path / "pyelabr",
        prefix="pyelabr",
        client_subnet="198.18.205.0/24",
        proxy_bip="10.205.0.1/24",
        dnat_bip="10.205.1.1/24",
        proxy_port=port,
        dnat_port=port + 1,
    )
    env = dict(os.environ, IMAGE_CACHE=str(cache))
    try:
        result = lab_command(failing.directory, *failing.up_args(), env=env)
        assert result.returncode == 1
        assert "load -i" in result.stderr, result.stderr
        assert f"+ ip netns add {failing.prefix}-client" in result.stdout  # it got that far
        assert f"--userland-proxy=false >{failing.directory}" in result.stdout
    finally:
        bring_down(failing)


def test_iptables_backend_and_down_after_a_daemon_crash(tmp_path: Path) -> None:
    """The counters exercise on the iptables backend (per-port DNAT rules with counters); then
    the kernel-DNAT daemon is killed with its container running, and ``down`` still removes
    the container's namespace and veth."""
    require_lab_tools()
    port = free_port_block(2)
    ipt = LabUnderTest(
        directory=tmp_path / "pyelabi",
        prefix="pyelabi",
        client_subnet="198.18.204.0/24",
        proxy_bip="10.204.0.1/24",
        dnat_bip="10.204.1.1/24",
        proxy_port=port,
        dnat_port=port + 1,
        backend="iptables",
    )
    try:
        result = lab_command(ipt.directory, *ipt.up_args(), timeout=UP_TIMEOUT)
        assert result.returncode == 0, f"lab up failed:\n{result.stdout}\n{result.stderr}"
        exercise(ipt, "publish")
        out = exercise(ipt, "counters")
        dnat_web = ipt.web_ip("dnat")
        status = section(out, "kernel DNAT: what netd installed")
        assert "Firewall (iptables, " in status and "chains PYELABI_DNAT-*" in status
        text = section(out, "routes straight to the container")
        assert "curl: (28)" in text
        drop = re.search(r"^\s*(\d+)\s+\d+\s+DROP .* 10\.204\.1\.0/24\s*$", text, re.M)
        assert drop and int(drop.group(1)) > 0, text
        dnat = re.search(
            rf"^\s*(\d+)\s+\d+\s+DNAT .*tcp dpt:{ipt.dnat_port} to:{dnat_web}:80\s*$", text, re.M
        )
        assert dnat and int(dnat.group(1)) > 0, text

        crashed = ipt.state()["daemons"][1]
        assert crashed["role"] == "dnat"
        short_id = ipt.inspect_web("dnat")["Id"][:12]
        assert Path(f"/run/netns/pyengine-{short_id}").exists()
        os.kill(crashed["pid"], signal.SIGKILL)
        result = lab_command(ipt.directory, "down")
        assert result.returncode == 0, result.stderr
        assert "pyengined (dnat) is not running: starting it again to clean up" in result.stdout
        assert not Path(f"/run/netns/pyengine-{short_id}").exists()
        assert not Path(f"/sys/class/net/pye{short_id[:10]}").exists()
    finally:
        bring_down(ipt)


def test_lab_without_client_namespace(tmp_path: Path) -> None:
    """``up --no-client`` (the VM lab's engine): both daemons, no namespace or veth; the steps
    that need the client are skipped with a note, the others run."""
    require_lab_tools()
    port = free_port_block(2)
    vm = LabUnderTest(
        directory=tmp_path / "pyelabn",
        prefix="pyelabn",
        client_subnet="198.18.206.0/24",
        proxy_bip="10.206.0.1/24",
        dnat_bip="10.206.1.1/24",
        proxy_port=port,
        dnat_port=port + 1,
    )
    try:
        result = lab_command(vm.directory, *vm.up_args(), "--no-client", timeout=UP_TIMEOUT)
        assert result.returncode == 0, f"lab up failed:\n{result.stdout}\n{result.stderr}"
        assert "ip netns add" not in result.stdout
        assert "client: none" in result.stdout
        assert netns_with_prefix("pyelabn-") == [] and links_with_prefix("pyelabn-veth") == []
        out = exercise(vm, "publish")
        assert f"0.0.0.0:{vm.dnat_port}->80/tcp   web" in out
        skipped = section(out, "kernel DNAT: reach it")
        assert "(no client namespace in this lab (--no-client): run it on the client)" in skipped
        assert "curl" not in skipped
    finally:
        bring_down(vm)

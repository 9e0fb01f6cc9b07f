"""The VM lab for real: the offline box (built, or taken from its cache), ``vagrant up`` of the
``engine`` and ``client`` VMs (QEMU, libvirt session mode, vagrant-libvirt), the exercises
across them, then ``vagrant destroy -f`` and a search for anything left behind.

The host's side of all the lab's traffic must stay on 127.0.0.1: the test checks that every
socket of the VMs' QEMU processes is bound to 127.0.0.1, and that no tap/bridge link, and no
address or route in the subnets the VMs use, appeared on the host. Other test runs may add and
remove their own links and bridges meanwhile, so the comparison is about what QEMU or libvirt
could make (tun/tap devices, libvirt's vnet*/virbr* names, addresses and routes in the VMs'
subnets), not a diff of the whole host.

Runs where ``/dev/kvm`` exists; QEMU uses KVM where this user may and the CPU has VMX/SVM, and
TCG otherwise (the Vagrantfile's ACCEL). One VM run at a time on the machine (/tmp/pye-vm.lock).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.box import PACKAGES, BoxInputs
from lab.vm import CLIENT_IP, GATEWAYS, VmLab, VmRun, vm_lab
from lab.vmhost import VagrantUser
from tests.conftest import REPO, require_root, require_tool

pytestmark = pytest.mark.privileged

VM_LOCK = "/tmp/pye-vm.lock"
# The subnets of the VMs' NICs: the LAN, QEMU user-mode networking's default, and
# vagrant-libvirt's default management network (which this lab must not create).
VM_SUBNETS = tuple(
    ipaddress.ip_network(n) for n in ("192.168.56.0/24", "10.0.2.0/24", "192.168.121.0/24")
)
VM_LINK_PREFIXES = ("vnet", "virbr", "tap", "macvtap", "pyelab-engine", "pyelab-client")


def _host_network() -> dict[str, list[dict[str, object]]]:
    def ip_json(*args: str) -> list[dict[str, object]]:
        out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
        return list(json.loads(out.stdout or "[]"))

    return {
        "links": ip_json("-d", "link", "show"),
        "addrs": ip_json("addr", "show"),
        "routes": ip_json("route", "show", "table", "all"),
    }


def _vm_traces(before: dict[str, list[dict[str, object]]]) -> list[str]:
    """New host links, addresses or routes of the kind a VM's networking would add."""
    after = _host_network()
    old_links = {str(link["ifname"]) for link in before["links"]}
    found = []
    for link in after["links"]:
        name = str(link["ifname"])
        info = link.get("linkinfo") or {}
        kind = str(info.get("info_kind", "")) if isinstance(info, dict) else ""
        new = name not in old_links
        if new and (name.startswith(VM_LINK_PREFIXES) or kind == "tun"):
            found.append(f"link {name} ({kind})")
    for addr in after["addrs"]:
        for entry in addr.get("addr_info", []) or []:  # type: ignore[attr-defined]
            ip = ipaddress.ip_address(entry["local"])
            if any(ip in net for net in VM_SUBNETS):
                found.append(f"address {ip} on {addr['ifname']}")
    for route in after["routes"]:
        dst = str(route.get("dst", ""))
        if dst in ("", "default") or route.get("type") in ("local", "broadcast", "multicast"):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if any(net.overlaps(vm) for vm in VM_SUBNETS if vm.version == net.version):
            found.append(f"route {dst} dev {route.get('dev')}")
    return found


def _qemu_sockets(lab: VmLab) -> list[str]:
    """Every TCP/UDP socket of the lab user's QEMU processes: local address and peer."""
    out = subprocess.run(["ss", "-Htuanp"], capture_output=True, text=True, check=True).stdout
    pids = {
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _owned_qemu(p, lab.user.uid)
    }
    return [
        f"{line.split()[4]} -> {line.split()[5]}"
        for line in out.splitlines()
        if any(f"pid={pid}," in line for pid in pids)
    ]


def _owned_qemu(proc: Path, uid: int) -> bool:
    try:
        return proc.stat().st_uid == uid and (proc / "comm").read_text().startswith("qemu")
    except OSError:
        return False


def _live_processes(user: VagrantUser) -> list[str]:
    """Every process of the lab's own user still running (zombies aside) a few seconds after
    ``down``: QEMU, libvirt's session daemon, Vagrant, ssh. None when Vagrant runs as root."""
    if not user.is_lab_user:
        return []
    found: list[str] = []
    for _ in range(50):
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or proc.stat().st_uid != user.uid:
                    continue
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(f"process {proc.name} {(proc / 'comm').read_text().strip()}")
            except OSError:
                continue
        if not found:
            break
        time.sleep(0.1)
    return found


def _loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    return host == "*" or ipaddress.ip_address(host).is_loopback


@pytest.fixture(scope="module")
def vm_run() -> Iterator[tuple[VmRun, dict[str, float], list[str], list[str]]]:
    if not os.path.exists("/dev/kvm"):
        # Hardware, not a missing tool or privilege: a skip even under CI=true.
        pytest.skip("no /dev/kvm: this machine cannot run the lab's VMs")
    require_root()
    for tool in ("vagrant", "virsh", "qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4"):
        require_tool(tool)
    lines: list[str] = []
    with open(VM_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab = vm_lab(lines.append)
        lab.down()  # what an interrupted earlier run left
        before = _host_network()
        timings: dict[str, float] = {}
        sockets: list[str] = []
        try:
            timings = lab.up()
            started = time.monotonic()
            run = lab.exercise()
            timings["exercise"] = time.monotonic() - started
            sockets = _qemu_sockets(lab)
            traces = _vm_traces(before)
        finally:
            started = time.monotonic()
            left = lab.down()
            timings["destroy"] = time.monotonic() - started
            print("\n".join(lines[-40:]))
        problems = traces + _vm_traces(before) + left + _live_processes(lab.user)
    print("VM lab timings:", {k: round(v) for k, v in timings.items()})
    yield run, timings, sockets, problems


@pytest.mark.vm
def test_client_vm_reaches_both_published_ports(vm_run: tuple) -> None:
    run = vm_run[0]
    for role, port in (("proxy", 8081), ("dnat", 8082)):
        assert run.client_view[role] == f"200 from 192.168.56.10:{port}", run.client_view


@pytest.mark.vm
def test_client_address_per_path(vm_run: tuple) -> None:
    run = vm_run[0]
    # From the LAN both daemons DNAT (as dockerd does with or without its userland proxy):
    # nginx sees the client VM. The engine's own loopback request comes through the proxy
    # (proxy mode) or DNAT plus masquerade: either way from the bridge's gateway.
    assert run.logged_client == {"proxy": CLIENT_IP, "dnat": CLIENT_IP}
    assert run.logged_loopback == GATEWAYS


@pytest.mark.vm
def test_tcpdump_on_the_engine_bridge_sees_the_client(vm_run: tuple) -> None:
    run = vm_run[0]
    for role in ("proxy", "dnat"):
        lines = run.bridge_capture[role].splitlines()
        assert len(lines) == 2, run.bridge_capture[role]
        assert lines[0].startswith(f"IP {CLIENT_IP}.") and "Flags [S]," in lines[0]
        assert "Flags [S.]" in lines[1]


@pytest.mark.vm
def test_lan_probe_straight_to_the_container_gets_nothing(vm_run: tuple) -> None:
    run = vm_run[0]
    assert run.direct_probe == {"proxy": 28, "dnat": 28}  # curl: timed out, dropped


@pytest.mark.vm
def test_host_side_is_loopback_only_and_nothing_is_left(vm_run: tuple) -> None:
    _run, timings, sockets, problems = vm_run
    assert sockets, "no socket of the VMs' QEMU processes found"
    assert all(_loopback(s.split(" -> ")[0]) for s in sockets), sockets
    assert problems == []
    assert timings["destroy"] < 120


def test_box_key_is_stable_and_follows_its_inputs() -> None:
    inputs = BoxInputs(
        "bookworm", "http://deb.debian.org/debian", PACKAGES, "ssh-rsa AAAA vagrant\n"
    )
    assert inputs.key() == BoxInputs(**{**inputs.__dict__, "packages": PACKAGES[::-1]}).key()
    assert inputs.key() != BoxInputs(**{**inputs.__dict__, "packages": PACKAGES[1:]}).key()


def test_vagrantfile_validates_with_the_libvirt_provider(tmp_path: Path) -> None:
    """``vagrant validate`` with vagrant-libvirt installed also checks the provider blocks
    (``make lab-validate`` cannot: it runs without a provider)."""
    require_tool("vagrant")
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_HOME": str(tmp_path)}
    env["PYENGINE_LAB_STAGE"] = str(tmp_path / "stage")
    result = subprocess.run(
        ["vagrant", "validate"], cwd=REPO / "vagrant", env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout

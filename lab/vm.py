"""The VM lab driven from the host: ``python -m lab vm up | exercise | down``.

``up`` builds (or reuses) the box, stages what the engine VM installs from and runs
``vagrant up``; ``exercise`` runs docs/lab.md's exercises across the two VMs over SSH (through
the 127.0.0.1 forwards) and shows each command with its output; ``down`` is
``vagrant destroy -f`` plus the checks that nothing of the lab is left.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.box import cached_box
from lab.plan import ROLES, LabError
from lab.vmhost import (
    VagrantUser,
    add_box,
    install_vagrantfile,
    leftovers,
    remove_box_volume,
    stage,
    stop_session_daemon,
    vagrant_user,
)

ENGINE_IP = "192.168.56.10"
CLIENT_IP = "192.168.56.11"
PORTS = {"proxy": 8081, "dnat": 8082}
GATEWAYS = {"proxy": "10.201.0.1", "dnat": "10.201.1.1"}
VENV = "/opt/pyelab-venv"
SRC = "/opt/pyelab/src"
SSH_TIMEOUT = 180.0


def _pyengine(role: str) -> str:
    return f"sudo {VENV}/bin/pyengine -H unix:///var/lib/pyengine-lab/{role}/{role}.sock"


@dataclass
class Step:
    machine: str
    command: str
    output: str
    returncode: int


@dataclass
class VmRun:
    """The outcome of the exercises: every step, and the facts the test asserts."""

    steps: list[Step] = field(default_factory=list)
    client_view: dict[str, str] = field(default_factory=dict)  # role -> curl's status line
    logged_client: dict[str, str] = field(default_factory=dict)  # role -> nginx's $remote_addr
    logged_loopback: dict[str, str] = field(default_factory=dict)  # the engine's own request
    bridge_capture: dict[str, str] = field(default_factory=dict)  # role -> tcpdump's lines
    direct_probe: dict[str, int] = field(default_factory=dict)  # role -> curl's exit status


class VmLab:
    def __init__(self, user: VagrantUser, echo: Callable[[str], None]) -> None:
        self.user = user
        self.echo = echo

    def vagrant(self, *args: str, timeout: float = 900.0) -> str:
        self.echo("+ vagrant " + " ".join(args))
        return self.user.check(["vagrant", *args], timeout)

    def prepare(self) -> dict[str, float]:
        """Everything ``vagrant up`` needs: the box (built or cached, and added to Vagrant) and
        the stage; returns the seconds each part took."""
        timings: dict[str, float] = {}
        started = time.monotonic()
        box = cached_box(self.echo)
        timings["box"] = time.monotonic() - started
        started = time.monotonic()
        install_vagrantfile(self.user)
        add_box(self.user, box, self.echo)
        stage(self.user, self.echo)
        timings["stage"] = time.monotonic() - started
        return timings

    def up(self) -> dict[str, float]:
        """``prepare``, then ``vagrant up`` and the provisioners; the seconds of each part."""
        timings = self.prepare()
        started = time.monotonic()
        self.vagrant("up", "--no-provision")
        timings["boot"] = time.monotonic() - started
        started = time.monotonic()
        self.vagrant("provision")
        timings["provision"] = time.monotonic() - started
        return timings

    def ssh(
        self, machine: str, command: str, timeout: float = SSH_TIMEOUT, show: bool = True
    ) -> Step:
        """One command on a VM, through Vagrant's SSH (127.0.0.1:<forwarded port>)."""
        result = self.user.run(["vagrant", "ssh", machine, "-c", command], timeout)
        step = Step(machine, command, (result.stdout + result.stderr).strip(), result.returncode)
        self.echo(f"[{machine}]$ {command}")
        if step.output and show:
            self.echo(step.output)
        return step

    def exercise(self) -> VmRun:
        """``lab exercise publish`` on the engine, then each daemon's paths from the client."""
        run = VmRun()
        self._on(run, "engine", f"cd {SRC} && sudo {VENV}/bin/python -m lab exercise publish")
        web_ips = {}
        for role in ROLES:
            inspect = self._on(run, "engine", f"{_pyengine(role)} inspect web", show=False)
            web_ips[role] = _container_ip(inspect.output)
            self.echo(f"web ({role}): {web_ips[role]}")
        for role in ROLES:
            self._exercise_daemon(run, role, web_ips[role])
        return run

    def _on(
        self, run: VmRun, machine: str, command: str, ok: bool = True, show: bool = True
    ) -> Step:
        step = self.ssh(machine, command, show=show)
        run.steps.append(step)
        if ok and step.returncode != 0:
            raise LabError(f"{machine}: {command}: exit {step.returncode}")
        return step

    def _exercise_daemon(self, run: VmRun, role: str, web_ip: str) -> None:
        port, pcap = PORTS[role], f"/tmp/pyelab-{role}.pcap.txt"
        # tcpdump on the engine's bridge (the SYN and the SYN-ACK) while the client connects
        # through the LAN; detached, so that the SSH session ends at once.
        self._on(
            run,
            "engine",
            f'sudo sh -c "timeout 60 tcpdump -i pyelab-{role} -l -tnn -c 2 '
            f"'tcp port 80 and tcp[tcpflags] & tcp-syn != 0' </dev/null "
            f'>{pcap} 2>/dev/null &"; sleep 3',
        )
        fmt = "'%{http_code} from %{remote_ip}:%{remote_port}\\n'"
        view = self._on(
            run,
            "client",
            f"curl -sS -o /dev/null -A lab-client-vm -w {fmt} http://{ENGINE_IP}:{port}/",
        )
        run.client_view[role] = view.output.strip()
        capture = self._on(
            run,
            "engine",
            f"for i in $(seq 100); do [ $(wc -l < {pcap}) -ge 2 ] && break; sleep 0.2; done; "
            f"cat {pcap}",
        )
        run.bridge_capture[role] = capture.output
        # The engine's own loopback connection: the userland proxy's path in proxy mode
        # (nginx sees the bridge's gateway), DNAT plus masquerade in the other.
        self._on(
            run, "engine", f"curl -sS -o /dev/null -A lab-engine-loopback http://127.0.0.1:{port}/"
        )
        logged = self._on(run, "engine", f"{_pyengine(role)} logs web 2>/dev/null | grep ' \"lab-'")
        run.logged_client[role] = _logged_address(logged.output, "lab-client-vm")
        run.logged_loopback[role] = _logged_address(logged.output, "lab-engine-loopback")
        # The LAN probe: the client routes to the container itself, around the published
        # port; netd drops it (docs/lab.md, "counters").
        probe = self._on(
            run, "client", f"curl -sS --max-time 3 -o /dev/null http://{web_ip}/", ok=False
        )
        run.direct_probe[role] = probe.returncode

    def down(self) -> list[str]:
        """``vagrant destroy -f``, then the box's pool volume and the session daemon; returns
        what is still there."""
        try:
            self.vagrant("destroy", "-f", timeout=300)
        finally:
            remove_box_volume(self.user)
            stop_session_daemon(self.user)
        left: list[str] = []
        for _ in range(50):
            left = leftovers(self.user)
            if not left:
                break
            time.sleep(0.2)
        stop_session_daemon(self.user)
        return left


def _logged_address(access_log: str, agent: str) -> str:
    """nginx's ``$remote_addr`` (the first field) of the last request made as ``agent``."""
    lines = [line for line in access_log.splitlines() if f'"{agent}"' in line]
    return lines[-1].split(" ")[0] if lines else ""


def _container_ip(inspect_output: str) -> str:
    """The container's address from ``pyengine inspect`` run in the engine VM (whose output is
    the VM's to choose: checked to be an IPv4 address before it goes into a command line)."""
    try:
        data = json.loads(inspect_output)
        item = data[0] if isinstance(data, list) else data
        networks = item["NetworkSettings"]["Networks"]
        address = str(ipaddress.IPv4Address(next(iter(networks.values()))["IPAddress"]))
    except (ValueError, KeyError, TypeError, IndexError, StopIteration):
        raise LabError("pyengine inspect web: no IPv4 address in its output") from None
    return address


def vm_lab(echo: Callable[[str], None]) -> VmLab:
    return VmLab(vagrant_user(), echo)

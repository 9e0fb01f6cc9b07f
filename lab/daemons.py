"""The lab's two pyengined daemons: started through engine/launcher.py under the lab's names,
known across commands by the pid in the state file, stopped with their containers, and what a
daemon that died left behind removed."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from engine.launcher import DaemonOptions, LaunchedDaemon, LaunchError, answers, launch, stop_pid
from engine.runtime.rootfs import mounts_under
from lab.commands import command_env, run
from lab.plan import LabDaemon, LabError, LabState
from lab.topology import link_exists
from netd.firewall import make_firewall

DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 60.0


def daemon_options(d: LabDaemon, backend: str) -> DaemonOptions:
    return DaemonOptions(
        socket_path=d.socket_path,
        data_root=d.data_root,
        bridge=d.bridge,
        bip=d.bip,
        firewall_table=d.table,
        userland_proxy=d.userland_proxy,
        firewall_backend=backend,
    )


def start_daemon(d: LabDaemon, backend: str, echo: Callable[[str], None]) -> LaunchedDaemon:
    options = daemon_options(d, backend)
    echo("+ " + " ".join(options.argv()) + f" >{d.log_path} 2>&1 &")
    return launch(options, d.log_path, append=True, env=command_env())


def wait_ready(d: LabDaemon, launched: LaunchedDaemon) -> None:
    try:
        launched.wait_until_answering(f"pyengined ({d.role})", DAEMON_START_TIMEOUT)
    except LaunchError as exc:
        if exc.returncode is not None:
            tail = " | ".join(exc.tail(5))
            raise LabError(f"pyengined ({d.role}) exited at start: {tail}") from None
        raise LabError(
            f"pyengined ({d.role}) did not answer within {DAEMON_START_TIMEOUT:.0f} s"
        ) from None


def daemon_answers(d: LabDaemon) -> bool:
    return answers(d.socket_path)


def is_ours(d: LabDaemon) -> bool:
    """Whether ``d.pid`` is still that daemon (and not a recycled pid)."""
    if d.pid <= 0:
        return False
    try:
        args = Path(f"/proc/{d.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return d.host.encode() in args and b"zombie" not in _proc_state(d.pid)


def _proc_state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().split(b"State:")[1].split(b"\n")[0]
    except (OSError, IndexError):
        return b""


def stop_daemon(d: LabDaemon) -> list[str]:
    """Remove the daemon's containers, then stop it; returns the containers' short ids."""
    if not is_ours(d):
        return []
    ids: list[str] = []
    if daemon_answers(d):
        ids = run([*d.pyengine(), "ps", "-a", "-q"]).stdout.split()
        if ids:
            run([*d.pyengine(), "rm", "-f", *ids])
    stop_pid(d.pid, lambda: is_ours(d), DAEMON_STOP_TIMEOUT)
    return ids


def processes_under(root: Path) -> list[int]:
    """The daemon and container monitors working under ``root`` (their arguments name it)."""
    prefix = str(root)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        ours = any(a.endswith("/pyengined") for a in args[:2]) or "engine.runtime.monitor" in args
        paths = (a.removeprefix("unix://") for a in args)
        if ours and any(a == prefix or a.startswith(f"{prefix}/") for a in paths):
            found.append(int(entry.name))
    return found


def restart_for_shutdown(lab: LabState, d: LabDaemon) -> None:
    """A daemon that died leaves containers, namespaces and rules behind; the daemon's own
    recovery (netd's setup(), the engine's recover()) knows them, so start it once more and
    let the normal shutdown remove them."""
    if not d.data_root.exists():
        return
    launched = start_daemon(d, lab.firewall_backend, lambda _line: None)
    d.pid = launched.process.pid
    try:
        wait_ready(d, launched)
    except LabError:
        stop_daemon(d)


def remove_daemon_leftovers(lab: LabState, d: LabDaemon) -> None:
    """What a daemon that could not shut down cleanly left: its containers' processes, its
    bridge, its firewall and its mounts (all named after the lab or under its directory)."""
    runc_root = d.data_root / "runc"
    if runc_root.is_dir():
        for container in run(["runc", "--root", str(runc_root), "list", "-q"]).stdout.split():
            run(["runc", "--root", str(runc_root), "delete", "--force", container])
    for pid in processes_under(Path(d.root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if link_exists(d.bridge):
        run(["ip", "link", "del", d.bridge])
    with contextlib.suppress(Exception):
        firewall = make_firewall(lab.firewall_backend, d.table, d.userland_proxy)
        if firewall.installed():
            firewall.uninstall()
    for point in mounts_under(Path(d.root)):
        run(["umount", "-l", point])

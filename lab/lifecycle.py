"""Bringing the lab up and down, and reporting on it: ``up`` checks, records its intent, then
builds the client, starts both daemons and loads the images; ``down`` removes all of it."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from engine.runtime.rootfs import mounts_under
from lab.commands import check, require_tools, run, say
from lab.daemons import (
    daemon_answers,
    is_ours,
    processes_under,
    remove_daemon_leftovers,
    restart_for_shutdown,
    start_daemon,
    stop_daemon,
    wait_ready,
)
from lab.plan import STATE_FILE, LabError, LabOptions, LabState, plan
from lab.topology import (
    check_free_port,
    check_free_subnets,
    create_client,
    delete_client,
    link_exists,
    netns_exists,
)
from netd.firewall import make_firewall

IMAGE_CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/cache/pyengine/images"))
LAB_IMAGES = ("nginx", "busybox")


def _image_archive(name: str, echo: Callable[[str], None]) -> Path:
    path = IMAGE_CACHE / f"{name}-oci.tar"
    if not path.exists():
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        say(echo, [sys.executable, "-m", "engine.images.build", name, "--out", str(path)])
    return path


def up(options: LabOptions, echo: Callable[[str], None] = click.echo) -> LabState:
    """Build the lab; on any failure remove what was made and raise LabError."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, pyengined)")
    require_tools("ip", "runc", "curl")
    lab = plan(options)
    directory = Path(lab.directory)
    if (directory / STATE_FILE).exists():
        raise LabError(f"a lab is already up in {directory} (python -m lab down)")
    subnets = {f"{d.role} bridge": ipaddress.IPv4Network(d.subnet) for d in lab.daemons}
    names = [d.bridge for d in lab.daemons]
    if lab.client is not None:
        subnets["client subnet"] = ipaddress.IPv4Network(lab.client.subnet)
        names.append(lab.client.host_if)
        if netns_exists(lab.client.netns):
            raise LabError(f"network namespace {lab.client.netns} exists already")
    for name in names:
        if link_exists(name):
            raise LabError(f"interface {name} exists already")
    check_free_subnets(subnets)
    for d in lab.daemons:
        check_free_port(d.port)
    archives = [_image_archive(name, echo) for name in LAB_IMAGES]

    directory.mkdir(parents=True, exist_ok=True)
    lab.save()  # the intent first: a failed or interrupted ``up`` is undone by ``down``
    try:
        if lab.client is not None:
            create_client(lab.client, [d.subnet for d in lab.daemons], echo)
        launched = []
        for d in lab.daemons:
            launched.append(start_daemon(d, lab.firewall_backend, echo))
            d.pid = launched[-1].process.pid
            lab.save()
        for d, daemon in zip(lab.daemons, launched, strict=True):
            wait_ready(d, daemon)
        for d in lab.daemons:
            for archive in archives:
                say(echo, ["pyengine", "-H", d.host, "load", "-i", str(archive)])
        lab.ready = True
        lab.save()
    except BaseException:
        down(directory, echo=lambda _line: None)
        raise
    return lab


def leftovers(lab: LabState, containers: Iterable[str] = ()) -> list[str]:
    """Kernel objects and processes of the lab that still exist; ``containers``: ids of the
    lab's containers, whose namespaces and veths pyengined names after them (netd/naming.py)."""
    found = []
    for short_id in containers:
        if netns_exists(f"pyengine-{short_id[:12]}"):
            found.append(f"netns pyengine-{short_id[:12]}")
        if link_exists(f"pye{short_id[:10]}"):
            found.append(f"link pye{short_id[:10]}")
    links = json.loads(check(["ip", "-j", "link"]) or "[]")
    for link in links:
        if link.get("ifname", "").startswith(f"{lab.prefix}-"):
            found.append(f"link {link['ifname']}")
    for ns in json.loads(check(["ip", "-j", "netns", "list"]) or "[]"):
        if ns.get("name", "").startswith(f"{lab.prefix}-"):
            found.append(f"netns {ns['name']}")
    for d in lab.daemons:
        with contextlib.suppress(Exception):
            if make_firewall(lab.firewall_backend, d.table, d.userland_proxy).installed():
                found.append(f"{lab.firewall_backend} {d.table}")
        found += [f"process {pid} of {d.role}" for pid in processes_under(Path(d.root))]
        found += [f"mount {m}" for m in mounts_under(Path(d.root))]
    return found


def down(directory: Path, echo: Callable[[str], None] = click.echo) -> list[str]:
    """Remove the lab in ``directory``: containers, daemons, client, files. Returns what could
    not be removed (empty: everything is gone)."""
    directory = directory.resolve()
    lab = LabState.load(directory)
    containers: list[str] = []
    for d in lab.daemons:
        echo(f"stopping pyengined ({d.role}) and its containers")
        if d.pid and not is_ours(d):
            echo(f"pyengined ({d.role}) is not running: starting it again to clean up")
            restart_for_shutdown(lab, d)
        containers += stop_daemon(d)
        remove_daemon_leftovers(lab, d)
    if lab.client is not None:
        echo(f"removing {lab.client.netns} and {lab.client.host_if}")
        delete_client(lab.client)
    left = leftovers(lab, containers)
    if left:
        return left
    for d in lab.daemons:
        shutil.rmtree(d.root, ignore_errors=True)
    (directory / STATE_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()  # only when nothing else is in it
    return []


def status_text(lab: LabState) -> str:
    out = [f"lab {lab.prefix} in {lab.directory} ({lab.firewall_backend})"]
    if not lab.ready:
        out.append("  NOT READY: 'up' did not finish; run 'down'")
    c = lab.client
    if c is None:
        out.append("client: none (--no-client: the client is another machine)")
    else:
        ns_ok = "present" if netns_exists(c.netns) else "MISSING"
        if_ok = "present" if link_exists(c.host_if) else "MISSING"
        out.append(f"client: netns {c.netns} ({ns_ok}), {c.ifname} {c.client_ip}/{c.prefixlen}")
        out.append(f"  host end: {c.host_if} {c.host_ip}/{c.prefixlen} ({if_ok})")
    for d in lab.daemons:
        alive = is_ours(d)
        answering = alive and daemon_answers(d)
        state = "answering" if answering else ("NOT ANSWERING" if alive else "NOT RUNNING")
        out.append(f"{d.role}: pyengined {d.flag} pid {d.pid} {state}")
        bridge = "present" if link_exists(d.bridge) else "MISSING"
        out.append(f"  bridge {d.bridge} {d.bip} ({bridge}), table {d.table}, port {d.port}")
        out.append(f"  pyengine -H {d.host}")
        out.append(f"  data root {d.data_root}, log {d.log_path}")
        if answering:
            ps = run([*d.pyengine(), "ps"]).stdout.rstrip()
            out += ["  " + line for line in ps.splitlines()]
    return "\n".join(out) + "\n"

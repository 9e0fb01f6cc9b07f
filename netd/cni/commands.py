"""The CNI commands (CNI SPEC.md, "CNI operations"): ADD, DEL, CHECK, GC and STATUS, each under
the network's lock (netd/cni/lock.py); VERSION is answered by netd/cni/main.py."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from netd.cni.chained import (
    ChainedNetwork,
    chained_network,
    recorded_chained_network,
    state_record,
)
from netd.cni.config import Invocation, NetConf
from netd.cni.controller import CniController, link_mac
from netd.cni.errors import (
    CHECK_FAILED,
    INVALID_CONFIG,
    NOT_AVAILABLE,
    OPERATION_FAILED,
    CniError,
)
from netd.cni.lock import network_lock
from netd.cni.proxies import start_proxy, stop_proxy
from netd.cni.records import AttachmentRecord, ProxyRecord, Records, attachment_key
from netd.cni.results import attachment_result
from netd.cni.versions import convert_result
from netd.errors import NetdError
from netd.state import close_ports

log = logging.getLogger(__name__)


def _controller(conf: NetConf, chained: ChainedNetwork | None) -> CniController:
    ctl = CniController(conf, chained)
    ctl.prepare()
    return ctl


def add(inv: Invocation, conf: NetConf) -> dict[str, Any]:
    key = attachment_key(inv.container_id, inv.ifname)
    with network_lock(conf.data_dir):
        records = Records.load(conf.data_dir)
        if key in records.attachments:
            raise CniError(
                OPERATION_FAILED,
                f"container {inv.container_id} already has {inv.ifname} on network {conf.name}",
            )
        found = None
        if conf.chained:
            found = chained_network(conf, conf.prev_result, inv.ifname)
            if found is None:
                raise CniError(INVALID_CONFIG, "chained mode (no ipam) needs prevResult")
        ctl = _controller(conf, found[0] if found else None)
        record = AttachmentRecord(inv.container_id, inv.ifname, inv.netns)
        records.attachments[key] = record
        records.save()  # the intent: a crash from here on is finished by DEL or GC
        ports = []
        try:
            if found is not None:
                ep = ctl.adopt(key, inv.netns, inv.ifname, found[1], found[2])
                routes: list[tuple[str, str]] = []
            else:
                ep, routes = ctl.attach(key, inv.netns, inv.ifname)
            ports = ctl.publish_maps(ep, conf.port_mappings)
            if conf.userland_proxy:

                def spawned(proxy: ProxyRecord) -> None:
                    record.proxies.append(proxy)
                    records.save()

                for port in ports:
                    if port.sock is not None and port.host_port:
                        start_proxy(port, conf.data_dir, spawned)
        except BaseException:
            close_ports(ports)
            _remove(ctl, records, record)
            raise
        close_ports(ports)
        if found is not None:
            return convert_result(conf.prev_result or {}, conf.cni_version)
        return attachment_result(conf, ep, link_mac(conf.bridge), link_mac(ep.host_veth), routes)


def _remove(ctl: CniController, records: Records, record: AttachmentRecord) -> None:
    """Stop the attachment's proxies, release it in netd, drop its record; the network's bridge
    and firewall go with its last attachment."""
    for proxy in record.proxies:
        stop_proxy(proxy)
    ctl.detach(record.key)
    records.attachments.pop(record.key, None)
    records.save()
    if not records.attachments and ctl.is_empty():
        ctl.release_network()


def _known_network(conf: NetConf) -> ChainedNetwork | None | bool:
    """For DEL and GC: False when this network never got an ADD (nothing to do); else the
    chained network to rebuild the controller with (None standalone)."""
    if not state_record(conf.data_dir) and not Records.load(conf.data_dir).attachments:
        return False
    if not conf.chained:
        return None
    found = chained_network(conf, conf.prev_result, "") if conf.prev_result else None
    return found[0] if found else recorded_chained_network(conf) or False


def _opened(conf: NetConf) -> tuple[Records, CniController] | None:
    """For DEL and GC, under the network's lock: its records and a prepared controller; None
    when this network never got an ADD (nothing to do)."""
    chained = _known_network(conf)
    if chained is False:
        return None
    records = Records.load(conf.data_dir)
    return records, _controller(conf, chained if isinstance(chained, ChainedNetwork) else None)


def delete(inv: Invocation, conf: NetConf) -> None:
    """Idempotent: an attachment that is gone, or never was, is not an error; nor is a
    namespace that is gone (its veth went with it)."""
    key = attachment_key(inv.container_id, inv.ifname)
    if not conf.data_dir.exists():
        return
    with network_lock(conf.data_dir):
        opened = _opened(conf)
        if opened is None:
            return
        records, ctl = opened
        record = records.attachments.get(key) or AttachmentRecord(
            inv.container_id, inv.ifname, inv.netns
        )
        _remove(ctl, records, record)


def check(inv: Invocation, conf: NetConf) -> None:
    key = attachment_key(inv.container_id, inv.ifname)
    with network_lock(conf.data_dir):
        records = Records.load(conf.data_dir)
        record = records.attachments.get(key)
        if record is None:
            raise CniError(
                CHECK_FAILED, f"container {inv.container_id} has no {inv.ifname} on {conf.name}"
            )
        chained = _known_network(conf)
        ctl = CniController(conf, chained if isinstance(chained, ChainedNetwork) else None)
        problems = ctl.problems(key, inv.ifname)
        problems += [
            f"proxy {p.pid} for port {p.host_port}/{p.proto} is not running"
            for p in record.proxies
            if not _proxy_running(p)
        ]
        if problems:
            raise CniError(CHECK_FAILED, problems[0], "; ".join(problems[1:]))


def _proxy_running(proxy: Any) -> bool:
    from netd.cni.proxies import is_running

    return bool(is_running(proxy))


def gc(conf: NetConf) -> None:
    """Remove every attachment not in ``cni.dev/valid-attachments`` (an absent list keeps all):
    its proxies, veth, addresses and port mappings, whether or not its record survived."""
    if conf.valid_attachments is None or not conf.data_dir.exists():
        return
    valid = {attachment_key(a.container_id, a.ifname) for a in conf.valid_attachments}
    with network_lock(conf.data_dir):
        opened = _opened(conf)
        if opened is None:
            return
        records, ctl = opened
        for key in (set(records.attachments) | ctl.keys()) - valid:
            record = records.attachments.get(key)
            if record is None:
                # netd holds something the records do not name: release it under its key.
                ctl.detach(key)
                continue
            log.info("GC: removing %s of %s", record.ifname, record.container_id)
            _remove(ctl, records, record)
        if not records.attachments and ctl.is_empty():
            ctl.release_network()


def status(conf: NetConf) -> None:
    """Whether an ADD could work now: root, the firewall backend's tools, the data directory."""
    if os.geteuid() != 0:
        raise CniError(NOT_AVAILABLE, "pyengine-cni needs root (CAP_NET_ADMIN)")
    if conf.firewall_backend == "iptables":
        for tool in ("iptables-restore", "iptables-save"):
            if shutil.which(tool) is None:
                raise CniError(NOT_AVAILABLE, f"the iptables backend needs {tool} on PATH")
    else:
        import nftables

        rc, _out, err = nftables.Nftables().cmd("list tables")
        if rc != 0:
            raise CniError(NOT_AVAILABLE, f"nftables is not usable: {err.strip()}")
    try:
        conf.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CniError(NOT_AVAILABLE, f"cannot use {conf.data_dir}: {exc.strerror}") from None
    if not os.access(conf.data_dir, os.W_OK):
        raise CniError(NOT_AVAILABLE, f"{conf.data_dir} is not writable")


def run(inv: Invocation, conf: NetConf) -> dict[str, Any] | None:
    try:
        if inv.command == "ADD":
            return add(inv, conf)
        if inv.command == "DEL":
            delete(inv, conf)
        elif inv.command == "CHECK":
            check(inv, conf)
        elif inv.command == "GC":
            gc(conf)
        elif inv.command == "STATUS":
            status(conf)
    except NetdError as exc:
        raise CniError(OPERATION_FAILED, str(exc)) from None
    return None

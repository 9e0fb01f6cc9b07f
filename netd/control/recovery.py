"""Setup and teardown: the state file is the truth; ``setup`` rolls back what a crash left half
created, finishes what was being removed, and recreates what live endpoints need."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Collection, Mapping

from netd import bridge, forwarding, macvlan, sandbox, sysctl
from netd.control.base import IPAM_FILE
from netd.control.endpoints import Endpoints
from netd.errors import NetdError
from netd.network import (
    READY,
    Network,
)
from netd.portmap import (
    reserve_host_port,
)
from netd.state import (
    Endpoint,
    NetdState,
    PublishedPort,
    close_ports,
    endpoint_key,
)

log = logging.getLogger(__name__)


class Recovery(Endpoints):
    # -- setup / teardown -------------------------------------------------------------------

    def setup(
        self,
        containers: Collection[str] | None = None,
        held_sockets: Mapping[tuple[str, str, int], socket.socket] | None = None,
    ) -> None:
        """Bring the kernel in line with the state; idempotent, and the recovery after a crash.

        * networks: one being created is rolled back, one being removed is removed; the
          others get their bridge (created if missing, address and state fixed);
        * endpoints and sandboxes: those being created are rolled back, those being removed are
          removed, as are those whose namespace is gone or whose container is not in
          ``containers`` (when given: the containers that still exist); live ones are plugged
          into their bridge again, their veth pair recreated if it is missing, and their
          default route set;
        * addresses: exactly the live endpoints' addresses are allocated;
        * published ports: those of removed endpoints are dropped, the others get a reserving
          socket again (a new process holds none): the one ``held_sockets`` has for that
          (proto, host_ip, host_port), if any, else a newly bound one. Held sockets are the
          listening sockets of proxies that outlived the previous daemon: keeping them, rather
          than binding again, keeps those ports open throughout. setup() owns them: those it
          does not use are closed, also when it fails;
        * the firewall: a fresh table (or chain set) from the state, in one transaction.
        """
        held = dict(held_sockets or {})
        try:
            self._setup(containers, held)
        finally:
            for sock in held.values():
                sock.close()

    def _setup(
        self, containers: Collection[str] | None, held: dict[tuple[str, str, int], socket.socket]
    ) -> None:
        with self._lock:
            self._firewall.forward_drop = forwarding.setup(
                self._state_dir, self.cfg.ip_forward, self.cfg.ip_forward_no_drop
            )
            previous = self._read_network_record()
            if (previous.get("firewall_backend"), previous.get("table")) == (
                self.cfg.firewall_backend,
                self.cfg.table,
            ):
                self._firewall.forward_policy_before = previous.get("forward_policy_before")
            st = self._st
            if any(n.subnet6 for n in st.networks.values() if n.state == READY):
                sysctl.enable_ipv6_forward()
            for net in list(st.networks.values()):
                if net.state != READY:
                    log.warning("network %s was left %s; removing it", net.name, net.state)
                    self._forget_network_endpoints(net.id)
                    st.drop_network(net.id)
                    if net.is_bridge:
                        bridge.delete_bridge(net.bridge)
                    elif net.created_parent:
                        macvlan.delete_parent(net.parent)
            for net in st.networks.values():
                if not net.is_bridge:
                    self._ensure_parent(net)
                    continue
                try:
                    bridge.ensure_network_bridge(net)
                    # DNAT of 127.0.0.0/8 traffic to the bridge needs it (Docker's
                    # setupLoopbackAddressesRouting); off again when the proxy handles loopback.
                    sysctl.set_route_localnet(net.bridge, not self.cfg.userland_proxy)
                except NetdError as exc:
                    if net.default:
                        raise
                    # The daemon still starts; the network's endpoints are dropped below.
                    log.warning("cannot set up the bridge of network %s: %s", net.name, exc)
            self._reconcile_endpoints(containers)
            self._reconcile_addresses()
            fresh = self._restore_port_reservations(held)
            try:
                self._remove_previous_firewall()
                # The FORWARD policy iptables is about to replace goes to disk first: a crash
                # in between must not lose the policy to put back.
                self._firewall.remember_forward_policy()
                self._save_firewall_record()
                self._install_firewall()
                self._save_firewall_record()
                self._save()
            except BaseException:
                close_ports(fresh)
                raise
            self._ready = True

    def _ensure_parent(self, net: Network) -> None:
        """A macvlan/ipvlan network's parent netd made is made again if missing (a reboot);
        a user's parent that is gone is only logged (its containers' links went with it and
        are dropped below, when they cannot be recreated)."""
        if macvlan.link_exists(net.parent):
            return
        if not net.created_parent:
            log.warning("parent interface %s of network %s is missing", net.parent, net.name)
            return
        try:
            macvlan.create_parent(net.parent)
        except NetdError as exc:
            log.warning("cannot recreate parent %s of network %s: %s", net.parent, net.name, exc)

    def _forget_network_endpoints(self, network_id: str) -> None:
        for ep in self._st.network_endpoints(network_id):
            self._forget_endpoint(ep)

    def _forget_endpoint(self, ep: Endpoint) -> None:
        """Remove an endpoint's veth, address, record and ports, without firewall changes (the
        caller reinstalls the firewall from the state)."""
        self._unplumb(ep)
        self._st.release_addresses(ep)
        self._st.endpoints.pop(ep.key, None)
        ports = self._st.ports.get(ep.container_id, [])
        gone = [p for p in ports if p.network_id == ep.network_id]
        close_ports(gone)
        if gone:
            self._st.ports[ep.container_id] = [p for p in ports if p not in gone]

    def _reconcile_endpoints(self, containers: Collection[str] | None) -> None:
        st = self._st
        wanted = None if containers is None else set(containers)
        for sb in list(st.sandboxes.values()):
            present = sandbox.netns_exists(sb.netns_name)
            listed = wanted is None or sb.container_id in wanted
            if sb.state == READY and present and listed:
                continue
            why = (
                f"it was left {sb.state}"
                if sb.state != READY
                else "its namespace is gone"
                if not present
                else "the container no longer exists"
            )
            log.warning("removing the network sandbox of %s: %s", sb.container_id[:12], why)
            for ep in st.container_endpoints(sb.container_id):
                self._forget_endpoint(ep)
            sandbox.delete_netns(sb.netns_name)
            del st.sandboxes[sb.container_id]
            close_ports(st.ports.pop(sb.container_id, []))
        for ep in list(st.endpoints.values()):
            net = st.networks.get(ep.network_id)
            if ep.state != READY or net is None or ep.container_id not in st.sandboxes:
                log.warning(
                    "endpoint %s of %s was left %s", ep.ifname, ep.container_id[:12], ep.state
                )
                self._forget_endpoint(ep)
                continue
            try:
                if not net.is_bridge:
                    if not sandbox.link_exists_inside(ep.netns_name, ep.ifname):
                        log.warning("%s link %s is missing; recreating it", net.driver, ep.ifname)
                        self._plumb(ep, net)
                elif sandbox.link_exists(ep.host_veth):
                    sandbox.plug_into_bridge(
                        ep.host_veth, net.bridge, self._hairpin, not net.enable_icc
                    )
                else:
                    log.warning("veth %s is missing; recreating it", ep.host_veth)
                    self._plumb(ep, net)
            except NetdError as exc:
                log.warning("dropping endpoint %s of %s: %s", ep.ifname, ep.container_id[:12], exc)
                self._forget_endpoint(ep)
        for cid in list(st.sandboxes):
            try:
                self._sync_default_route(cid)
            except NetdError as exc:
                log.warning("cannot set the default route of %s: %s", cid[:12], exc)
        for cid, ports in list(st.ports.items()):
            keep = [p for p in ports if self._port_target_is_live(cid, p)]
            close_ports([p for p in ports if p not in keep])
            if keep:
                st.ports[cid] = keep
            else:
                del st.ports[cid]

    def _port_target_is_live(self, container_id: str, port: PublishedPort) -> bool:
        ep = self._st.endpoints.get(endpoint_key(container_id, port.network_id))
        if ep is None or ep.state != READY:
            return False
        return port.container_ip in (ep.ip, ep.ipv6)

    def _reconcile_addresses(self) -> None:
        """Allocations = the live endpoints' addresses (an interrupted allocation is freed)."""
        for nid, ipam in self._st.ipams.items():
            ipam.allocations = {ep.ip: ep.container_id for ep in self._st.network_endpoints(nid)}
        for nid, ipam in self._st.ipams6.items():
            ipam.allocations = {
                ep.ipv6: ep.container_id for ep in self._st.network_endpoints(nid) if ep.ipv6
            }

    def _restore_port_reservations(
        self, held: dict[tuple[str, str, int], socket.socket] | None = None
    ) -> list[PublishedPort]:
        """Give the persisted mappings that hold no socket in this process one again: the
        matching socket taken out of ``held``, else a newly bound one."""
        held = {} if held is None else held
        fresh: list[PublishedPort] = []
        for cid, ports in self._st.ports.items():
            for port in list(ports):
                if port.sock is not None:
                    continue
                kept = held.pop((port.proto, port.host_ip, port.host_port), None)
                if kept is not None:
                    # A surviving proxy serves it: no drop filter to lift (_after_reserve).
                    port.sock = kept
                    fresh.append(port)
                    continue
                try:
                    res = reserve_host_port(
                        port.proto,
                        port.host_ip,
                        port.host_port,
                        0,
                        functools.partial(self._is_taken, skip=port),
                    )
                except NetdError as exc:
                    log.warning("dropping mapping of %s: %s", cid[:12], exc)
                    ports.remove(port)
                    continue
                port.sock = res.sock
                self._after_reserve(port)
                fresh.append(port)
        return fresh

    def teardown(self, remove_networks: bool = False) -> None:
        """Remove everything netd made in the kernel: endpoints, sandboxes, mappings, the
        firewall and every bridge. User-defined networks stay defined (Docker keeps them across
        daemon restarts; the next setup() recreates their bridges) unless ``remove_networks``.
        """
        with self._lock:
            st = self._st
            for cid in {ep.container_id for ep in st.endpoints.values()} | set(st.sandboxes):
                self.delete_endpoint(cid)
            for cid in list(st.ports):
                self.unpublish(cid)
            self._firewall.uninstall()
            if self._return_path_up:
                self._remove_return_path()
            for net in st.networks.values():
                if net.is_bridge:
                    bridge.delete_bridge(net.bridge)
                elif net.created_parent:
                    macvlan.delete_parent(net.parent)
            kept = [n for n in st.networks.values() if not n.default and n.state == READY]
            if remove_networks or not kept:
                self._state_file.unlink(missing_ok=True)
                default = self.default_network
                default.state = READY
                self._st = NetdState()
                self._st.add_network(default)
            else:
                for net in list(st.networks.values()):
                    if net.state != READY:
                        st.drop_network(net.id)
                self._save()
            (self._state_dir / IPAM_FILE).unlink(missing_ok=True)
            self._network_file.unlink(missing_ok=True)
            try:
                self._state_dir.rmdir()
            except OSError:
                pass  # not empty: the networks' definitions, or files that are not ours
            self._ready = False

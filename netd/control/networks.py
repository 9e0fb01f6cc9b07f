"""Networks: the default bridge one and user-defined ones (bridge, macvlan, ipvlan), created
and removed as one recorded step each."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from netd import bridge, macvlan, sandbox, subnetpool, sysctl
from netd.control.base import ControllerBase
from netd.errors import Conflict, Forbidden, NetdError, NotFound
from netd.network import (
    READY,
    REMOVING,
    Network,
    NetworkRequest,
    plan_network,
)

log = logging.getLogger(__name__)


class Networks(ControllerBase):
    # -- networks ---------------------------------------------------------------------------

    def _resolve(self, ref: str | Network, removing: bool = False) -> Network:
        """By full id, then name, then unique id prefix (Docker's order)."""
        ref = ref.id if isinstance(ref, Network) else ref
        states = (READY, REMOVING) if removing else (READY,)
        nets = [n for n in self._st.networks.values() if n.state in states]
        matchers: tuple[Callable[[Network], bool], ...] = (
            lambda n: n.id == ref,
            lambda n: n.name == ref,
        )
        for match in matchers:
            found = [n for n in nets if match(n)]
            if found:
                return found[0]
        found = [n for n in nets if ref and n.id.startswith(ref)]
        if len(found) > 1:
            raise NotFound(f"network {ref} is ambiguous ({len(found)} matches found)")
        if not found:
            raise NotFound(f"network {ref} not found")
        return found[0]

    def is_internal(self, network_id: str) -> bool:
        """Whether network ``network_id`` is internal (False for one that does not exist).
        Takes no lock, so the event loop may ask it on every DNS query: a network's internal
        flag never changes, and a dict lookup is atomic."""
        net = self._st.networks.get(network_id)
        return net is not None and net.internal

    def network(self, ref: str | Network) -> Network:
        """The network named ``ref``, or with id (prefix) ``ref``; NotFound otherwise."""
        with self._lock:
            return copy.deepcopy(self._resolve(ref))

    def networks(self) -> list[Network]:
        """Every network, the default one first."""
        with self._lock:
            return [copy.deepcopy(n) for n in self._st.networks.values() if n.state == READY]

    def create_network(
        self,
        name: str,
        subnet: str | None = None,
        gateway: str | None = None,
        ip_range: str | None = None,
        internal: bool = False,
        enable_ipv6: bool = False,
        options: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        subnet6: str | None = None,
        gateway6: str | None = None,
        driver: str = "bridge",
        attachable: bool = False,
    ) -> Network:
        """A user-defined network. A bridge one gets its bridge and its place in the firewall;
        a macvlan/ipvlan one its parent link when netd is to make it (netd/macvlan.py), and a
        probe that the kernel can hang a child of the driver's kind off it. With
        ``enable_ipv6`` it also gets an IPv6 subnet: ``subnet6`` (and ``gateway6``), or a /64
        of the unique local pool."""
        with self._lock:
            self._require_ready()
            request = NetworkRequest(
                name,
                subnet,
                gateway,
                ip_range,
                internal,
                enable_ipv6,
                options,
                labels,
                subnet6,
                gateway6,
                driver,
            )
            existing = list(self._st.networks.values())
            network = plan_network(
                request, existing, subnetpool.host_routes(), self.cfg.address_pools
            )
            network.attachable = attachable
            if network.is_bridge and sandbox.link_exists(network.bridge):
                raise Conflict(f"interface {network.bridge} already exists")
            st = self._st
            st.add_network(network)
            made_parent = False
            try:
                self._save()  # the intent, with the parent netd is to make, before the kernel
                if network.is_bridge:
                    if network.subnet6:
                        sysctl.enable_ipv6_forward()
                    bridge.ensure_network_bridge(network)
                    sysctl.set_route_localnet(network.bridge, not self.cfg.userland_proxy)
                    self._install_firewall()
                else:
                    if network.created_parent:
                        macvlan.create_parent(network.parent)
                        made_parent = True
                    macvlan.probe_driver(network.child_spec)
                network.state = READY
                self._save()
            except BaseException:
                st.drop_network(network.id)
                # A parent that could not be made (it appeared meanwhile) is not netd's.
                network.created_parent = made_parent
                self._undo_network(network)
                raise
            return copy.deepcopy(network)

    def _undo_network(self, network: Network) -> None:
        """Best effort: the firewall without ``network``, its bridge (or the parent netd made)
        gone, the state saved."""
        if not network.is_bridge:
            if network.created_parent:
                macvlan.delete_parent(network.parent)
            self._save()
            return
        try:
            if self._firewall.installed():
                self._install_firewall()
        except NetdError as exc:
            log.warning("cannot remove network %s from the firewall: %s", network.name, exc)
        bridge.delete_bridge(network.bridge)
        self._save()

    def remove_network(self, ref: str | Network) -> None:
        """Remove a user-defined network; refused while a container is connected to it."""
        with self._lock:
            self._require_ready()
            network = self._resolve(ref, removing=True)
            if network.default:
                raise Forbidden(f"{network.name} is a pre-defined network and cannot be removed")
            endpoints = self._st.network_endpoints(network.id)
            if endpoints:
                raise Conflict(
                    f"network {network.name} has active endpoints "
                    f"({', '.join(ep.container_id[:12] for ep in endpoints)})"
                )
            previous = network.state
            network.state = REMOVING
            self._save()
            if not network.is_bridge:
                # From here on the removal is carried through, now or by the next setup().
                if network.created_parent:
                    macvlan.delete_parent(network.parent)
                self._st.drop_network(network.id)
                self._save()
                return
            try:
                self._install_firewall()
            except BaseException:
                network.state = previous
                self._save()
                raise
            # From here on the removal is carried through, now or by the next setup().
            bridge.delete_bridge(network.bridge)
            self._st.drop_network(network.id)
            self._save()

"""netd's controller for one CNI network: the network is the controller's default network, its
endpoints live in namespaces the runtime made (CNI_NETNS), and each is known by its
attachment's key (netd/cni/records.py) in place of a container id.

Differences from pyengined's use of the same controller, each kept to this subclass:

* the namespace is the runtime's: netd never creates or deletes it (no ``connect`` /
  ``delete_endpoint``, whose sandbox is netd's own); the veth's peer is born in it as
  CNI_IFNAME;
* routes in the namespace come from the configuration (``ipam.routes``, the default route
  unless ``isDefaultGateway`` is false) and go with the veth; another plugin's default route is
  left alone (``_sync_default_route`` is a no-op);
* chained after an interface plugin, an endpoint has no host veth: its interface and address
  are that plugin's, recorded only so ports can be published to them (``_unplumb`` skips it);
* ``prepare`` replaces ``setup``: a plugin process holds no sockets between commands, so it
  does not re-reserve published ports (in proxy mode the proxies hold them); it rolls back what
  a crashed command left (records not ``ready``), makes the bridge and rebuilds the firewall
  from the state in one transaction, as ``setup`` does;
* when the last attachment goes, the network's bridge and firewall table go with it
  (``release_network``), so a node without pods of the network carries nothing of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import secrets
import socket
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from common.jsonstate import read_json
from common.ports import PortBinding
from netd import bridge, forwarding, sandbox, sysctl
from netd.cni.chained import ChainedNetwork
from netd.cni.config import NetConf, PortMap
from netd.controller import NetdConfig, NetworkController
from netd.errors import Conflict, NetdError
from netd.naming import mac_for_ip
from netd.network import CREATING, READY
from netd.state import Endpoint, PublishedPort, Sandbox, endpoint_key

NETNS_PREFIX = "pyecni-"  # unused: the namespaces are the runtime's
VETH_PREFIX = "pyecni"


def veth_name(network: str, key: str) -> str:
    """The host end of an attachment's veth: ``pyecni<9 hex>`` (15 characters), of the network
    and the attachment's key: host link names are one namespace for every network."""
    digest = hashlib.sha256(f"{network}/{key}".encode()).hexdigest()
    return f"{VETH_PREFIX}{digest[:9]}"


def netd_config(conf: NetConf, chained: ChainedNetwork | None) -> NetdConfig:
    if conf.range4 is not None:
        bridge_name = conf.bridge
        cidr = f"{conf.range4.gateway}/{conf.range4.subnet.prefixlen}"
        subnet6 = str(conf.range6.subnet) if conf.range6 is not None else ""
    else:
        if chained is None:
            raise NetdError("chained mode needs prevResult")
        bridge_name, cidr, subnet6 = chained.bridge, str(chained.interface), chained.subnet6
    return NetdConfig(
        data_root=conf.data_dir,
        bridge=bridge_name,
        bridge_cidr=cidr,
        table=conf.table,
        userland_proxy=conf.userland_proxy,
        firewall_backend=conf.firewall_backend,
        netns_prefix=NETNS_PREFIX,
        ip_forward=True,
        # A node's forwarding policy is the cluster's: turning forwarding on does not make this
        # plugin drop the traffic of other plugins' interfaces (the reference bridge plugin
        # does not either).
        ip_forward_no_drop=True,
        ipv6=bool(subnet6),
        fixed_cidr_v6=subnet6,
    )


def bindings(maps: tuple[PortMap, ...]) -> list[PortBinding]:
    return [PortBinding(m.container_port, m.proto, m.host_ip, m.host_port) for m in maps]


def link_mac(ifname: str) -> str:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return ""
        return str(ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS") or "")


class CniController(NetworkController):
    def __init__(self, conf: NetConf, chained: ChainedNetwork | None = None) -> None:
        super().__init__(netd_config(conf, chained))
        self.conf = conf
        net = self.default_network
        net.masquerade, net.mtu = conf.ip_masq, conf.mtu  # saved with the next change
        net.gateway_mode4 = net.gateway_mode6 = conf.gateway_mode

    # -- overrides --------------------------------------------------------------------------

    def _unplumb(self, ep: Endpoint) -> None:
        if ep.host_veth:  # else the interface plugin's (chained)
            super()._unplumb(ep)

    def _sync_default_route(self, container_id: str) -> None:
        return None

    # -- set-up -----------------------------------------------------------------------------

    def prepare(self) -> None:
        with self._lock:
            forwarding.setup(self._state_dir, True, True)
            previous = self._read_network_record()
            if (previous.get("firewall_backend"), previous.get("table")) == (
                self.cfg.firewall_backend,
                self.cfg.table,
            ):
                self._firewall.forward_policy_before = previous.get("forward_policy_before")
            self._recover()
            net = self.default_network
            if not self.conf.chained:
                if net.subnet6:
                    sysctl.enable_ipv6_forward()
                bridge.ensure_network_bridge(net)
            if sandbox.link_exists(net.bridge):
                # DNAT of 127.0.0.0/8 to the bridge needs it; not with the proxy.
                sysctl.set_route_localnet(net.bridge, not self.cfg.userland_proxy)
            self._remove_previous_firewall()
            self._firewall.remember_forward_policy()
            # Each write is two fsyncs: only what changed is written (most commands: nothing).
            record_current = self._record_is_current(previous)
            if not record_current:
                self._save_firewall_record()
            self._install_firewall()
            if not record_current:
                self._save_firewall_record()
            if self._state_changed():
                self._save()
            self._ready = True

    def _record_is_current(self, previous: dict[str, object]) -> bool:
        """Whether netd's firewall record says what ``_save_firewall_record`` would write (a
        field this does not know makes it write, which is always safe)."""
        net = self.default_network
        return previous == {
            "bridge": self.cfg.bridge,
            "subnet": net.subnet,
            "gateway": net.gateway,
            "firewall_backend": self.cfg.firewall_backend,
            "table": self.cfg.table,
            "userland_proxy": self.cfg.userland_proxy,
            "forward_policy_before": self._firewall.forward_policy_before,
        }

    def _state_changed(self) -> bool:
        try:
            on_disk = read_json(self._state_file, None)
        except (OSError, ValueError):
            return True
        return bool(on_disk != json.loads(json.dumps(self._st.to_json())))

    def _recover(self) -> None:
        """Roll back what a command that crashed left: records not ``ready``, ports of
        endpoints that are gone; the allocations are then exactly the endpoints' addresses."""
        st = self._st
        for ep in list(st.endpoints.values()):
            if ep.state != READY or ep.container_id not in st.sandboxes:
                self._forget_endpoint(ep)
        live = {ep.container_id for ep in st.endpoints.values()}
        for key, sb in list(st.sandboxes.items()):
            if sb.state != READY or key not in live:
                del st.sandboxes[key]
        for key, ports in list(st.ports.items()):
            keep = [p for p in ports if self._port_target_is_live(key, p)]
            if keep:
                st.ports[key] = keep
            else:
                del st.ports[key]
        self._reconcile_addresses()

    # -- attachments ------------------------------------------------------------------------

    def keys(self) -> set[str]:
        """The attachments netd holds anything for."""
        with self._lock:
            st = self._st
            return (
                set(st.sandboxes)
                | {ep.container_id for ep in st.endpoints.values()}
                | set(k for k, ports in st.ports.items() if ports)
            )

    def endpoint(self, key: str) -> Endpoint | None:
        with self._lock:
            return self._st.endpoints.get(endpoint_key(key, self.default_network.id))

    def _record(self, ep: Endpoint) -> Sandbox:
        st = self._st
        if ep.key in st.endpoints or ep.container_id in st.sandboxes:
            raise Conflict(f"attachment {ep.ifname} in {ep.netns_path} exists already")
        sb = Sandbox(ep.container_id, ep.netns_name, ep.netns_path, state=CREATING)
        st.sandboxes[sb.container_id] = sb
        st.endpoints[ep.key] = ep
        return sb

    def attach(self, key: str, netns: str, ifname: str) -> tuple[Endpoint, list[tuple[str, str]]]:
        """A veth from the bridge into ``netns`` as ``ifname``, with addresses from netd's IPAM
        and the configured routes; all or nothing. Returns the endpoint and its routes."""
        with self._lock:
            self._require_ready()
            st, net = self._st, self.default_network
            veth = veth_name(self.conf.name, key)
            if sandbox.link_exists(veth):
                raise Conflict(f"interface {veth} already exists")
            ipam, ipam6 = st.ipams[net.id], st.ipams6.get(net.id)
            addr = ipam.allocate(key)
            addr6 = None
            try:
                addr6 = ipam6.allocate(key) if ipam6 is not None else None
            except BaseException:
                ipam.release(str(addr))
                raise
            ep = Endpoint(
                container_id=key,
                netns_name=netns,
                netns_path=netns,
                host_veth=veth,
                ip=str(addr),
                prefixlen=IPv4Interface(str(net.interface)).network.prefixlen,
                gateway=net.gateway,
                mac=mac_for_ip(IPv4Interface(f"{addr}/32").ip),
                network_id=net.id,
                network_name=net.name,
                ifname=ifname,
                id=secrets.token_hex(32),
                state=CREATING,
                ipv6=str(addr6) if addr6 is not None else "",
                ipv6_prefixlen=ipam6.subnet.prefixlen if ipam6 is not None else 0,
                ipv6_gateway=net.gateway6 if addr6 is not None else "",
            )
            try:
                sb = self._record(ep)
            except BaseException:
                st.release_addresses(ep)
                raise
            try:
                self._save()  # the intent, before any kernel object exists
                self._plumb(ep, net)
                routes = self._add_routes(ep)
                ep.state = sb.state = READY
                self._save()
            except BaseException:
                self._unplumb(ep)
                st.release_addresses(ep)
                st.endpoints.pop(ep.key, None)
                st.sandboxes.pop(key, None)
                self._save()
                raise
            return ep, routes

    def adopt(
        self,
        key: str,
        netns: str,
        ifname: str,
        address: IPv4Interface,
        address6: IPv6Interface | None,
    ) -> Endpoint:
        """Chained: record the interface plugin's address as an endpoint to publish ports to."""
        with self._lock:
            self._require_ready()
            st, net = self._st, self.default_network
            if address.ip not in IPv4Interface(str(net.interface)).network:
                raise NetdError(f"address {address} is not in the network's subnet {net.subnet}")
            ep = Endpoint(
                container_id=key,
                netns_name=netns,
                netns_path=netns,
                host_veth="",
                ip=str(address.ip),
                prefixlen=address.network.prefixlen,
                gateway=net.gateway,
                mac="",
                network_id=net.id,
                network_name=net.name,
                ifname=ifname,
                id=secrets.token_hex(32),
                state=READY,
                ipv6=str(address6.ip) if address6 is not None else "",
                ipv6_prefixlen=address6.network.prefixlen if address6 is not None else 0,
                ipv6_gateway=net.gateway6 if address6 is not None else "",
            )
            sb = self._record(ep)
            sb.state = READY
            st.ipams[net.id].claim(ep.ip, key)
            if ep.ipv6 and net.id in st.ipams6:
                st.ipams6[net.id].claim(ep.ipv6, key)
            self._save()
            return ep

    def _add_routes(self, ep: Endpoint) -> list[tuple[str, str]]:
        """The configured routes in the namespace through ``ep``; a route that exists already
        (another interface's default route) is left as it is and not reported."""
        wanted: list[tuple[str, str]] = []
        for route in self.conf.routes:
            gw = route.gw or (ep.gateway if route.dst.version == 4 else ep.ipv6_gateway)
            if gw:
                wanted.append((str(route.dst), str(gw)))
        if self.conf.is_default_gateway:
            if not any(dst == "0.0.0.0/0" for dst, _ in wanted):
                wanted.append(("0.0.0.0/0", ep.gateway))
            if ep.ipv6 and not any(dst == "::/0" for dst, _ in wanted):
                wanted.append(("::/0", ep.ipv6_gateway))
        added = []
        try:
            with IPRoute(netns=ep.netns_path, flags=0) as ns:
                index = ns.link_lookup(ifname=ep.ifname)[0]
                for dst, gw in wanted:
                    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
                    try:
                        ns.route("add", dst=dst, gateway=gw, oif=index, family=family)
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise
                        continue
                    added.append((dst, gw))
        except NetlinkError as exc:
            raise NetdError(f"cannot add routes in {ep.netns_path}: {exc.args[-1]}") from None
        return added

    def publish_maps(self, ep: Endpoint, maps: tuple[PortMap, ...]) -> list[PublishedPort]:
        if not maps:
            return []
        return self.publish(ep.container_id, ep, bindings(maps))

    def detach(self, key: str) -> None:
        """Remove everything of the attachment: its ports, its veth, its addresses. Idempotent;
        the namespace may be gone."""
        with self._lock:
            st = self._st
            for ep in [e for e in st.endpoints.values() if e.container_id == key]:
                self._remove_endpoint(ep)
            self.unpublish(key)
            if st.sandboxes.pop(key, None) is not None:
                self._save()

    def is_empty(self) -> bool:
        with self._lock:
            return not self.keys()

    def release_network(self) -> None:
        """No attachment left: the firewall table goes, and the bridge unless an interface
        plugin owns it (chained); the state files go, the data directory stays."""
        with self._lock:
            self._firewall.uninstall()
            if not self.conf.chained:
                bridge.delete_bridge(self.default_network.bridge)
            self._state_file.unlink(missing_ok=True)
            self._network_file.unlink(missing_ok=True)
            self._ready = False

    # -- CHECK ------------------------------------------------------------------------------

    def problems(self, key: str, ifname: str) -> list[str]:
        """What is not as ADD left it (empty: all is well)."""
        with self._lock:
            ep = self.endpoint(key)
            if ep is None or ep.state != READY:
                return [f"no attachment {ifname} on network {self.conf.name}"]
            found: list[str] = []
            if ep.host_veth and not sandbox.link_exists(ep.host_veth):
                found.append(f"host veth {ep.host_veth} is missing")
            if not Path(ep.netns_path).exists():
                found.append(f"network namespace {ep.netns_path} is gone")
            elif ep.host_veth:
                found += _inside_problems(ep)
            want = {p.mapping() for p in self._st.ports.get(key, []) if p.in_firewall}
            missing = want - set(self._firewall.mappings())
            for m in sorted(missing, key=lambda m: (m.proto, m.host_port)):
                found.append(f"port {m.host_port}/{m.proto} is not mapped to {m.container_ip}")
            return found


def _inside_problems(ep: Endpoint) -> list[str]:
    try:
        with IPRoute(netns=ep.netns_path, flags=0) as ns:
            found = ns.link_lookup(ifname=ep.ifname)
            if not found:
                return [f"interface {ep.ifname} is missing in {ep.netns_path}"]
            have = {
                str(a.get_attr("IFA_ADDRESS"))
                for a in ns.get_addr(index=found[0])
                if a.get_attr("IFA_ADDRESS")
            }
    except (NetlinkError, OSError) as exc:
        return [f"cannot inspect {ep.netns_path}: {exc}"]
    wanted = [ep.ip] + ([ep.ipv6] if ep.ipv6 else [])
    return [f"{ep.ifname} lacks address {a}" for a in wanted if a not in have]

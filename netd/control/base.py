"""The controller's shared state: its configuration, the persisted state file, the firewall
rebuilt from it. Every part of the controller (networks, ports, endpoints, recovery) derives
from :class:`ControllerBase`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from common.jsonstate import CorruptRecord, read_record, set_aside, write_json_atomic
from common.ports import PortMapping
from common.timefmt import utc_rfc3339
from netd import subnetpool
from netd.errors import Conflict, NetdError
from netd.firewall import Firewall, make_firewall
from netd.naming import (
    valid_ifname,
)
from netd.network import (
    DEFAULT_NETWORK,
    OPT_BRIDGE_NAME,
    REMOVING,
    Network,
    default_network_id,
    parse_subnet6,
)
from netd.returnpath import ReturnPath
from netd.state import (
    NetdState,
    firewall_mappings,
)
from netd.subnetpool import DEFAULT_ADDRESS_POOLS

log = logging.getLogger(__name__)


# Files under <data_root>/network (netd/status.py reads them too).
STATE_DIR = "network"
ENDPOINTS_FILE = "endpoints.json"  # all of netd's state (netd/state.py)
NETWORK_FILE = "network.json"  # the firewall the rules were installed with, and the bridge
IPAM_FILE = "ipam.json"  # first slice only: read once, then folded into ENDPOINTS_FILE


@dataclass
class NetdConfig:
    data_root: Path  # netd keeps its JSON state under data_root / "network"
    bridge: str = "pyengine0"
    bridge_cidr: str = "10.47.0.1/16"  # gateway address/prefix of the default bridge
    # nftables: the table pyengine owns (family inet); iptables: the prefix of its chains
    table: str = "pyengine"
    userland_proxy: bool = True
    firewall_backend: str = "nftables"
    netns_prefix: str = "pyengine-"  # namespaces are /run/netns/<prefix><first 12 of id>
    # Where automatic subnets of user-defined networks come from: (base, prefix length of
    # each subnet). See netd/subnetpool.py.
    address_pools: tuple[tuple[str, int], ...] = DEFAULT_ADDRESS_POOLS
    # Docker's --ip-forward: turn net.ipv4.ip_forward on (containers reach other networks).
    ip_forward: bool = True
    # Docker's --ip-forward-no-drop: when pyengined turned ip_forward on, do not drop the
    # forwarded traffic that is not pyengine's (see netd/forwarding.py).
    ip_forward_no_drop: bool = False
    # Docker's --ipv6 and --fixed-cidr-v6: the default bridge gets this IPv6 subnet as well
    # (its first address is the gateway); containers on it get an address of it and NAT66.
    ipv6: bool = False
    fixed_cidr_v6: str = ""
    # The return path of transparent proxy mode (netd/returnpath.py): the firewall mark
    # (bits set and matched with an equal mask), the routing table and the ip rule's priority.
    transparent_mark: int = 0x1D190000
    transparent_table: int = 25919
    transparent_priority: int = 25919


def default_ipv6(cfg: NetdConfig) -> tuple[str, str]:
    """The default network's IPv6 subnet and gateway (("", "") without ``--ipv6``)."""
    if not cfg.ipv6:
        if cfg.fixed_cidr_v6:
            raise NetdError("--fixed-cidr-v6 needs --ipv6")
        return "", ""
    if not cfg.fixed_cidr_v6:
        # Docker 27+ would pick a unique local /64; a default network must keep its subnet
        # across restarts, so pyengined asks for it instead of picking one that may move.
        raise NetdError("--ipv6 needs --fixed-cidr-v6 (the default bridge's IPv6 subnet)")
    subnet = parse_subnet6(cfg.fixed_cidr_v6)
    return str(subnet), str(subnet.network_address + 1)


class ControllerBase:
    def __init__(self, cfg: NetdConfig) -> None:
        if not valid_ifname(cfg.bridge):
            raise NetdError(f'invalid bridge name "{cfg.bridge}"')
        try:
            gateway = IPv4Interface(cfg.bridge_cidr)
        except ValueError:
            raise NetdError(f'invalid bridge_cidr "{cfg.bridge_cidr}"') from None
        if gateway.network.prefixlen > 30 or gateway.ip in (
            gateway.network.network_address,
            gateway.network.broadcast_address,
        ):
            raise NetdError(
                f'bridge_cidr "{cfg.bridge_cidr}" must be a host address in a /30 or larger'
            )
        subnetpool.parse_pools(cfg.address_pools)
        subnet6, gateway6 = default_ipv6(cfg)
        self.cfg = cfg
        self._state_dir = cfg.data_root / STATE_DIR
        self._state_file = self._state_dir / ENDPOINTS_FILE
        self._network_file = self._state_dir / NETWORK_FILE
        self._lock = threading.RLock()
        self._firewall: Firewall = make_firewall(
            cfg.firewall_backend, cfg.table, cfg.userland_proxy
        )
        self._return_path = ReturnPath(
            cfg.transparent_mark, cfg.transparent_table, cfg.transparent_priority
        )
        self._return_path_up = False  # whether this daemon installed it
        default = Network(
            id=default_network_id(cfg.bridge, gateway),
            name=DEFAULT_NETWORK,
            bridge=cfg.bridge,
            subnet=str(gateway.network),
            gateway=str(gateway.ip),
            default=True,
            enable_ipv6=bool(subnet6),
            subnet6=subnet6,
            gateway6=gateway6,
            configured_subnet6=bool(subnet6),
            options={OPT_BRIDGE_NAME: cfg.bridge},
            created=utc_rfc3339(digits=6),
        )
        self._st = self._load_state(default)
        self._adopt_default_network(default)
        self._ready = False

    # -- persisted state --------------------------------------------------------------------

    def _save(self) -> None:
        self._st.save(self._state_file)

    def _adopt_default_network(self, default: Network) -> None:
        """Make ``default`` the default network; a previous one (another ``--bridge``/``--bip``)
        may only be replaced when no container is connected to it."""
        st = self._st
        previous = [n for n in st.networks.values() if n.default]
        for old in previous:
            if old.id == default.id:
                self._adopt_default_ipv6(old, default)
                continue
            if st.network_endpoints(old.id):
                raise NetdError(
                    f"default network changed from {old.bridge} {old.subnet} to "
                    f"{default.bridge} {default.subnet} while containers are connected to it; "
                    "remove the containers first"
                )
            st.drop_network(old.id)
            if old.bridge != default.bridge:
                # Its bridge is left to the next setup() to delete, as a network being removed.
                old.default, old.state, old.name = False, REMOVING, f"{old.name}-{old.id[:12]}"
                st.add_network(old)
        if default.id not in st.networks:
            for net in st.networks.values():
                if net.state == REMOVING:
                    continue
                if net.bridge == default.bridge:
                    raise Conflict(
                        f'default bridge {default.bridge} is the bridge of network "{net.name}"'
                    )
                if (
                    default.subnet6
                    and net.subnet6
                    and IPv6Network(net.subnet6).overlaps(IPv6Network(default.subnet6))
                ):
                    raise Conflict(
                        f"default bridge IPv6 subnet {default.subnet6} overlaps network "
                        f'"{net.name}" ({net.subnet6})'
                    )
                if IPv4Network(net.subnet).overlaps(IPv4Network(default.subnet)):
                    raise Conflict(
                        f"default bridge subnet {default.subnet} overlaps network "
                        f'"{net.name}" ({net.subnet})'
                    )
            rest = dict(st.networks)
            st.networks.clear()
            st.add_network(default)
            for nid, net in rest.items():
                ipam = st.ipams[nid]
                st.networks[nid], st.ipams[nid] = net, ipam

    def _adopt_default_ipv6(self, old: Network, default: Network) -> None:
        """The same default network with another ``--ipv6``/``--fixed-cidr-v6``: its IPv6
        part changes, only while no container is connected to it."""
        if (old.subnet6, old.gateway6) == (default.subnet6, default.gateway6):
            return
        st = self._st
        if st.network_endpoints(old.id):
            raise NetdError(
                f"default network IPv6 subnet changed from {old.subnet6 or 'none'} to "
                f"{default.subnet6 or 'none'} while containers are connected to it; "
                "remove the containers first"
            )
        for net in st.networks.values():
            if net.id != old.id and net.subnet6 and default.subnet6:
                if IPv6Network(net.subnet6).overlaps(IPv6Network(default.subnet6)):
                    raise Conflict(
                        f"default bridge IPv6 subnet {default.subnet6} overlaps network "
                        f'"{net.name}" ({net.subnet6})'
                    )
        old.enable_ipv6, old.subnet6, old.gateway6 = (
            default.enable_ipv6,
            default.subnet6,
            default.gateway6,
        )
        old.configured_subnet6 = default.configured_subnet6
        st.add_network(old)  # rebuilds its IPAMs (both empty: no endpoints)
        if not old.subnet6:
            st.ipams6.pop(old.id, None)

    def _save_firewall_record(self) -> None:
        write_json_atomic(
            self._network_file,
            {
                "bridge": self.cfg.bridge,
                "subnet": self.default_network.subnet,
                "gateway": self.default_network.gateway,
                "firewall_backend": self.cfg.firewall_backend,
                "table": self.cfg.table,
                "userland_proxy": self.cfg.userland_proxy,
                "forward_policy_before": self._firewall.forward_policy_before,
            },
        )

    def _load_state(self, default: Network) -> NetdState:
        """The persisted state; one that cannot be read (bad JSON, wrong shape) is set aside
        and logged, and the networks start from the default one alone."""
        try:
            return NetdState.load(self._state_file, default, self._state_dir / IPAM_FILE)
        except NetdError:
            raise  # e.g. a newer daemon's state version: not to be thrown away
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            set_aside(self._state_file, e)
            return NetdState.load(self._state_file, default, self._state_dir / IPAM_FILE)

    def _read_network_record(self) -> dict[str, Any]:
        """What _save_firewall_record() wrote; {} when missing, or corrupt (set aside)."""
        try:
            previous = read_record(self._network_file, None) or {}
            if not isinstance(previous, dict):
                raise CorruptRecord("not a JSON object")
        except CorruptRecord as e:
            set_aside(self._network_file, e)
            return {}
        return previous

    def _remove_previous_firewall(self) -> None:
        """A daemon started before with another backend or table left its rules behind."""
        previous = self._read_network_record()
        backend, table = previous.get("firewall_backend"), previous.get("table")
        current = (self.cfg.firewall_backend, self.cfg.table)
        if not backend or not table or (backend, table) == current:
            return
        log.info("removing the rules of the previous firewall (%s, table %s)", backend, table)
        try:
            old = make_firewall(backend, table, bool(previous.get("userland_proxy")))
            old.forward_policy_before = previous.get("forward_policy_before")
            old.uninstall()
        except NetdError as exc:
            log.warning("cannot remove the previous %s rules of %s: %s", backend, table, exc)

    def _firewall_mappings(self) -> list[PortMapping]:
        return firewall_mappings(p for ports in self._st.ports.values() for p in ports)

    def _install_firewall(self) -> None:
        """Rebuild the whole ruleset from the state, in one transaction; with the return path
        of transparent proxying while any port is in that mode."""
        networks = [
            n.firewall_view()
            for n in self._st.networks.values()
            if n.state != REMOVING and n.is_bridge  # macvlan/ipvlan: no rule at all
        ]
        transparent = any(p.proxy_only for ports in self._st.ports.values() for p in ports)
        previous = self._firewall.transparent_mark
        self._firewall.transparent_mark = self.cfg.transparent_mark if transparent else None
        try:
            if transparent:  # the route before the marks, so no marked packet is forwarded
                self._return_path.install()
                self._return_path_up = True
            self._firewall.install(networks, self._firewall_mappings())
        except BaseException:
            self._firewall.transparent_mark = previous  # the kernel's ruleset is unchanged
            raise
        if not transparent and self._return_path_up:
            self._remove_return_path()

    def _sync_return_path(self) -> None:
        """After the first transparent port came or the last one went."""
        transparent = any(p.proxy_only for ports in self._st.ports.values() for p in ports)
        if transparent != (self._firewall.transparent_mark is not None):
            self._install_firewall()

    def _remove_return_path(self) -> None:
        self._return_path.remove()
        self._return_path_up = False

    def _require_ready(self) -> None:
        if not self._ready:
            raise NetdError("network controller is not set up (call setup() first)")

    @property
    def default_network(self) -> Network:
        return next(n for n in self._st.networks.values() if n.default)

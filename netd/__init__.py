"""netd: the bridge network driver of pyengine (IPAM, bridge, veth, firewall, port mapping, the
embedded DNS). This module is its facade: the engine imports netd through these names only."""

from netd.controller import STATE_DIR, NetdConfig, NetworkController
from netd.dns.resolvconf import DNS_PORT, HOST_RESOLV_CONF, container_resolv_conf
from netd.dns.service import EmbeddedDns
from netd.errors import NetdError
from netd.network import DEFAULT_NETWORK, OPT_BRIDGE_NAME, PREDEFINED_NETWORKS, Network
from netd.state import Endpoint, PublishedPort

__all__ = [
    "DEFAULT_NETWORK",
    "DNS_PORT",
    "HOST_RESOLV_CONF",
    "OPT_BRIDGE_NAME",
    "PREDEFINED_NETWORKS",
    "STATE_DIR",
    "EmbeddedDns",
    "Endpoint",
    "NetdConfig",
    "NetdError",
    "Network",
    "NetworkController",
    "PublishedPort",
    "container_resolv_conf",
]

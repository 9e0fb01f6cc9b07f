"""netd: the bridge network driver of pyengine (IPAM, bridge, veth, firewall, port mapping, the
embedded DNS). This module is its facade: the engine imports netd through these names only."""

from netd.controller import STATE_DIR, NetdConfig, NetworkController
from netd.dns.containers import ContainerDns, ContainerFiles, DnsRequest
from netd.dns.resolvconf import DNS_PORT
from netd.dns.service import EmbeddedDns
from netd.errors import NetdError
from netd.network import DEFAULT_NETWORK, OPT_BRIDGE_NAME, PREDEFINED_NETWORKS, Network
from netd.state import Endpoint, PublishedPort

__all__ = [
    "DEFAULT_NETWORK",
    "DNS_PORT",
    "OPT_BRIDGE_NAME",
    "PREDEFINED_NETWORKS",
    "STATE_DIR",
    "ContainerDns",
    "ContainerFiles",
    "DnsRequest",
    "EmbeddedDns",
    "Endpoint",
    "NetdConfig",
    "NetdError",
    "Network",
    "NetworkController",
    "PublishedPort",
]

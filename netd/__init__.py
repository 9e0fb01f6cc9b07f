"""netd: the bridge network driver of pyengine (IPAM, bridge, veth, firewall, port mapping, the
embedded DNS). This module is its facade: the engine imports netd through these names only.

The names are resolved on first use (PEP 562 ``__getattr__``), so importing one of netd's
subpackages alone (the CNI plugin's entry point, netd/cni/main.py, which answers VERSION and
configuration errors without netd) does not import pyroute2 and libnftables (~0.15 s)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netd.controller import STATE_DIR, NetdConfig, NetworkController
    from netd.dns.containers import ContainerDns, ContainerFiles, DnsRequest
    from netd.dns.resolvconf import DNS_PORT
    from netd.dns.service import EmbeddedDns
    from netd.errors import NetdError
    from netd.network import DEFAULT_NETWORK, OPT_BRIDGE_NAME, PREDEFINED_NETWORKS, Network
    from netd.state import Endpoint, PublishedPort

_FACADE = {
    "DEFAULT_NETWORK": "netd.network",
    "DNS_PORT": "netd.dns.resolvconf",
    "OPT_BRIDGE_NAME": "netd.network",
    "PREDEFINED_NETWORKS": "netd.network",
    "STATE_DIR": "netd.controller",
    "ContainerDns": "netd.dns.containers",
    "ContainerFiles": "netd.dns.containers",
    "DnsRequest": "netd.dns.containers",
    "EmbeddedDns": "netd.dns.service",
    "Endpoint": "netd.state",
    "NetdConfig": "netd.controller",
    "NetdError": "netd.errors",
    "Network": "netd.network",
    "NetworkController": "netd.controller",
    "PublishedPort": "netd.state",
}

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


def __getattr__(name: str) -> Any:
    module = _FACADE.get(name)
    if module is None:
        raise AttributeError(f"module 'netd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

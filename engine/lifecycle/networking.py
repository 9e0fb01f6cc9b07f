"""Which networks a container joins: Docker's ``HostConfig.NetworkMode`` and
``NetworkingConfig.EndpointsConfig`` (or a later ``network connect``) checked against netd's
networks and turned into the container's attachments, before anything exists in the kernel.

Docker's rules, kept here: a container is created on its NetworkMode's network and, from API
1.44, on the others its EndpointsConfig names;
``--ip`` needs a user-defined network whose subnet the user configured; ``--network-alias`` needs a
user-defined network; the default network ``bridge`` has no embedded DNS, so a container whose
first network is ``bridge`` keeps the host's resolvers, and one whose first network is
user-defined gets the embedded DNS server (127.0.0.11).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from common import errors
from common.macaddr import parse_mac
from common.ports import PortKey
from engine.lifecycle.containers import Container, NetworkAttachment
from netd import DEFAULT_NETWORK, OPT_BRIDGE_NAME, PREDEFINED_NETWORKS, Endpoint, NetdError, Network

__all__ = [
    "DEFAULT_NETWORK",
    "OPT_BRIDGE_NAME",
    "PREDEFINED_NETWORKS",
    "Endpoint",
    "Network",
    "NetworkNotFound",
]

# NetworkMode values that mean the default network.
DEFAULT_NETWORK_MODES = ("", "default", DEFAULT_NETWORK)
_ALIAS = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")


class NetworkNotFound(errors.NotFound):
    """No such network, or the container is not on it."""


class NetworkRequestError(ValueError):
    """What the client asked for cannot be done (a 400, one line)."""


def network_name_of_mode(mode: str) -> str:
    return DEFAULT_NETWORK if mode in DEFAULT_NETWORK_MODES else mode


def attachment_for(network: Network, endpoint_config: dict[str, Any] | None) -> NetworkAttachment:
    """One network and Docker's EndpointSettings for it (IPAMConfig, Aliases) → an attachment;
    NetworkRequestError for what Docker refuses too."""
    config = endpoint_config or {}
    if not isinstance(config, dict):
        raise NetworkRequestError("an endpoint configuration must be an object")
    ipam = config.get("IPAMConfig") or {}
    if not isinstance(ipam, dict):
        raise NetworkRequestError("IPAMConfig must be an object")
    ip = ipam.get("IPv4Address") or ""
    ip6 = check_ipv6_address(network, ipam["IPv6Address"]) if ipam.get("IPv6Address") else ""
    if ip:
        if network.default:
            raise NetworkRequestError(
                "user specified IP address is supported on user defined networks only"
            )
        if not network.configured_subnet:
            raise NetworkRequestError(
                "user specified IP address is supported only when connecting to networks "
                "with user configured subnets"
            )
        try:
            address = IPv4Address(ip)
        except ValueError:
            raise NetworkRequestError(f"invalid IPv4 address: {ip}") from None
        if address not in IPv4Network(network.subnet):
            raise NetworkRequestError(
                f"no configured subnet contains IP address {ip} (network {network.name}: "
                f"{network.subnet})"
            )
        ip = str(address)
    aliases = config.get("Aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise NetworkRequestError("Aliases must be a list of strings")
    if aliases and network.default:
        raise NetworkRequestError(
            "network-scoped alias is supported only for containers in user defined networks"
        )
    for alias in aliases:
        if not _ALIAS.fullmatch(alias):
            raise NetworkRequestError(f'invalid network alias "{alias}"')
    unique = list(dict.fromkeys(aliases))
    mac = config.get("MacAddress") or ""
    if mac:
        if network.driver == "ipvlan":
            raise NetworkRequestError("an ipvlan interface has its parent's MAC: no --mac-address")
        try:
            mac = parse_mac(mac)
        except ValueError as e:
            raise NetworkRequestError(str(e)) from None
    return NetworkAttachment(network.id, network.name, ip, unique, ip6, mac)


def check_ipv6_address(network: Network, ip6: Any) -> str:
    """Docker's checks of ``--ip6`` (``IPAMConfig.IPv6Address``) on ``network``: the address,
    normalised."""
    if not network.subnet6:
        raise NetworkRequestError(f"invalid IPv6 address {ip6}: network {network.name} has no IPv6")
    if not network.configured_subnet6:
        raise NetworkRequestError(
            "user specified IP address is supported only when connecting to networks "
            "with user configured subnets"
        )
    try:
        address = IPv6Address(str(ip6))
    except ValueError:
        raise NetworkRequestError(f"invalid IPv6 address: {ip6}") from None
    if address not in IPv6Network(network.subnet6):
        raise NetworkRequestError(
            f"no configured subnet contains IP address {ip6} (network {network.name}: "
            f"{network.subnet6})"
        )
    return str(address)


def plan_attachments(
    mode: str,
    endpoints_config: dict[str, Any] | None,
    find: Callable[[str], Network],
) -> list[NetworkAttachment]:
    """The networks a new container is created on: NetworkMode's first (the default one when
    unset, its ``eth0``), with its EndpointsConfig entry, then every other EndpointsConfig
    entry in order (API 1.44; the API refuses several below). ``find`` resolves a name or id
    (a NotFound when missing). The other modes (none, host, container:) are
    engine.lifecycle.netmodes'."""
    endpoints = endpoints_config or {}
    if not isinstance(endpoints, dict):
        raise NetworkRequestError("NetworkingConfig.EndpointsConfig must be an object")
    network = _find(find, network_name_of_mode(mode))
    config: dict[str, Any] | None = None
    others: list[NetworkAttachment] = []
    for ref, endpoint in endpoints.items():
        other = _find(find, network_name_of_mode(ref))
        if other.id == network.id:
            config = endpoint
        elif any(a.network_id == other.id for a in others):
            raise NetworkRequestError(f"network {ref} is given twice in EndpointsConfig")
        else:
            others.append(attachment_for(other, endpoint))
    return [attachment_for(network, config), *others]


def _find(find: Callable[[str], Network], ref: str) -> Network:
    try:
        return find(ref)
    except errors.NotFound:
        raise NetworkRequestError(f"network {ref} not found") from None
    except NetdError as e:
        raise NetworkRequestError(str(e)) from None


def dns_names(container: Container, attachment: NetworkAttachment) -> list[str]:
    """What others on a network resolve the container by: its name, its short id and its
    aliases on that network (Docker's embedded DNS answers the same names)."""
    return list(dict.fromkeys([container.name, container.id[:12], *attachment.aliases]))


# Container labels that choose PROXY protocol toward the container per published TCP port
# (docs/proxy.md): the first for every port, the second (``<label>.<port>/tcp``) for one port.
PROXY_PROTOCOL_LABEL = "pyengine.proxy-protocol"
PROXY_PROTOCOL_VALUES = ("v1", "v2", "off")


def proxy_protocol_labels(labels: dict[str, str]) -> dict[str, str]:
    """The container's PROXY protocol labels, checked: key -> v1|v2|off."""
    chosen: dict[str, str] = {}
    for key, value in labels.items():
        if key != PROXY_PROTOCOL_LABEL and not key.startswith(PROXY_PROTOCOL_LABEL + "."):
            continue
        port_key = key[len(PROXY_PROTOCOL_LABEL) + 1 :]
        if port_key:
            try:
                proto = PortKey.parse(port_key).proto
            except ValueError:
                proto = ""
            if proto != "tcp":
                raise NetworkRequestError(
                    f'invalid label "{key}": want {PROXY_PROTOCOL_LABEL}.<port>/tcp '
                    "(PROXY protocol is for TCP ports only)"
                )
        if value not in PROXY_PROTOCOL_VALUES:
            raise NetworkRequestError(
                f'invalid value "{value}" for label {key} (want v1, v2 or off)'
            )
        chosen[key] = value
    return chosen


def proxy_protocol_for(labels: dict[str, str], container_port: int, proto: str) -> str:
    """ "v1", "v2" or "" (off) for one published port."""
    if proto != "tcp":
        return ""
    chosen = proxy_protocol_labels(labels)
    value = chosen.get(
        f"{PROXY_PROTOCOL_LABEL}.{container_port}/tcp",
        chosen.get(f"{PROXY_PROTOCOL_LABEL}.{container_port}", chosen.get(PROXY_PROTOCOL_LABEL)),
    )
    return "" if value in (None, "off") else value

"""Docker's network modes besides bridge networks: ``none``, ``host`` and
``container:<name|id>``, checked at create as Docker does, and the two predefined networks
``none`` and ``host`` that ``GET /networks`` lists (netd only keeps bridge networks).

* ``none``: a network namespace of its own (runc makes it; only ``lo``, which runc brings up),
  no endpoint, no published port, no embedded DNS;
* ``host``: no network namespace at all: the host's interfaces, its /etc/hosts and resolv.conf,
  its hostname unless one is given; published ports are discarded with Docker's warning;
* ``container:<ref>``: the namespace of another, running, container, with its hostname, hosts
  and resolv.conf files (moby daemon/container_operations.go ``initializeNetworking``).

The conflicts are moby's ``validateNetContainerMode`` (runconfig/hostconfig.go) with its
messages (runconfig/errors.go).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from common.timefmt import utc_rfc3339
from engine.lifecycle.networking import NetworkRequestError
from netd import Network

NONE, HOST, CONTAINER, BRIDGE = "none", "host", "container", "bridge"
CONTAINER_PREFIX = "container:"

# runconfig/errors.go
CONFLICT_HOSTNAME = "conflicting options: hostname and the network mode"
CONFLICT_LINKS = (
    "conflicting options: container type network can't be used with links. "
    "This would result in undefined behavior"
)
CONFLICT_DNS = "conflicting options: dns and the network mode"
CONFLICT_HOSTS = "conflicting options: custom host-to-IP mapping and the network mode"
CONFLICT_MAC = "conflicting options: mac-address and the network mode"
CONFLICT_PUBLISH = "conflicting options: port publishing and the container type network mode"
CONFLICT_EXPOSE = "conflicting options: port exposing and the container type network mode"
CONFLICT_SHARED = (
    "container sharing network namespace with another container or host cannot be "
    "connected to any other network"
)
CONFLICT_HOST_NETWORK = (
    "container cannot be disconnected from host network or connected to host network"
)
CONFLICT_NO_NETWORK = (
    "container cannot be connected to multiple networks with one of the networks in private "
    "(none) mode"
)
UNSUPPORTED_IP = "user specified IP address is supported on user defined networks only"
UNSUPPORTED_ALIAS = "network-scoped alias is supported only for containers in user defined networks"
# moby daemon/daemon_unix.go verifyPlatformContainerSettings
HOST_PORTS_WARNING = "Published ports are discarded when using host network mode"


@dataclass(frozen=True)
class NetworkMode:
    """``HostConfig.NetworkMode`` parsed: its kind, and the container it names (container
    kind) or the network (bridge kind: "", "default", "bridge" or a user-defined one)."""

    kind: str
    ref: str

    @classmethod
    def parse(cls, mode: str) -> NetworkMode:
        if mode in (NONE, HOST):
            return cls(mode, mode)
        if mode.startswith(CONTAINER_PREFIX):
            ref = mode[len(CONTAINER_PREFIX) :]
            if not ref:
                raise NetworkRequestError(
                    "Invalid network mode: invalid container format container:<name|id>"
                )
            return cls(CONTAINER, ref)
        return cls(BRIDGE, mode)

    @property
    def shares(self) -> bool:
        """Whether the container uses a namespace it does not own (the host's, another's)."""
        return self.kind in (HOST, CONTAINER)


def mode_of(host_config: dict[str, Any]) -> NetworkMode:
    """The mode of a container's record (written as checked at create)."""
    try:
        return NetworkMode.parse(str(host_config.get("NetworkMode") or ""))
    except NetworkRequestError:
        return NetworkMode(BRIDGE, "")


def check_mode_conflicts(
    config: dict[str, Any], host_config: dict[str, Any], endpoints: dict[str, Any] | None
) -> NetworkMode:
    """Docker's refusals for a create in a non-bridge mode (in moby's order); the mode."""
    mode = NetworkMode.parse(str(host_config.get("NetworkMode") or ""))
    if mode.kind == BRIDGE:
        return mode
    container = mode.kind == CONTAINER
    endpoint_configs = [e for e in (endpoints or {}).values() if isinstance(e, dict)]
    if container and config.get("Hostname"):
        raise NetworkRequestError(CONFLICT_HOSTNAME)
    if container and host_config.get("Links"):
        raise NetworkRequestError(CONFLICT_LINKS)
    if container and host_config.get("Dns"):
        raise NetworkRequestError(CONFLICT_DNS)
    if container and host_config.get("ExtraHosts"):
        raise NetworkRequestError(CONFLICT_HOSTS)
    if mode.shares and (
        config.get("MacAddress") or any(e.get("MacAddress") for e in endpoint_configs)
    ):
        raise NetworkRequestError(CONFLICT_MAC)
    if container and (host_config.get("PortBindings") or host_config.get("PublishAllPorts")):
        raise NetworkRequestError(CONFLICT_PUBLISH)
    if container and config.get("ExposedPorts"):
        raise NetworkRequestError(CONFLICT_EXPOSE)
    for key in endpoints or {}:
        if key != host_config.get("NetworkMode"):
            raise NetworkRequestError(CONFLICT_NO_NETWORK if mode.kind == NONE else CONFLICT_SHARED)
    for endpoint in endpoint_configs:
        ipam = endpoint.get("IPAMConfig") or {}
        if isinstance(ipam, dict) and (ipam.get("IPv4Address") or ipam.get("IPv6Address")):
            raise NetworkRequestError(UNSUPPORTED_IP)
        if endpoint.get("Aliases"):
            raise NetworkRequestError(UNSUPPORTED_ALIAS)
    return mode


def create_warnings(host_config: dict[str, Any]) -> list[str]:
    """The create response's Warnings for what the mode makes the daemon ignore."""
    if host_config.get("NetworkMode") == HOST and host_config.get("PortBindings"):
        return [HOST_PORTS_WARNING]
    return []


def _predefined(name: str, driver: str) -> Network:
    # Stable ids: Docker keeps the ids of its predefined networks across restarts too.
    network_id = hashlib.sha256(f"pyengine predefined network {name}".encode()).hexdigest()
    return Network(
        id=network_id,
        name=name,
        bridge="",
        subnet="",
        gateway="",
        driver=driver,
        created=_STARTED,
    )


_STARTED = utc_rfc3339(digits=6)
# Docker's driver names: "null" for none, "host" for host.
MODE_NETWORKS = {NONE: _predefined(NONE, "null"), HOST: _predefined(HOST, HOST)}


def mode_network(ref: str) -> Network | None:
    """The predefined ``none`` or ``host`` network named ``ref`` (or with that id prefix)."""
    for net in MODE_NETWORKS.values():
        if ref and (ref == net.name or net.id.startswith(ref)):
            return net
    return None


def is_mode_network(network_id: str) -> bool:
    return any(n.id == network_id for n in MODE_NETWORKS.values())

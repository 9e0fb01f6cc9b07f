"""``/networks``: the default bridge network, in Docker's shapes.

Only Docker's default network, ``bridge``, exists (netd's bridge, ``--bridge``/``--bip``).
User-defined networks are not built yet: creating, connecting and disconnecting answer 501, and
removing ``bridge`` is refused as Docker refuses it (403).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from aiohttp import web

from engine.api_common import (
    Forbidden,
    NotFound,
    NotImplementedByEngine,
    json_body,
    json_response,
    parse_filters,
)
from engine.containers import Container, now_rfc3339
from engine.engine import Engine

DEFAULT_NETWORK = "bridge"
NETWORK_FILTERS = {"name", "id", "driver", "type", "scope", "label", "dangling"}
NO_USER_NETWORKS = (
    "user-defined networks are not supported by pyengined yet: only the default network "
    f'"{DEFAULT_NETWORK}" exists'
)


@dataclass(frozen=True)
class DefaultNetwork:
    """Docker's view of netd's bridge: a stable ID derived from its name and address."""

    bridge: str
    gateway: IPv4Interface
    created: str

    @classmethod
    def of(cls, engine: Engine, created: str) -> DefaultNetwork:
        cfg = engine.network.cfg
        return cls(cfg.bridge, IPv4Interface(cfg.bridge_cidr), created)

    @property
    def id(self) -> str:
        seed = f"pyengine default network {self.bridge} {self.gateway.with_prefixlen}"
        return hashlib.sha256(seed.encode()).hexdigest()

    def matches(self, ref: str) -> bool:
        return ref == DEFAULT_NETWORK or (ref != "" and self.id.startswith(ref))


def endpoint_id(container: Container) -> str:
    """A stable 64-hex endpoint ID for a container's place on the default network."""
    return hashlib.sha256(f"pyengine endpoint {container.id}".encode()).hexdigest()


class NetworksApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.created = now_rfc3339()

    def default(self) -> DefaultNetwork:
        return DefaultNetwork.of(self.engine, self.created)

    def _get(self, ref: str) -> DefaultNetwork:
        net = self.default()
        if not net.matches(ref):
            raise NotFound(f"network {ref} not found")
        return net

    def inspect(self, net: DefaultNetwork) -> dict[str, Any]:
        containers = {
            c.id: {
                "Name": c.name,
                "EndpointID": endpoint_id(c),
                "MacAddress": c.network.mac,
                "IPv4Address": f"{c.network.ip}/{c.network.prefixlen}",
                "IPv6Address": "",
            }
            for c in self.engine.containers.all()
            if c.state.running and c.network.ip
        }
        return {
            "Name": DEFAULT_NETWORK,
            "Id": net.id,
            "Created": net.created,
            "Scope": "local",
            "Driver": "bridge",
            "EnableIPv6": False,
            "IPAM": {
                "Driver": "default",
                "Options": None,
                "Config": [
                    {
                        "Subnet": str(net.gateway.network),
                        "Gateway": str(net.gateway.ip),
                    }
                ],
            },
            "Internal": False,
            "Attachable": False,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": containers,
            "Options": {
                "com.docker.network.bridge.default_bridge": "true",
                "com.docker.network.bridge.enable_icc": "true",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
                "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
                "com.docker.network.bridge.name": net.bridge,
                "com.docker.network.driver.mtu": "1500",
            },
            "Labels": {},
        }

    def _listed(self, net: DefaultNetwork, filters: dict[str, list[str]]) -> bool:
        checks = {
            "name": lambda v: v in DEFAULT_NETWORK,
            "id": lambda v: net.id.startswith(v),
            "driver": lambda v: v == "bridge",
            "type": lambda v: v == "builtin",
            "scope": lambda v: v == "local",
            "label": lambda v: False,
            "dangling": lambda v: v.lower() in ("0", "false"),
        }
        return all(any(checks[key](v) for v in values) for key, values in filters.items())

    async def list(self, request: web.Request) -> web.Response:
        filters = parse_filters(request, NETWORK_FILTERS)
        net = self.default()
        out = [self.inspect(net)] if self._listed(net, filters) else []
        return json_response(out)

    async def inspect_handler(self, request: web.Request) -> web.Response:
        return json_response(self.inspect(self._get(request.match_info["id"])))

    async def create(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        name = body.get("Name")
        if name == DEFAULT_NETWORK:
            raise Forbidden(f"network with name {name} already exists")
        raise NotImplementedByEngine(f"cannot create network {name!r}: {NO_USER_NETWORKS}")

    async def remove(self, request: web.Request) -> web.Response:
        self._get(request.match_info["id"])
        raise Forbidden(f"{DEFAULT_NETWORK} is a pre-defined network and cannot be removed")

    async def connect(self, request: web.Request) -> web.Response:
        self._get(request.match_info["id"])
        raise NotImplementedByEngine(
            "connecting a container to a network after it was created is not supported by "
            "pyengined yet: containers join the default network when they start"
        )

    async def disconnect(self, request: web.Request) -> web.Response:
        self._get(request.match_info["id"])
        raise NotImplementedByEngine(
            "disconnecting a container from the default network is not supported by pyengined"
        )

    async def prune(self, request: web.Request) -> web.Response:
        return json_response({"NetworksDeleted": []})

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/networks", self.list),
            ("POST", "/networks/create", self.create),
            ("POST", "/networks/prune", self.prune),
            ("GET", "/networks/{id}", self.inspect_handler),
            ("DELETE", "/networks/{id}", self.remove),
            ("POST", "/networks/{id}/connect", self.connect),
            ("POST", "/networks/{id}/disconnect", self.disconnect),
        ]

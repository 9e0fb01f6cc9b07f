"""``/networks``: the default ``bridge`` network and user-defined bridge, macvlan and ipvlan
networks, in Docker's shapes (Engine API v1.41 ``NetworkResource``, ``NetworkCreateRequest``,
``NetworkConnect``).

IPv6 networks (``EnableIPv6``) take up to one IPv4 and one IPv6 ``IPAM.Config`` entry. Two
subnets of one family, the overlay (and any other) driver, ingress/config-only networks answer
501 with the reason, never a silent no-op. ``Attachable`` is kept and shown, as Docker does for
a local network (what compose v1 sends). A driver's options are checked by netd (a bad one, or
an ipvlan network on a kernel without ipvlan: 400).
"""

from __future__ import annotations

import builtins
from typing import Any

from aiohttp import web

from common import errors
from common.macaddr import parse_mac
from common.timefmt import unix_time
from engine.api.bodies import NETWORK_CONNECT, NETWORK_CREATE, NETWORK_DISCONNECT, check
from engine.api.common import (
    BadParameter,
    Forbidden,
    NotImplementedByEngine,
    flag,
    json_body,
    json_response,
    parse_filters,
)
from engine.api.timefilter import parse_until
from engine.api.version import API_VERSION, V1_44, V1_45, ApiVersion, api_version
from engine.lifecycle.containers import Container
from engine.lifecycle.engine import Engine
from engine.lifecycle.networking import (
    DEFAULT_NETWORK,
    OPT_BRIDGE_NAME,
    PREDEFINED_NETWORKS,
    Endpoint,
    Network,
    dns_names,
)

DRIVERS = ("bridge", "macvlan", "ipvlan")
NETWORK_FILTERS = {"name", "id", "driver", "type", "scope", "label", "dangling"}

# What Docker shows for its default network's options (with our bridge's name).
_DEFAULT_NETWORK_OPTIONS = {
    "com.docker.network.bridge.default_bridge": "true",
    "com.docker.network.bridge.enable_icc": "true",
    "com.docker.network.bridge.enable_ip_masquerade": "true",
    "com.docker.network.bridge.host_binding_ipv4": "0.0.0.0",
    "com.docker.network.driver.mtu": "1500",
}


def endpoint_settings(
    network: Network,
    ep: Endpoint | None,
    aliases: list[str],
    mac: str = "",
    dns_names: list[str] | None = None,
    version: ApiVersion = API_VERSION,
) -> dict[str, Any]:
    """Docker's ``EndpointSettings`` of a container on ``network`` (``ep`` None: not running;
    ``mac`` the MAC asked for, ``dns_names`` what the embedded DNS answers for it there)."""
    if version.below(V1_45) and ep is not None and not network.default and dns_names:
        # Below 1.45 Docker lists the short container id among a live endpoint's aliases.
        aliases = [*aliases, *(n for n in dns_names[1:2] if n not in aliases)]
    settings = {
        "IPAMConfig": None,
        "Links": None,
        "Aliases": (aliases or None) if not network.default else None,
        "NetworkID": network.id,
        "EndpointID": ep.id if ep else "",
        "Gateway": ep.gateway if ep else "",
        "IPAddress": ep.ip if ep else "",
        "IPPrefixLen": ep.prefixlen if ep else 0,
        "IPv6Gateway": ep.ipv6_gateway if ep else "",
        "GlobalIPv6Address": ep.ipv6 if ep else "",
        "GlobalIPv6PrefixLen": ep.ipv6_prefixlen if ep else 0,
        "MacAddress": ep.mac if ep else mac,
        "DriverOpts": None,
    }
    if version.at_least(V1_44):
        settings["DNSNames"] = (dns_names or None) if not network.default else None
    return settings


# EndpointSettings a client may send that pyengined cannot honour: refused (501), never ignored.
_UNSUPPORTED_ENDPOINT_SETTINGS = {
    "Links": "links (--link)",
    "DriverOpts": "endpoint driver options (--driver-opt)",
}


def check_endpoint_config(config: Any, version: ApiVersion = API_VERSION) -> None:
    """Refuse (501) what one ``EndpointSettings`` of a create or a connect asks for and
    pyengined cannot do, and a malformed MacAddress (400); its other types and addresses are
    checked by the engine. Below API 1.44 Docker ignores ``MacAddress`` here (the create's
    ``Config.MacAddress`` is the container's); so does this, by dropping it."""
    if not isinstance(config, dict):
        return
    for key, what in _UNSUPPORTED_ENDPOINT_SETTINGS.items():
        if config.get(key):
            raise NotImplementedByEngine(f"{what} is not supported by pyengined")
    if version.below(V1_44):
        config.pop("MacAddress", None)
    elif config.get("MacAddress"):
        try:
            config["MacAddress"] = parse_mac(config["MacAddress"])
        except ValueError as e:
            raise BadParameter(str(e)) from None
    ipam = config.get("IPAMConfig")
    if isinstance(ipam, dict) and ipam.get("LinkLocalIPs"):
        raise NotImplementedByEngine(
            "link-local addresses (--link-local-ip) are not supported by pyengined"
        )


def _configs_by_family(configs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``IPAM.Config`` as (its IPv4 entry, its IPv6 entry), each {} when absent; an entry's
    family is its subnet's (or, without one, its gateway's)."""
    by_family: dict[int, dict[str, Any]] = {}
    for config in configs:
        if config.get("AuxiliaryAddresses"):
            raise NotImplementedByEngine("--aux-address is not supported by pyengined")
        address = str(config.get("Subnet") or config.get("Gateway") or "")
        family = 6 if ":" in address else 4
        if family in by_family:
            raise NotImplementedByEngine(
                f"several IPv{family} subnets per network are not supported by pyengined"
            )
        if family == 6 and config.get("IPRange"):
            raise NotImplementedByEngine("an IPv6 --ip-range is not supported by pyengined")
        by_family[family] = config
    return by_family.get(4, {}), by_family.get(6, {})


def _label_matches(labels: dict[str, str], wanted: str) -> bool:
    key, eq, value = wanted.partition("=")
    return key in labels and (not eq or labels[key] == value)


class NetworksApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def inspect(self, net: Network, verbose: bool = False) -> dict[str, Any]:
        del verbose  # swarm-only detail
        containers: dict[str, dict[str, str]] = {}
        for c, ep in self.engine.network_endpoints(net):
            containers[ep.container_id] = {
                "Name": c.name if c else "",
                "EndpointID": ep.id,
                "MacAddress": ep.mac,
                "IPv4Address": f"{ep.ip}/{ep.prefixlen}" if ep.ip else "",
                "IPv6Address": f"{ep.ipv6}/{ep.ipv6_prefixlen}" if ep.ipv6 else "",
            }
        ipam_config: dict[str, str] = {"Subnet": net.subnet, "Gateway": net.gateway}
        if net.ip_range:
            ipam_config["IPRange"] = net.ip_range
        # none and host have no subnet (Docker shows no IPAM config for them).
        ipam_configs = [ipam_config] if net.subnet else []
        if net.subnet6:
            ipam_configs.append({"Subnet": net.subnet6, "Gateway": net.gateway6})
        options = (
            {**_DEFAULT_NETWORK_OPTIONS, OPT_BRIDGE_NAME: net.bridge}
            if net.default
            else dict(net.options)
        )
        return {
            "Name": net.name,
            "Id": net.id,
            "Created": net.created,
            "Scope": "local",
            "Driver": net.driver,
            "EnableIPv6": net.enable_ipv6,
            "IPAM": {
                "Driver": "default",
                "Options": {} if not net.default else None,
                "Config": ipam_configs,
            },
            "Internal": net.internal,
            "Attachable": net.attachable,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": containers,
            "Options": options,
            "Labels": dict(net.labels),
        }

    def _listed(self, net: Network, filters: dict[str, list[str]]) -> bool:
        builtin = net.name in PREDEFINED_NETWORKS

        def dangling(value: str) -> bool:
            unused = not builtin and not self.engine.network_endpoints(net)
            return unused if value.lower() in ("1", "true") else not unused

        checks = {
            "name": lambda v: v in net.name,
            "id": lambda v: net.id.startswith(v),
            "driver": lambda v: v == net.driver,
            "type": lambda v: v == ("builtin" if builtin else "custom"),
            "scope": lambda v: v == "local",
            "label": lambda v: _label_matches(net.labels, v),
            "dangling": dangling,
        }
        for value in filters.get("type", []):
            if value not in ("builtin", "custom"):
                raise BadParameter(f"invalid filter: 'type'='{value}'")
        return all(any(checks[key](v) for v in values) for key, values in filters.items())

    async def list(self, request: web.Request) -> web.Response:
        filters = parse_filters(request, NETWORK_FILTERS)
        nets = [n for n in self.engine.networks() if self._listed(n, filters)]
        return json_response([self.inspect(n) for n in nets])

    async def inspect_handler(self, request: web.Request) -> web.Response:
        net = self.engine.find_network(request.match_info["id"])
        return json_response(self.inspect(net, flag(request, "verbose")))

    async def create(self, request: web.Request) -> web.Response:
        body = check(await json_body(request), NETWORK_CREATE)
        name = body.get("Name")
        if not isinstance(name, str) or not name:
            raise BadParameter("a network needs a name (Name)")
        driver = body.get("Driver") or "bridge"
        if not isinstance(driver, str):
            raise BadParameter("Driver must be a string")
        if driver not in DRIVERS:
            raise NotImplementedByEngine(
                f'network driver "{driver}" is not supported by pyengined ({", ".join(DRIVERS)})'
            )
        for key in ("Ingress", "ConfigOnly"):
            if body.get(key):
                raise NotImplementedByEngine(f"{key} networks are not supported by pyengined")
        scope = body.get("Scope") or "local"
        if scope != "local":
            raise NotImplementedByEngine(
                f'scope "{scope}" networks are not supported by pyengined (local only)'
            )
        if (body.get("ConfigFrom") or {}).get("Network"):
            raise NotImplementedByEngine("ConfigFrom networks are not supported by pyengined")
        ipam = body.get("IPAM") or {}
        if not isinstance(ipam, dict):
            raise BadParameter("IPAM must be an object")
        if (ipam.get("Driver") or "default") != "default":
            raise NotImplementedByEngine(
                f'IPAM driver "{ipam["Driver"]}" is not supported by pyengined'
            )
        if ipam.get("Options"):
            raise NotImplementedByEngine("IPAM options are not supported by pyengined")
        configs = ipam.get("Config") or []
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise BadParameter("IPAM.Config must be a list of objects")
        config, config6 = _configs_by_family(configs)
        enable_ipv6 = body.get("EnableIPv6")
        if enable_ipv6 is not None and not isinstance(enable_ipv6, bool):
            raise BadParameter("EnableIPv6 must be a boolean")
        if config6 and not enable_ipv6:
            raise BadParameter("an IPv6 subnet or gateway needs EnableIPv6 (--ipv6)")
        options = body.get("Options") or {}
        labels = body.get("Labels") or {}
        if not isinstance(options, dict) or not isinstance(labels, dict):
            raise BadParameter("Options and Labels must be objects")
        if name in PREDEFINED_NETWORKS:
            raise Forbidden(f"{name} is a pre-defined network and cannot be created")
        net = await self.engine.create_network(
            name=name,
            subnet=config.get("Subnet") or None,
            gateway=config.get("Gateway") or None,
            ip_range=config.get("IPRange") or None,
            internal=bool(body.get("Internal")),
            enable_ipv6=bool(enable_ipv6),
            options=options,
            labels=labels,
            subnet6=config6.get("Subnet") or None,
            gateway6=config6.get("Gateway") or None,
            driver=driver,
            attachable=bool(body.get("Attachable")),
        )
        return json_response({"Id": net.id, "Warning": ""}, status=201)

    async def remove(self, request: web.Request) -> web.Response:
        net = self.engine.find_network(request.match_info["id"])
        if net.name in PREDEFINED_NETWORKS:
            raise Forbidden(f"{net.name} is a pre-defined network and cannot be removed")
        try:
            await self.engine.remove_network(net.id)
        except errors.Conflict as e:
            # Docker answers 403 for a network in use.
            raise Forbidden(f"error while removing network: {e}") from e
        return web.Response(status=204)

    async def connect(self, request: web.Request) -> web.Response:
        body = check(await json_body(request), NETWORK_CONNECT)
        ref = body.get("Container")
        if not isinstance(ref, str) or not ref:
            raise BadParameter("Container is required")
        endpoint_config = body.get("EndpointConfig") or {}
        if not isinstance(endpoint_config, dict):
            raise BadParameter("EndpointConfig must be an object")
        check_endpoint_config(endpoint_config, api_version(request))
        await self.engine.connect(ref, request.match_info["id"], endpoint_config)
        return web.Response(status=200)

    async def disconnect(self, request: web.Request) -> web.Response:
        body = check(await json_body(request), NETWORK_DISCONNECT)
        ref = body.get("Container")
        if not isinstance(ref, str) or not ref:
            raise BadParameter("Container is required")
        await self.engine.disconnect(ref, request.match_info["id"], bool(body.get("Force")))
        return web.Response(status=200)

    async def prune(self, request: web.Request) -> web.Response:
        """Docker's rule: a network no running container is connected to goes (a stopped
        container created on it then fails to start, as after ``network rm``). Filters as
        Docker's: ``until`` (created before; a duration back from now or a time), ``label``
        (every one given matches) and ``label!`` (none matches)."""
        filters = parse_filters(request, {"label", "label!", "until"})
        untils = [parse_until(v) for v in filters.get("until", [])]
        if len(untils) > 1:
            raise BadParameter("more than one until filter specified")
        deleted: list[str] = []
        for net in self.engine.networks():
            if net.name in PREDEFINED_NETWORKS or self.engine.network_endpoints(net):
                continue
            if any(not _label_matches(net.labels, v) for v in filters.get("label", [])):
                continue
            if any(_label_matches(net.labels, v) for v in filters.get("label!", [])):
                continue
            if untils and not (net.created and unix_time(net.created) < untils[0]):
                continue
            try:
                await self.engine.remove_network(net.id)
            except errors.Conflict:
                continue
            deleted.append(net.name)
        return json_response({"NetworksDeleted": deleted})

    def container_networks(
        self, c: Container, version: ApiVersion = API_VERSION
    ) -> dict[str, dict[str, Any]]:
        """``NetworkSettings.Networks`` of a container: each network it is (to be) on, in the
        shape of API ``version``."""
        endpoints = {ep.network_id: ep for ep in self.engine.endpoints(c)}
        out: dict[str, dict[str, Any]] = {}
        for a in self.engine.attachments(c):
            try:
                net = self.engine.find_network(a.network_id)
            except errors.NotFound:  # removed since the container was created on it
                continue
            settings = endpoint_settings(
                net,
                endpoints.get(a.network_id),
                a.aliases,
                a.mac,
                dns_names(c, a),
                version,
            )
            ipam = {k: v for k, v in (("IPv4Address", a.ip), ("IPv6Address", a.ip6)) if v}
            if ipam:
                settings["IPAMConfig"] = ipam
            out[net.name] = settings
        return out

    def routes(self) -> builtins.list[tuple[str, str, Any]]:
        return [
            ("GET", "/networks", self.list),
            ("POST", "/networks/create", self.create),
            ("POST", "/networks/prune", self.prune),
            ("GET", "/networks/{id}", self.inspect_handler),
            ("DELETE", "/networks/{id}", self.remove),
            ("POST", "/networks/{id}/connect", self.connect),
            ("POST", "/networks/{id}/disconnect", self.disconnect),
        ]


__all__ = ["DEFAULT_NETWORK", "NetworksApi", "check_endpoint_config", "endpoint_settings"]

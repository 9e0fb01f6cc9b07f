"""The invocation, parsed once at the boundary: the CNI_* environment and the network
configuration on stdin (CNI SPEC.md, "Parameters" and "Network configuration format").

The plugin's own keys, next to the spec's ``cniVersion``/``name``/``type``:

* ``bridge``: the Linux bridge (default ``pyecni-<8 hex of the name>``);
* ``ipam``: ``{"type": "host-local", "ranges": [[{"subnet", "gateway"}]], "routes": [...]}`` in
  host-local's syntax, served by netd's IPAM inside this plugin (no delegation): one IPv4 range
  set and at most one IPv6 one, one range each; without ``ipam`` the plugin runs chained after
  an interface plugin (the reference ``bridge``), in place of ``portmap``: port mappings only,
  to the addresses of ``prevResult``;
* ``ipMasq`` (default true standalone, false chained), ``isDefaultGateway`` (default true),
  ``mtu``;
* ``firewallBackend``: ``nftables`` (default) or ``iptables``; ``table``: its table / chain
  prefix (default ``pyecni_<8 hex of the name>``);
* ``userlandProxy``: published ports are served by pyengine-proxy processes as well (false);
* ``gatewayMode``: Docker 28's gateway mode of the network (netd/firewall/__init__.py):
  ``nat`` (default: containers are reached through the bridge or published ports only),
  ``nat-unprotected`` (also by hosts that route to their addresses: other nodes of a cluster)
  or ``routed`` (no masquerade; routed traffic reaches published ports only);
* ``dataDir``: where the network's state lives (default ``/var/lib/pyengine-cni/<name>``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from netd.cni.errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_ENVIRONMENT,
    CniError,
    config_error,
)
from netd.cni.versions import SUPPORTED_VERSIONS

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
MAX_CONFIG_BYTES = 4 << 20  # 1,000 port mappings are ~100 kB
DEFAULT_DATA_ROOT = Path("/var/lib/pyengine-cni")
BACKENDS = ("nftables", "iptables")
GATEWAY_MODES = ("nat", "nat-unprotected", "routed")  # netd's, but "isolated" (internal only)
VALID_ATTACHMENTS = "cni.dev/valid-attachments"

# SPEC.md: the network name and the container id.
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")
_BRIDGE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Range:
    subnet: IPNetwork
    gateway: IPAddress


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class PortMap:
    """One entry of ``runtimeConfig.portMappings`` (capability ``portMappings``)."""

    host_port: int
    container_port: int
    proto: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class Attachment:
    container_id: str
    ifname: str


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    bridge: str  # chained: "" (the interface plugin's bridge comes from prevResult)
    range4: Range | None  # None: chained
    range6: Range | None
    routes: tuple[Route, ...]
    ip_masq: bool
    is_default_gateway: bool
    mtu: int
    firewall_backend: str
    table: str
    userland_proxy: bool
    gateway_mode: str
    data_dir: Path
    port_mappings: tuple[PortMap, ...]
    prev_result: dict[str, Any] | None
    valid_attachments: tuple[Attachment, ...] | None  # GC only

    @property
    def chained(self) -> bool:
        return self.range4 is None


@dataclass(frozen=True)
class Invocation:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str


def _short_hash(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def parse_environment(env: Mapping[str, str]) -> Invocation:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f'invalid CNI_COMMAND "{command}"')
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    netns = env.get("CNI_NETNS", "")
    if command in ("ADD", "DEL", "CHECK"):
        if not _CONTAINER_ID.fullmatch(container_id):
            raise CniError(INVALID_ENVIRONMENT, f'invalid CNI_CONTAINERID "{container_id}"')
        if not _IFNAME.fullmatch(ifname) or ifname in (".", ".."):
            raise CniError(INVALID_ENVIRONMENT, f'invalid CNI_IFNAME "{ifname}"')
        if command != "DEL" and not netns:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS is required for {command}")
        if netns and not netns.startswith("/"):
            raise CniError(INVALID_ENVIRONMENT, f'CNI_NETNS "{netns}" is not an absolute path')
    return Invocation(command, container_id, netns, ifname, env.get("CNI_ARGS", ""))


def read_config(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_CONFIG_BYTES:
        raise CniError(DECODE_FAILURE, f"network configuration larger than {MAX_CONFIG_BYTES} B")
    try:
        conf = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CniError(DECODE_FAILURE, f"cannot decode the network configuration: {exc}") from None
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "the network configuration is not a JSON object")
    return conf


def config_version(conf: dict[str, Any]) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise config_error("cniVersion is required")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(SUPPORTED_VERSIONS)
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version}",
            f"supported versions: {supported}",
        )
    return version


def _get(conf: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = conf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise config_error(f"{key} has the wrong type ({type(value).__name__})")
    return value


def _address(text: Any, what: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError:
        raise config_error(f'invalid {what} "{text}"') from None


def _range(raw: Any) -> Range:
    if not isinstance(raw, dict):
        raise config_error("ipam.ranges: a range is an object")
    for key in ("rangeStart", "rangeEnd"):
        if raw.get(key):
            raise config_error(f"ipam.ranges: {key} is not supported (use the whole subnet)")
    try:
        subnet = ip_network(str(raw.get("subnet")), strict=True)
    except (ValueError, TypeError):
        raise config_error(f'ipam.ranges: invalid subnet "{raw.get("subnet")}"') from None
    if raw.get("gateway"):
        gateway = _address(raw["gateway"], "gateway")
    else:
        gateway = subnet.network_address + 1
    if gateway not in subnet or gateway == subnet.network_address:
        raise config_error(f"ipam.ranges: gateway {gateway} is not a host address of {subnet}")
    if subnet.version == 4 and subnet.prefixlen > 30:
        raise config_error(f"ipam.ranges: subnet {subnet} is too small (a /30 or larger)")
    if subnet.version == 6:
        if subnet.prefixlen > 126:
            raise config_error(f"ipam.ranges: subnet {subnet} is too small (a /126 or larger)")
        if gateway != subnet.network_address + 1:
            raise config_error(
                f"ipam.ranges: the IPv6 gateway must be {subnet.network_address + 1}"
            )
    return Range(subnet, gateway)


def _ranges(ipam: dict[str, Any]) -> tuple[Range, Range | None]:
    sets = ipam.get("ranges")
    if sets is None and ipam.get("subnet"):  # host-local's older single-subnet syntax
        sets = [[{"subnet": ipam["subnet"], "gateway": ipam.get("gateway")}]]
    if not isinstance(sets, list) or not sets:
        raise config_error('ipam.ranges is required (host-local syntax: [[{"subnet": ...}]])')
    found: dict[int, Range] = {}
    for rangeset in sets:
        if not isinstance(rangeset, list) or len(rangeset) != 1:
            raise config_error("ipam.ranges: one range per range set is supported")
        rng = _range(rangeset[0])
        if rng.subnet.version in found:
            raise config_error(f"ipam.ranges: one IPv{rng.subnet.version} range set at most")
        found[rng.subnet.version] = rng
    if 4 not in found:
        raise config_error("ipam.ranges: an IPv4 range is required")
    return found[4], found.get(6)


def _routes(ipam: dict[str, Any]) -> tuple[Route, ...]:
    raw = _get(ipam, "routes", list, [])
    routes = []
    for item in raw:
        if not isinstance(item, dict):
            raise config_error("ipam.routes: a route is an object")
        try:
            dst = ip_network(str(item.get("dst")), strict=True)
        except (ValueError, TypeError):
            raise config_error(f'ipam.routes: invalid dst "{item.get("dst")}"') from None
        gw = _address(item["gw"], "route gateway") if item.get("gw") else None
        routes.append(Route(dst, gw))
    return tuple(routes)


def _port_mappings(conf: dict[str, Any]) -> tuple[PortMap, ...]:
    runtime = _get(conf, "runtimeConfig", dict, {})
    raw = _get(runtime, "portMappings", list, [])
    maps = []
    for item in raw:
        if not isinstance(item, dict):
            raise config_error("runtimeConfig.portMappings: an entry is an object")
        ports = []
        for key in ("hostPort", "containerPort"):
            port = item.get(key)
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise config_error(f"runtimeConfig.portMappings: invalid {key} {port!r}")
            ports.append(port)
        host_port, container_port = ports
        proto = str(item.get("protocol") or "tcp").lower()
        if proto not in ("tcp", "udp"):
            raise config_error(f'runtimeConfig.portMappings: unsupported protocol "{proto}"')
        host_ip = item.get("hostIP") or ""
        if host_ip:
            host_ip = str(_address(host_ip, "hostIP"))
        maps.append(PortMap(host_port, container_port, proto, host_ip))
    return tuple(maps)


def _valid_attachments(conf: dict[str, Any]) -> tuple[Attachment, ...] | None:
    raw = conf.get(VALID_ATTACHMENTS)
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise config_error(f"{VALID_ATTACHMENTS} is a list")
    found = []
    for item in raw:
        if not isinstance(item, dict):
            raise config_error(f"{VALID_ATTACHMENTS}: an entry is an object")
        cid, ifname = item.get("containerID"), item.get("ifname")
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise config_error(f"{VALID_ATTACHMENTS}: containerID and ifname are strings")
        found.append(Attachment(cid, ifname))
    return tuple(found)


def parse_config(conf: dict[str, Any]) -> NetConf:
    """The network configuration as this plugin uses it; a bad one is error 7."""
    version = config_version(conf)
    name = conf.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise config_error(f'invalid network name "{name}"')
    ipam = _get(conf, "ipam", dict, {})
    chained = not ipam
    range4: Range | None = None
    range6: Range | None = None
    routes: tuple[Route, ...] = ()
    if not chained:
        if ipam.get("type", "host-local") not in ("host-local", "pyengine"):
            raise config_error(f'ipam type "{ipam.get("type")}" is not supported (host-local)')
        range4, range6 = _ranges(ipam)
        routes = _routes(ipam)
    bridge = _get(conf, "bridge", str, "") or ("" if chained else f"pyecni-{_short_hash(name)}")
    if bridge and not _BRIDGE.fullmatch(bridge):
        raise config_error(f'invalid bridge name "{bridge}"')
    backend = _get(conf, "firewallBackend", str, "nftables")
    if backend not in BACKENDS:
        raise config_error(f'firewallBackend "{backend}" is not one of {", ".join(BACKENDS)}')
    table = _get(conf, "table", str, f"pyecni_{_short_hash(name)}")
    if not _TABLE.fullmatch(table):
        raise config_error(f'invalid table "{table}" ([A-Za-z][A-Za-z0-9_], 16 at most)')
    gateway_mode = _get(conf, "gatewayMode", str, "nat")
    if gateway_mode not in GATEWAY_MODES:
        raise config_error(f'gatewayMode "{gateway_mode}" is not one of {", ".join(GATEWAY_MODES)}')
    mtu = _get(conf, "mtu", int, 0)
    if mtu and not 68 <= mtu <= 65535:
        raise config_error(f"invalid mtu {mtu}")
    data_dir = Path(_get(conf, "dataDir", str, str(DEFAULT_DATA_ROOT / name)))
    if not data_dir.is_absolute() or ".." in data_dir.parts:
        raise config_error(f'dataDir "{data_dir}" must be an absolute path without ".."')
    prev = _get(conf, "prevResult", dict, None)
    return NetConf(
        cni_version=version,
        name=name,
        bridge=bridge,
        range4=range4,
        range6=range6,
        routes=routes,
        ip_masq=bool(_get(conf, "ipMasq", bool, not chained)),
        is_default_gateway=bool(_get(conf, "isDefaultGateway", bool, True)),
        mtu=mtu,
        firewall_backend=backend,
        table=table,
        userland_proxy=bool(_get(conf, "userlandProxy", bool, False)),
        gateway_mode=gateway_mode,
        data_dir=data_dir,
        port_mappings=_port_mappings(conf),
        prev_result=prev,
        valid_attachments=_valid_attachments(conf),
    )

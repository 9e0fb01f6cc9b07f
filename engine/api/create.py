"""What a container create may ask for: its body parsed once, at the API's boundary.

The body's types are checked against ``api_bodies.CONTAINER_CREATE`` (a wrong type is a 400
naming the field); then what pyengined cannot run as asked is refused with 501 and what Docker
itself refuses with 400, before the engine sees any of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.ports import PortBinding, PortKey, UnsupportedProtocol, parse_port_bindings
from engine.api.bodies import CONTAINER_CREATE, check
from engine.api.common import BadParameter, NotImplementedByEngine
from engine.api.networks import check_endpoint_config
from engine.api.version import API_VERSION, V1_44, ApiVersion
from engine.lifecycle.healthcheck import check as check_healthcheck
from engine.lifecycle.netmodes import check_mode_conflicts
from engine.lifecycle.networking import NetworkRequestError
from engine.lifecycle.restartpolicy import check_host_config as check_restart_policy
from engine.runtime.jsonlog import parse_log_config
from engine.runtime.resources import ResourceError, Resources
from engine.runtime.resources import check as check_resources
from engine.runtime.resources import normalize as normalize_resources
from engine.runtime.seccomp import parse_security_opts
from engine.volumes.parse import MountRequests, parse_mount_requests

# Container settings pyengined cannot honour yet. Set to anything but their empty value, the
# create answers 501 rather than run a container that silently lacks them.
UNSUPPORTED_HOST_CONFIG = {
    "Links": "links (--link)",
    "Privileged": "privileged containers",
    "CapAdd": "--cap-add",
    "CapDrop": "--cap-drop",
    "Devices": "devices (--device)",
    "DeviceRequests": "device requests (--gpus)",
    "DeviceCgroupRules": "--device-cgroup-rule",
    "GroupAdd": "--group-add",
    "ReadonlyRootfs": "--read-only",
    "Sysctls": "--sysctl",
    "Ulimits": "--ulimit",
    "CpusetMems": "--cpuset-mems",
    "BlkioWeight": "--blkio-weight",
    "Init": "--init",
    "ShmSize": "--shm-size",
    "OomScoreAdj": "--oom-score-adj",
    "CgroupParent": "--cgroup-parent",
    "Cgroup": "HostConfig.Cgroup (another container's cgroup)",
    "StorageOpt": "--storage-opt",
}
# These default to a mode name; only their default is supported.
HOST_CONFIG_MODES = {
    "PidMode": ("", "private"),
    "IpcMode": ("", "private", "shareable"),
    "UTSMode": ("", "private"),
    "UsernsMode": ("", "private"),
    "CgroupnsMode": ("", "private", "host"),
    "Runtime": ("", "runc"),
    "Isolation": ("", "default"),
}
MAC_DEPRECATED = (
    "The container-wide MacAddress field is now deprecated. It should be specified in "
    "EndpointsConfig instead."
)


def _is_empty(value: Any) -> bool:
    return value in (None, "", 0, False, [], {})


def port_key(text: str) -> PortKey:
    """``"80"`` → 80/tcp; anything that is not ``port[/tcp|udp]`` is a 400, sctp a 501."""
    try:
        return PortKey.parse(text)
    except UnsupportedProtocol:
        raise NotImplementedByEngine("SCTP ports are not supported by pyengined") from None
    except ValueError as e:
        raise BadParameter(str(e)) from None


def _mode_endpoint(mode: str, endpoints: dict[str, Any]) -> dict[str, Any]:
    """The EndpointsConfig entry of the NetworkMode's network, made when there is none (moby's
    epConfigForNetMode): the entry under the mode's name, or the only entry."""
    key = mode or "default"
    if not endpoints:
        endpoints[key] = {}
    if key in endpoints:
        entry = endpoints[key]
    elif len(endpoints) == 1:
        entry = next(iter(endpoints.values()))
    else:
        raise BadParameter(
            "HostConfig.NetworkMode must match the identity of a network in "
            "NetworkSettings.Networks"
        )
    if entry is None:
        entry = endpoints[key] = {}
    return entry


def migrate_mac_address(
    config: dict[str, Any], mode: str, endpoints: dict[str, Any], version: ApiVersion
) -> list[str]:
    """``Config.MacAddress`` onto the NetworkMode network's endpoint, as Docker does (moby's
    handleMACAddressBC): below 1.44 it is the only MAC a create sets; from 1.44 it is
    deprecated, moved with a warning, and must agree with that endpoint's own. Returns the
    warnings."""
    mac = config.pop("MacAddress", None) or ""
    if mac and (mode in ("host", "none") or mode.startswith("container:")):
        raise BadParameter("conflicting options: mac-address and the network mode")
    if version.below(V1_44):
        for endpoint in endpoints.values():
            if isinstance(endpoint, dict):
                endpoint.pop("MacAddress", None)
        if mac:
            _mode_endpoint(mode, endpoints)["MacAddress"] = mac
        return []
    if not mac:
        return []
    endpoint = _mode_endpoint(mode, endpoints)
    if not endpoint.get("MacAddress"):
        endpoint["MacAddress"] = mac
    elif endpoint["MacAddress"].lower() != mac.lower():
        raise BadParameter(
            "the container-wide MAC address must match the endpoint-specific MAC address for "
            "the main network, or be left empty"
        )
    return [MAC_DEPRECATED]


def check_create_body(
    config: dict[str, Any],
    host_config: dict[str, Any],
    networking: dict[str, Any],
    version: ApiVersion = API_VERSION,
) -> list[str]:
    """Refuse what pyengined cannot run as asked (501) and what Docker refuses itself (400);
    the types are already the schema's. Returns the create's warnings."""
    # Docker's network-mode conflicts first: each names an option that is otherwise a 501.
    try:
        check_mode_conflicts(config, host_config, (networking or {}).get("EndpointsConfig"))
    except NetworkRequestError as e:
        raise BadParameter(str(e)) from None
    if config.get("ExposedPorts"):
        config["ExposedPorts"] = {str(port_key(k)): {} for k in config["ExposedPorts"]}

    for key, what in UNSUPPORTED_HOST_CONFIG.items():
        if not _is_empty(host_config.get(key)):
            raise NotImplementedByEngine(f"{what} is not supported by pyengined")
    for key, allowed in HOST_CONFIG_MODES.items():
        if (host_config.get(key) or "") not in allowed:
            raise NotImplementedByEngine(
                f"{key} {host_config[key]!r} is not supported by pyengined"
            )
    try:
        parse_security_opts(host_config.get("SecurityOpt"))
    except ValueError as e:
        raise BadParameter(str(e)) from e
    try:
        limits = Resources.from_host_config(host_config)
        check_resources(limits)
    except ResourceError as e:
        raise BadParameter(str(e)) from None
    host_config.update(normalize_resources(limits).host_config())
    if version.below(V1_44) and isinstance(config.get("Healthcheck"), dict):
        config["Healthcheck"].pop("StartInterval", None)  # 1.44's field, ignored before
    try:
        check_restart_policy(host_config)
        check_healthcheck(config.get("Healthcheck"))
    except ValueError as e:
        raise BadParameter(str(e)) from e
    log_config = host_config.get("LogConfig") or {}
    if (log_config.get("Type") or "json-file") != "json-file":
        raise NotImplementedByEngine(
            f"log driver {log_config['Type']!r} is not supported by pyengined (json-file only)"
        )
    try:
        parse_log_config(log_config)  # max-size / max-file, as Docker's json-file driver
    except ValueError as e:
        raise BadParameter(str(e)) from e
    if host_config.get("PortBindings"):
        host_config["PortBindings"] = {
            str(port_key(k)): v for k, v in host_config["PortBindings"].items()
        }

    mode = host_config.get("NetworkMode") or ""
    # The networks themselves are checked by the engine: a missing one is a 400, not Docker's
    # 404, because the docker CLI takes any 404 from create for a missing image and pulls.
    endpoints = networking.get("EndpointsConfig") or {}
    if version.below(V1_44) and len(endpoints) > 1:
        raise BadParameter(
            "Container cannot be connected to network endpoints: " + ", ".join(endpoints)
        )
    warnings = migrate_mac_address(config, mode, endpoints, version)
    for endpoint in endpoints.values():
        # The MACs are what migrate_mac_address left, at any version: checked as 1.44's.
        check_endpoint_config(endpoint)
    if endpoints:
        networking["EndpointsConfig"] = endpoints
    return warnings


@dataclass
class CreateRequest:
    """A create's body, checked: Docker's container Config, its HostConfig and the networks'
    EndpointsConfig (None: the default network)."""

    config: dict[str, Any]
    host_config: dict[str, Any]
    endpoints: dict[str, Any] | None
    port_bindings: list[PortBinding]  # HostConfig.PortBindings, parsed
    warnings: list[str]
    mounts: MountRequests  # Binds, Mounts, Tmpfs, VolumesFrom and Config.Volumes, parsed


def parse_create_body(body: dict[str, Any], version: ApiVersion = API_VERSION) -> CreateRequest:
    """A create's body as API ``version`` means it (docs/api.md)."""
    check(body, CONTAINER_CREATE)
    host_config = body.pop("HostConfig", None) or {}
    networking = body.pop("NetworkingConfig", None) or {}
    warnings = check_create_body(body, host_config, networking, version)
    try:
        port_bindings = parse_port_bindings(host_config.get("PortBindings"))
    except ValueError as e:
        raise BadParameter(str(e)) from None
    mounts = parse_mount_requests(body, host_config)
    return CreateRequest(
        body, host_config, networking.get("EndpointsConfig"), port_bindings, warnings, mounts
    )

"""The shapes of the JSON bodies clients send, checked once at the API's boundary.

Docker decodes each body into Go structs, so a field of the wrong type is a 400 before any
handler runs (``json: cannot unmarshal string into Go struct field ...``). These schemas do the
same for the fields of ``ContainerCreateRequest``, ``NetworkCreateRequest``, ``NetworkConnect``
and ``NetworkDisconnect`` (swagger v1.41): after ``check(body, SCHEMA, what)``, every field a
handler or the engine reads has the type it expects. Unknown fields are ignored, as Go does;
``null`` is every field's zero value, as Go does, but refused inside lists and maps (Go would
make it an empty string or object; the engine would trip on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.api.common import INT64, BadParameter

Check = Callable[[Any, str], None]
INT32 = (-(1 << 31), (1 << 31) - 1)


def _refuse(what: str, want: str) -> None:
    raise BadParameter(f"invalid {what}: want {want}")


def string(value: Any, what: str) -> None:
    if value is not None and not isinstance(value, str):
        _refuse(what, "a string")


def boolean(value: Any, what: str) -> None:
    if value is not None and not isinstance(value, bool):
        _refuse(what, "a boolean")


def integer(low: int = INT64[0], high: int = INT64[1]) -> Check:
    def check(value: Any, what: str) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            _refuse(what, "an integer")
        if not low <= value <= high:
            _refuse(what, f"an integer in [{low}, {high}]")

    return check


def anything(value: Any, what: str) -> None:
    del value, what


def obj(value: Any, what: str) -> None:
    if value is not None and not isinstance(value, dict):
        _refuse(what, "an object")


def list_of(item: Check) -> Check:
    def check(value: Any, what: str) -> None:
        if value is None:
            return
        if not isinstance(value, list):
            _refuse(what, "a list")
        for i, v in enumerate(value):
            if v is None:
                _refuse(f"{what}[{i}]", "a value, not null")
            item(v, f"{what}[{i}]")

    return check


def map_of(item: Check) -> Check:
    def check(value: Any, what: str) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            _refuse(what, "an object")
        for k, v in value.items():
            if v is None and item is string:  # Labels, Options: strings, never null
                _refuse(f"{what}[{k!r}]", "a value, not null")
            item(v, f"{what}[{k!r}]")

    return check


def fields(schema: dict[str, Check]) -> Check:
    def check(value: Any, what: str) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            _refuse(what, "an object")
        for key, field_check in schema.items():
            if key in value:
                field_check(value[key], f"{what}.{key}" if what else key)

    return check


def str_or_strings(value: Any, what: str) -> None:
    """Docker's ``StrSlice`` (Cmd, Entrypoint, Shell): a string or a list of strings."""
    if isinstance(value, str):
        return
    strings(value, what)


strings = list_of(string)
str_map = map_of(string)
integer32 = integer(*INT32)
any_int = integer()

HEALTHCHECK = fields(
    {
        "Test": strings,
        "Interval": any_int,
        "Timeout": any_int,
        "Retries": integer32,
        "StartPeriod": any_int,
        "StartInterval": any_int,
    }
)

CONTAINER_CONFIG: dict[str, Check] = {
    "Hostname": string,
    "Domainname": string,
    "User": string,
    "AttachStdin": boolean,
    "AttachStdout": boolean,
    "AttachStderr": boolean,
    "ExposedPorts": map_of(obj),
    "Tty": boolean,
    "OpenStdin": boolean,
    "StdinOnce": boolean,
    "Env": strings,
    "Cmd": str_or_strings,
    "Healthcheck": HEALTHCHECK,
    "ArgsEscaped": boolean,
    "Image": string,
    "Volumes": map_of(obj),
    "WorkingDir": string,
    "Entrypoint": str_or_strings,
    "NetworkDisabled": boolean,
    "MacAddress": string,
    "OnBuild": strings,
    "Labels": str_map,
    "StopSignal": string,
    "StopTimeout": integer32,
    "Shell": str_or_strings,
}

PORT_BINDING = fields({"HostIp": string, "HostPort": string})

HOST_CONFIG: dict[str, Check] = {
    "Binds": strings,
    "ContainerIDFile": string,
    "LogConfig": fields({"Type": string, "Config": str_map}),
    "NetworkMode": string,
    "PortBindings": map_of(list_of(PORT_BINDING)),
    "RestartPolicy": fields({"Name": string, "MaximumRetryCount": integer32}),
    "AutoRemove": boolean,
    "VolumeDriver": string,
    "VolumesFrom": strings,
    "ConsoleSize": list_of(integer(0, INT64[1])),
    "Annotations": str_map,
    "CapAdd": strings,
    "CapDrop": strings,
    "CgroupnsMode": string,
    "Dns": strings,
    "DnsOptions": strings,
    "DnsSearch": strings,
    "ExtraHosts": strings,
    "GroupAdd": strings,
    "IpcMode": string,
    "Cgroup": string,
    "Links": strings,
    "OomScoreAdj": integer32,
    "PidMode": string,
    "Privileged": boolean,
    "PublishAllPorts": boolean,
    "ReadonlyRootfs": boolean,
    "SecurityOpt": strings,
    "StorageOpt": str_map,
    "Tmpfs": str_map,
    "UTSMode": string,
    "UsernsMode": string,
    "ShmSize": any_int,
    "Sysctls": str_map,
    "Runtime": string,
    "Isolation": string,
    "CpuShares": any_int,
    "Memory": any_int,
    "NanoCpus": any_int,
    "CgroupParent": string,
    "BlkioWeight": integer(0, 65535),
    "CpuPeriod": any_int,
    "CpuQuota": any_int,
    "CpuRealtimePeriod": any_int,
    "CpuRealtimeRuntime": any_int,
    "CpusetCpus": string,
    "CpusetMems": string,
    "Devices": list_of(obj),
    "DeviceCgroupRules": strings,
    "DeviceRequests": list_of(obj),
    "MemoryReservation": any_int,
    "MemorySwap": any_int,
    "MemorySwappiness": any_int,
    "OomKillDisable": boolean,
    "PidsLimit": any_int,
    "Ulimits": list_of(obj),
    "Init": boolean,
    "Mounts": list_of(obj),
    "MaskedPaths": strings,
    "ReadonlyPaths": strings,
}

ENDPOINT_SETTINGS = fields(
    {
        "IPAMConfig": fields(
            {"IPv4Address": string, "IPv6Address": string, "LinkLocalIPs": strings}
        ),
        "Links": strings,
        "Aliases": strings,
        "DriverOpts": str_map,
        "NetworkID": string,
        "EndpointID": string,
        "Gateway": string,
        "IPAddress": string,
        "IPPrefixLen": integer(0, 128),
        "IPv6Gateway": string,
        "GlobalIPv6Address": string,
        "GlobalIPv6PrefixLen": integer(0, 128),
        "MacAddress": string,
    }
)

CONTAINER_CREATE = fields(
    {
        **CONTAINER_CONFIG,
        "HostConfig": fields(HOST_CONFIG),
        "NetworkingConfig": fields({"EndpointsConfig": map_of(ENDPOINT_SETTINGS)}),
    }
)

NETWORK_CREATE = fields(
    {
        "Name": string,
        "CheckDuplicate": boolean,
        "Driver": string,
        "Scope": string,
        "Internal": boolean,
        "Attachable": boolean,
        "Ingress": boolean,
        "ConfigOnly": boolean,
        "ConfigFrom": fields({"Network": string}),
        "IPAM": fields(
            {
                "Driver": string,
                "Config": list_of(
                    fields(
                        {
                            "Subnet": string,
                            "IPRange": string,
                            "Gateway": string,
                            "AuxiliaryAddresses": str_map,
                        }
                    )
                ),
                "Options": str_map,
            }
        ),
        "EnableIPv6": boolean,
        "Options": str_map,
        "Labels": str_map,
    }
)

NETWORK_CONNECT = fields({"Container": string, "EndpointConfig": ENDPOINT_SETTINGS})
NETWORK_DISCONNECT = fields({"Container": string, "Force": boolean})


def check(body: dict[str, Any], schema: Check, what: str = "") -> dict[str, Any]:
    """``body`` when every field the schema knows has its type; else a 400 naming the field."""
    schema(body, what)
    return body

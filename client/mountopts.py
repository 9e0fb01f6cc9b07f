"""``-v``, ``--mount``, ``--tmpfs`` and ``--volumes-from`` as the docker CLI turns them into a
create body: a ``-v`` with only a container path is an anonymous volume (``Config.Volumes``),
any other ``-v`` a ``HostConfig.Binds`` entry the daemon parses; ``--mount``'s comma list
becomes a ``HostConfig.Mounts`` object (docker/cli opts/mount.go)."""

from __future__ import annotations

import re
from typing import Any

from client.command import fail

_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TRUE = ("", "1", "true")
_FALSE = ("0", "false")


def _bad(message: str) -> Any:
    fail(f"pyengine: {message}", 125)


def ram_bytes(text: str) -> int:
    """``64m`` → 67108864, as the docker CLI's RAMInBytes."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        return int(_bad(f"invalid size: {text!r}"))
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _flag(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    return bool(_bad(f"invalid value for {key}: {value}"))


def parse_mount(text: str) -> dict[str, Any]:
    """One ``--mount type=...,src=...,dst=...[,readonly][,...]``."""
    mount: dict[str, Any] = {"Type": "volume"}
    bind: dict[str, Any] = {}
    volume: dict[str, Any] = {}
    tmpfs: dict[str, Any] = {}
    for field in filter(None, text.split(",")):
        key, sep, value = field.partition("=")
        key = key.strip().lower()
        if key in ("readonly", "ro"):
            mount["ReadOnly"] = _flag(key, value)
        elif key == "volume-nocopy":
            volume["NoCopy"] = _flag(key, value)
        elif not sep:
            _bad(f"invalid field '{field}' must be a key=value pair")
        elif key == "type":
            mount["Type"] = value
        elif key in ("source", "src"):
            mount["Source"] = value
        elif key in ("target", "dst", "destination"):
            mount["Target"] = value
        elif key == "bind-propagation":
            bind["Propagation"] = value
        elif key == "volume-label":
            name, _, label = value.partition("=")
            volume.setdefault("Labels", {})[name] = label
        elif key == "tmpfs-size":
            tmpfs["SizeBytes"] = ram_bytes(value)
        elif key == "tmpfs-mode":
            try:
                tmpfs["Mode"] = int(value, 8)
            except ValueError:
                _bad(f"invalid value for {key}: {value}")
        else:
            _bad(f"unexpected key '{key}' in '{field}'")
    if not mount.get("Target"):
        _bad("target is required")
    for key, options in (("BindOptions", bind), ("VolumeOptions", volume)):
        if options:
            mount[key] = options
    if tmpfs:
        mount["TmpfsOptions"] = tmpfs
    return mount


def mount_fields(
    volumes: tuple[str, ...],
    mounts: tuple[str, ...],
    tmpfs: tuple[str, ...],
    volumes_from: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Config fields, HostConfig fields) of the mount options."""
    anonymous: dict[str, Any] = {v: {} for v in volumes if ":" not in v}
    binds = [v for v in volumes if ":" in v]
    host_config: dict[str, Any] = {}
    if binds:
        host_config["Binds"] = binds
    if mounts:
        host_config["Mounts"] = [parse_mount(m) for m in mounts]
    if tmpfs:
        host_config["Tmpfs"] = dict(t.partition(":")[::2] for t in tmpfs)
    if volumes_from:
        host_config["VolumesFrom"] = list(volumes_from)
    return ({"Volumes": anonymous} if anonymous else {}), host_config

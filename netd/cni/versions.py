"""The CNI versions this plugin speaks and the shape of a result in each (CNI SPEC.md,
"Success": 0.4.0 carries ``ips[].version``, 1.0.0 dropped it; 1.1.0 keeps 1.0.0's shape)."""

from __future__ import annotations

import copy
from ipaddress import ip_interface
from typing import Any

PRIMARY_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
# Commands a configuration of a version may ask for (STATUS and GC are 1.1.0's).
NEW_IN_1_1 = ("STATUS", "GC")


def at_least(version: str, than: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    return key(version) >= key(than)


def convert_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """``result`` (any of the supported versions' shapes) in ``version``'s shape."""
    out = copy.deepcopy(result)
    out["cniVersion"] = version
    ips = out.get("ips") or []
    for ip in ips:
        if not isinstance(ip, dict):
            continue
        if at_least(version, "1.0.0"):
            ip.pop("version", None)
        elif "version" not in ip and isinstance(ip.get("address"), str):
            try:
                ip["version"] = str(ip_interface(ip["address"]).version)
            except ValueError:
                pass
    return out

"""The ADD result of a standalone attachment (CNI SPEC.md, "ADD: Success"): the bridge, the
host veth and the container's interface, its addresses with the gateway, and its routes."""

from __future__ import annotations

from typing import Any

from netd.cni.config import NetConf
from netd.cni.versions import convert_result
from netd.state import Endpoint


def attachment_result(
    conf: NetConf,
    ep: Endpoint,
    bridge_mac: str,
    veth_mac: str,
    routes: list[tuple[str, str]],
) -> dict[str, Any]:
    """``routes``: (destination, gateway) pairs added in the namespace."""
    interfaces: list[dict[str, Any]] = [
        {"name": conf.bridge, "mac": bridge_mac},
        {"name": ep.host_veth, "mac": veth_mac},
        {"name": ep.ifname, "mac": ep.mac, "sandbox": ep.netns_path},
    ]
    ips: list[dict[str, Any]] = [
        {"address": f"{ep.ip}/{ep.prefixlen}", "gateway": ep.gateway, "interface": 2}
    ]
    if ep.ipv6:
        ips.append(
            {
                "address": f"{ep.ipv6}/{ep.ipv6_prefixlen}",
                "gateway": ep.ipv6_gateway,
                "interface": 2,
            }
        )
    result: dict[str, Any] = {
        "interfaces": interfaces,
        "ips": ips,
        "routes": [{"dst": dst, "gw": gw} for dst, gw in routes],
        "dns": {},
    }
    return convert_result(result, conf.cni_version)

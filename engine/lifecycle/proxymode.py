"""How the userland proxy connects to a container: from the bridge gateway (Docker's way, the
default) or transparently, from the client's own address (docs/proxy.md, "Transparent mode").

Chosen per daemon (``--userland-proxy-mode``) and per published port by container label, as
PROXY protocol is (engine/lifecycle/networking.py):

* ``pyengine.proxy-mode=gateway|transparent`` for every published port of the container;
* ``pyengine.proxy-mode.<container port>/<proto>=gateway|transparent`` for one port, winning
  over the first.

A transparent port is served by the proxy alone: netd does not DNAT it, so every client goes
through the proxy and keeps its address (the kernel's DNAT keeps it too, but then the proxy
never sees the connection, and a transparent port is one the proxy must see: a loopback client
and an IPv6 client of an IPv4 container are the proxy's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import ip_interface
from typing import Any

from common.ports import PortBinding, PortKey
from engine.lifecycle.base import EngineConfig, InvalidParameter
from netd import Endpoint

PROXY_MODE_LABEL = "pyengine.proxy-mode"
GATEWAY = "gateway"
TRANSPARENT = "transparent"
PROXY_MODES = (GATEWAY, TRANSPARENT)


def proxy_mode_labels(labels: Mapping[str, Any]) -> dict[str, str]:
    """The container's proxy mode labels, checked: key -> gateway|transparent (a 400 when one
    is malformed)."""
    chosen: dict[str, str] = {}
    for key, value in labels.items():
        key, value = str(key), str(value)
        if key != PROXY_MODE_LABEL and not key.startswith(PROXY_MODE_LABEL + "."):
            continue
        port_key = key[len(PROXY_MODE_LABEL) + 1 :]
        if port_key:
            try:
                PortKey.parse(port_key)
            except ValueError:
                raise InvalidParameter(
                    f'invalid label "{key}": want {PROXY_MODE_LABEL}.<port>/<tcp|udp>'
                ) from None
        if value not in PROXY_MODES:
            raise InvalidParameter(
                f'invalid value "{value}" for label {key} (want gateway or transparent)'
            )
        chosen[key] = value
    return chosen


def check_proxy_mode_labels(labels: Mapping[str, Any], userland_proxy: bool) -> None:
    """At create, start and adoption: well-formed, and transparent only with the proxy."""
    chosen = proxy_mode_labels(labels)
    if not userland_proxy and TRANSPARENT in chosen.values():
        raise InvalidParameter(
            "transparent proxy mode (label pyengine.proxy-mode) needs the userland proxy: "
            "this daemon runs with --userland-proxy=false"
        )


def proxy_mode_for(labels: Mapping[str, Any], container_port: int, proto: str, default: str) -> str:
    """gateway or transparent for one published port."""
    chosen = proxy_mode_labels(labels)
    return chosen.get(
        f"{PROXY_MODE_LABEL}.{container_port}/{proto}",
        chosen.get(
            f"{PROXY_MODE_LABEL}.{container_port}" if proto == "tcp" else "",
            chosen.get(PROXY_MODE_LABEL, default),
        ),
    )


def transparent_keys(
    labels: Mapping[str, Any], bindings: Iterable[PortBinding], cfg: EngineConfig
) -> frozenset[tuple[int, str]]:
    """Of ``bindings``, the (container port, proto) published in transparent mode: the
    proxy's alone, not DNATed by netd (none without the userland proxy)."""
    if not cfg.userland_proxy:
        return frozenset()
    mode = cfg.userland_proxy_mode
    keys = {(b.container_port, b.proto) for b in bindings}
    return frozenset(k for k in keys if proxy_mode_for(labels, *k, mode) == TRANSPARENT)


def own_subnets(endpoints: Iterable[Endpoint]) -> tuple[str, ...]:
    """The container's own subnets (both families): clients there are answered over the
    bridge, not through the host, so they get the gateway behaviour."""
    found: dict[str, None] = {}
    for ep in endpoints:
        for ip, length in ((ep.ip, ep.prefixlen), (ep.ipv6, ep.ipv6_prefixlen)):
            if ip:
                found[str(ip_interface(f"{ip}/{length}").network)] = None
    return tuple(found)

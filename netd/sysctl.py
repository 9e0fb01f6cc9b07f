"""The few kernel knobs netd turns (Documentation/networking/ip-sysctl.rst)."""

from __future__ import annotations

from pathlib import Path

from netd.errors import NetdError

_PROC_IPV4 = Path("/proc/sys/net/ipv4")
_PROC_IPV6 = Path("/proc/sys/net/ipv6")


def _write(path: Path, value: str) -> None:
    try:
        if path.read_text().strip() != value:
            path.write_text(value + "\n")
    except OSError as exc:
        raise NetdError(f"cannot set {path} to {value}: {exc.strerror}") from None


def ip_forward_enabled() -> bool:
    """Whether net.ipv4.ip_forward is on (the host routes IPv4 between its interfaces)."""
    path = _PROC_IPV4 / "ip_forward"
    try:
        return path.read_text().strip() != "0"
    except OSError as exc:
        raise NetdError(f"cannot read {path}: {exc.strerror}") from None


def enable_ip_forward() -> None:
    """net.ipv4.ip_forward=1: route between the bridge and the other interfaces."""
    _write(_PROC_IPV4 / "ip_forward", "1")


def set_route_localnet(ifname: str, enabled: bool) -> None:
    """net.ipv4.conf.<if>.route_localnet: allow 127.0.0.0/8 sources/destinations to be routed
    out of ``ifname`` (needed when loopback traffic is DNATed to a container on the bridge)."""
    _write(_PROC_IPV4 / "conf" / ifname / "route_localnet", "1" if enabled else "0")


def enable_ipv6_forward() -> None:
    """net.ipv6.conf.all.forwarding=1: route IPv6 between bridges and the other interfaces
    (set, as Docker does, once a network has IPv6; never reset). It makes every interface a
    router, which stops it accepting router advertisements unless its accept_ra is 2."""
    _write(_PROC_IPV6 / "conf" / "all" / "forwarding", "1")


def enable_ipv6_on(ifname: str) -> None:
    """net.ipv6.conf.<if>.disable_ipv6=0 on a host interface."""
    _write(_PROC_IPV6 / "conf" / ifname / "disable_ipv6", "0")

"""Port publishing specs: Docker's ``-p`` syntax and the Engine API ``PortBindings`` shape."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class PortBinding:
    """One published port as the user asked for it (host side may still be unresolved)."""

    container_port: int
    proto: str = "tcp"  # "tcp" | "udp"
    host_ip: str = ""  # "" = all IPv4 addresses (0.0.0.0)
    host_port: int = 0  # 0 = ephemeral
    host_port_end: int = 0  # last port of a host range ("8000-8010:80"); 0 = single port


class _SpecError(ValueError):
    """A reason without the spec; ``parse_publish`` wraps it into the full message."""


def _parse_port(text: str, what: str, allow_zero: bool) -> int:
    if not text.isdigit():
        raise _SpecError(f'invalid {what} "{text}"')
    port = int(text)
    if port > 65535 or (port == 0 and not allow_zero):
        raise _SpecError(f'invalid {what} "{text}"')
    return port


def _parse_range(text: str, what: str, allow_zero: bool) -> tuple[int, int]:
    """``"80"`` → (80, 80); ``"8000-8010"`` → (8000, 8010)."""
    first, sep, last = text.partition("-")
    start = _parse_port(first, what, allow_zero)
    if not sep:
        return start, start
    end = _parse_port(last, what, allow_zero)
    if start == 0 or end < start:
        raise _SpecError(f'invalid {what} range "{text}"')
    return start, end


def _parse_host_ip(text: str) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise _SpecError(f'invalid host IP "{text}"')
        inner = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise _SpecError(f'invalid host IP "{text}"') from None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise _SpecError(f'invalid host IP "{text}"') from None


def _split_host_ip(spec: str) -> tuple[str, str]:
    """Split ``"[::1]:8080:80"`` / ``"127.0.0.1::80"`` / ``"8080:80"`` into (ip, "hostport:ctr")."""
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0 or spec[close + 1 : close + 2] != ":":
            raise _SpecError('expected "[IPv6]:hostport:containerport"')
        return spec[: close + 1], spec[close + 2 :]
    parts = spec.split(":")
    if len(parts) > 3:
        raise _SpecError("too many colons (put an IPv6 host address in brackets)")
    if len(parts) == 3:
        return parts[0], f"{parts[1]}:{parts[2]}"
    return "", spec


def _parse(spec: str) -> list[PortBinding]:
    ports, slash, proto = spec.partition("/")
    if not slash:
        proto = "tcp"
    proto = proto.lower()
    if proto not in PROTOCOLS:
        raise _SpecError(f'invalid protocol "{proto}"')
    ip_text, rest = _split_host_ip(ports)
    host_ip = _parse_host_ip(ip_text) if ip_text else ""
    host_text, colon, ctr_text = rest.rpartition(":")
    if not colon and ip_text:
        raise _SpecError("missing container port")
    if ":" in host_text:
        raise _SpecError(f'invalid host port "{host_text}"')
    ctr_start, ctr_end = _parse_range(ctr_text, "container port", allow_zero=False)
    host_start, host_end = (0, 0)
    if host_text:
        host_start, host_end = _parse_range(host_text, "host port", allow_zero=True)
    ctr_count = ctr_end - ctr_start + 1
    host_count = host_end - host_start + 1
    if host_start == 0:
        return [PortBinding(p, proto, host_ip) for p in range(ctr_start, ctr_end + 1)]
    if ctr_count == 1:
        end = host_end if host_count > 1 else 0
        return [PortBinding(ctr_start, proto, host_ip, host_start, end)]
    if host_count != ctr_count:
        raise _SpecError(f'host range "{host_text}" and container range "{ctr_text}" differ')
    return [PortBinding(ctr_start + i, proto, host_ip, host_start + i) for i in range(ctr_count)]


def parse_publish(spec: str) -> list[PortBinding]:
    """Parse one ``-p`` value: ``[ip:][hostport[-end]:]containerport[-end][/proto]``.

    A host range with a single container port is one binding that takes the first free port of
    the range; a host range with an equally long container range is one binding per port.
    """
    try:
        if not spec or spec != spec.strip():
            raise _SpecError("empty or padded with spaces")
        return _parse(spec)
    except _SpecError as exc:
        raise ValueError(f'invalid publish spec "{spec}": {exc}') from None


def _host_port_text(binding: PortBinding) -> str:
    if binding.host_port == 0:
        return ""
    if binding.host_port_end:
        return f"{binding.host_port}-{binding.host_port_end}"
    return str(binding.host_port)


def to_docker_port_bindings(bindings: list[PortBinding]) -> dict[str, list[dict[str, str]]]:
    """``HostConfig.PortBindings``: ``{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}``."""
    result: dict[str, list[dict[str, str]]] = {}
    for b in bindings:
        entry = {"HostIp": b.host_ip, "HostPort": _host_port_text(b)}
        result.setdefault(f"{b.container_port}/{b.proto}", []).append(entry)
    return result


def from_docker_port_bindings(port_bindings: dict[str, Any] | None) -> list[PortBinding]:
    """The inverse of ``to_docker_port_bindings``; a null or empty list publishes nothing."""
    bindings: list[PortBinding] = []
    if not isinstance(port_bindings or {}, dict):
        raise ValueError("invalid port bindings: want an object")
    for key, entries in (port_bindings or {}).items():
        ctr_text, slash, proto = key.partition("/")
        proto = (proto if slash else "tcp").lower()
        if not isinstance(entries or [], list):
            raise ValueError(f'invalid port binding "{key}": want a list')
        for entry in entries or []:
            entry = entry or {}
            host_ip = entry.get("HostIp") or "" if isinstance(entry, dict) else None
            host_port = entry.get("HostPort") or "" if isinstance(entry, dict) else None
            if not isinstance(host_ip, str) or not isinstance(host_port, str):
                raise ValueError(f'invalid port binding "{key}": want HostIp and HostPort strings')
            if host_ip and ":" in host_ip and not host_ip.startswith("["):
                host_ip = f"[{host_ip}]"
            spec = f"{host_ip}:{host_port}:{ctr_text}/{proto}" if host_ip else None
            if spec is None:
                spec = f"{host_port}:{ctr_text}/{proto}" if host_port else f"{ctr_text}/{proto}"
            try:
                parsed = _parse(spec)
            except _SpecError as exc:
                raise ValueError(f'invalid port binding "{key}" {entry}: {exc}') from None
            if len(parsed) != 1:
                raise ValueError(f'invalid port binding "{key}": container port ranges not allowed')
            bindings.append(parsed[0])
    return bindings

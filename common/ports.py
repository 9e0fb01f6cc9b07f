"""Published ports, one type per stage, each parsed once where it enters.

* :class:`PortKey` — Docker's ``"80/tcp"`` key (ExposedPorts, PortBindings, NetworkSettings.Ports).
* :class:`PortBinding` — what the user asked for: ``-p [ip:][hostport[-end]:]port[-end][/proto]``
  (the client parses it) or ``HostConfig.PortBindings`` (the API parses it); the host side may
  still be unresolved. The container record keeps the parsed list.
* :class:`PortMapping` — what netd published: a host address and port bound to the container's
  address and port, both of one family. netd hands it to the firewall and the engine, the engine
  to the proxy supervisor (``proxy.supervisor.ProxySpec`` is a mapping plus its proxy options).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

PROTOCOLS = ("tcp", "udp")
MAX_PORT = 65535
_KEY_RE = re.compile(r"([0-9]{1,5})(?:/([a-z]+))?")


@dataclass(frozen=True, order=True)
class PortKey:
    """``"80/tcp"``: a container port and its protocol."""

    port: int
    proto: str = "tcp"

    @classmethod
    def parse(cls, text: str) -> PortKey:
        """``"80"`` → 80/tcp; a protocol other than tcp/udp or a port outside 1–65535 is a
        ValueError (``sctp`` one of :class:`UnsupportedProtocol`)."""
        match = _KEY_RE.fullmatch(text)
        if match is None or not 0 < int(match[1]) <= MAX_PORT:
            raise ValueError(f"invalid port specification: {text!r}")
        proto = match[2] or "tcp"
        if proto == "sctp":
            raise UnsupportedProtocol("SCTP ports are not supported")
        if proto not in PROTOCOLS:
            raise ValueError(f"invalid port specification: {text!r}")
        return cls(int(match[1]), proto)

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


class UnsupportedProtocol(ValueError):
    """A protocol Docker knows (sctp) that pyengine does not publish."""


@dataclass(frozen=True)
class PortBinding:
    """One published port as the user asked for it (host side may still be unresolved)."""

    container_port: int
    proto: str = "tcp"  # "tcp" | "udp"
    host_ip: str = ""  # "" = all IPv4 addresses (0.0.0.0)
    host_port: int = 0  # 0 = ephemeral
    host_port_end: int = 0  # last port of a host range ("8000-8010:80"); 0 = single port

    @property
    def key(self) -> PortKey:
        return PortKey(self.container_port, self.proto)

    def host_port_text(self) -> str:
        if self.host_port == 0:
            return ""
        if self.host_port_end:
            return f"{self.host_port}-{self.host_port_end}"
        return str(self.host_port)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortBinding:
        return cls(
            int(data["container_port"]),
            str(data.get("proto", "tcp")),
            str(data.get("host_ip", "")),
            int(data.get("host_port", 0)),
            int(data.get("host_port_end", 0)),
        )


@dataclass(frozen=True)
class PortMapping:
    """Traffic to ``host_ip:host_port`` (``0.0.0.0`` / ``::``: any local address of that family)
    goes to the container's ``container_ip:container_port``."""

    proto: str
    host_ip: str
    host_port: int
    container_ip: str
    container_port: int

    @property
    def key(self) -> PortKey:
        return PortKey(self.container_port, self.proto)

    def mapping(self) -> PortMapping:
        """This mapping as a plain PortMapping (a subclass's extra fields dropped)."""
        return PortMapping(
            self.proto, self.host_ip, self.host_port, self.container_ip, self.container_port
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PortMapping:
        return cls(
            str(data["proto"]),
            str(data["host_ip"]),
            int(data["host_port"]),
            str(data.get("container_ip", "")),  # records written before it was kept: ""
            int(data["container_port"]),
        )


# ---- parsing: the -p text (client) and HostConfig.PortBindings (API) ----------------------------


class _SpecError(ValueError):
    """A reason without the spec; the callers wrap it into the full message."""


def _parse_port(text: str, what: str, allow_zero: bool) -> int:
    if not text.isdigit():
        raise _SpecError(f'invalid {what} "{text}"')
    port = int(text)
    if port > MAX_PORT or (port == 0 and not allow_zero):
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
    """``"127.0.0.1"``, ``"[::1]"`` (or a bare ``"::1"``, as JSON has it) → the address."""
    try:
        if text.startswith("[") and text.endswith("]"):
            return str(ipaddress.IPv6Address(text[1:-1]))
        return str(ipaddress.ip_address(text))
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


def _bindings(
    proto: str, host_ip: str, host_text: str, ctr_start: int, ctr_end: int
) -> list[PortBinding]:
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
        raise _SpecError(f'host range "{host_text}" and container range differ')
    return [PortBinding(ctr_start + i, proto, host_ip, host_start + i) for i in range(ctr_count)]


def _parse_publish(spec: str) -> list[PortBinding]:
    ports, slash, proto = spec.partition("/")
    proto = proto.lower() if slash else "tcp"
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
    return _bindings(proto, host_ip, host_text, ctr_start, ctr_end)


def parse_publish(spec: str) -> list[PortBinding]:
    """Parse one ``-p`` value: ``[ip:][hostport[-end]:]containerport[-end][/proto]``.

    A host range with a single container port is one binding that takes the first free port of
    the range; a host range with an equally long container range is one binding per port.
    """
    try:
        if not spec or spec != spec.strip():
            raise _SpecError("empty or padded with spaces")
        return _parse_publish(spec)
    except _SpecError as exc:
        raise ValueError(f'invalid publish spec "{spec}": {exc}') from None


def to_docker_port_bindings(bindings: list[PortBinding]) -> dict[str, list[dict[str, str]]]:
    """``HostConfig.PortBindings``: ``{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}``."""
    result: dict[str, list[dict[str, str]]] = {}
    for b in bindings:
        entry = {"HostIp": b.host_ip, "HostPort": b.host_port_text()}
        result.setdefault(str(b.key), []).append(entry)
    return result


def parse_port_bindings(port_bindings: dict[str, Any] | None) -> list[PortBinding]:
    """``HostConfig.PortBindings`` → bindings; a null or empty list publishes nothing. The keys
    are PortKeys (a container port range is refused, as Docker does)."""
    if not isinstance(port_bindings or {}, dict):
        raise ValueError("invalid port bindings: want an object")
    bindings: list[PortBinding] = []
    for text, entries in (port_bindings or {}).items():
        key = PortKey.parse(text)
        if not isinstance(entries or [], list):
            raise ValueError(f'invalid port binding "{text}": want a list')
        for entry in entries or []:
            entry = entry or {}
            if not isinstance(entry, dict):
                raise ValueError(f'invalid port binding "{text}": want objects')
            host_ip = entry.get("HostIp") or ""
            host_port = entry.get("HostPort") or ""
            if not isinstance(host_ip, str) or not isinstance(host_port, str):
                raise ValueError(f'invalid port binding "{text}": want HostIp and HostPort strings')
            try:
                ip = _parse_host_ip(host_ip) if host_ip else ""
                bindings += _bindings(key.proto, ip, host_port, key.port, key.port)
            except _SpecError as exc:
                raise ValueError(f'invalid port binding "{text}" {entry}: {exc}') from None
    return bindings

"""What the supervisor runs a proxy for: a published port, and how the proxy talks to the
container; the command line that says so to pyengine-proxy (proxy/options.py parses it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.ports import PortMapping

PortAddress = tuple[str, str, int]
"""(proto, host_ip, host_port): how netd names a port reservation."""


@dataclass(frozen=True)
class ProxySpec(PortMapping):
    """A published port as the engine hands it over, and how its proxy talks to the container."""

    proxy_protocol: str | None = None  # "v1" | "v2": a PROXY protocol header to the container

    @classmethod
    def of(cls, port: PortMapping, proxy_protocol: str | None = None) -> ProxySpec:
        return cls(
            port.proto,
            port.host_ip,
            port.host_port,
            port.container_ip,
            port.container_port,
            proxy_protocol,
        )

    @property
    def address(self) -> PortAddress:
        return (self.proto, self.host_ip, self.host_port)

    def command_line(self) -> list[str]:
        extra = ["-proxy-protocol", self.proxy_protocol] if self.proxy_protocol else []
        return [
            "-proto",
            self.proto,
            "-host-ip",
            self.host_ip,
            "-host-port",
            str(self.host_port),
            "-container-ip",
            self.container_ip,
            "-container-port",
            str(self.container_port),
            "-use-listen-fd",
            *extra,
        ]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxySpec:
        proxy_protocol = data.get("proxy_protocol")
        return cls.of(
            PortMapping.from_json(data), None if proxy_protocol is None else str(proxy_protocol)
        )

"""What the supervisor runs a proxy for: a published port, and how the proxy talks to the
container; the command line that says so to pyengine-proxy (proxy/options.py parses it).

A port published without a host address listens on 0.0.0.0 and on :: (the same port number);
one proxy serves both listeners (its fds 4 and 5), so publishing N ports costs N processes,
not 2N. Its second listener is ``host_ip2``, forwarding to ``container_ip2`` (the container's
IPv6 address, or its IPv4 one when it has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.ports import PortMapping
from proxy.options import DEFAULT_UDP_IDLE_TIMEOUT, ProxyOptions

PortAddress = tuple[str, str, int]
"""(proto, host_ip, host_port): how netd names a port reservation."""


@dataclass(frozen=True)
class ProxySpec(PortMapping):
    """A published port as the engine hands it over, and how its proxy talks to the container."""

    proxy_protocol: str | None = None  # "v1" | "v2": a PROXY protocol header to the container
    host_ip2: str = ""  # a second listener (fd 5) on this address and the same port; "": none
    container_ip2: str = ""
    # Connect to the container from the client's address (-transparent); clients in these
    # networks (the container's own subnets) are connected from the gateway instead.
    transparent: bool = False
    transparent_skip: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        port: PortMapping,
        proxy_protocol: str | None = None,
        second: PortMapping | None = None,
        *,
        transparent: bool = False,
        transparent_skip: tuple[str, ...] = (),
    ) -> ProxySpec:
        """``second``: the same port on another host address, served by the same proxy."""
        if second is not None and (
            second.proto,
            second.host_port,
            second.container_port,
        ) != (port.proto, port.host_port, port.container_port):
            raise ValueError("a proxy's two listeners differ only in their addresses")
        return cls(
            port.proto,
            port.host_ip,
            port.host_port,
            port.container_ip,
            port.container_port,
            proxy_protocol,
            second.host_ip if second is not None else "",
            second.container_ip if second is not None else "",
            transparent,
            transparent_skip if transparent else (),
        )

    @property
    def address(self) -> PortAddress:
        return (self.proto, self.host_ip, self.host_port)

    @property
    def addresses(self) -> tuple[PortAddress, ...]:
        """The address of each listener, in fd order (4, then 5)."""
        if not self.host_ip2:
            return (self.address,)
        return (self.address, (self.proto, self.host_ip2, self.host_port))

    def options(self) -> ProxyOptions:
        """What :meth:`command_line` tells the proxy, without parsing it back."""
        return ProxyOptions(
            self.proto,
            self.host_ip,
            self.host_port,
            self.container_ip,
            self.container_port,
            True,
            DEFAULT_UDP_IDLE_TIMEOUT,
            self.proxy_protocol,
            self.host_ip2 or None,
            self.container_ip2 or None,
            self.transparent,
            self.transparent_skip,
        )

    def command_line(self) -> list[str]:
        extra = ["-proxy-protocol", self.proxy_protocol] if self.proxy_protocol else []
        if self.host_ip2:
            extra += ["-host-ip2", self.host_ip2, "-container-ip2", self.container_ip2]
        if self.transparent:
            extra.append("-transparent")
            if self.transparent_skip:
                extra += ["-transparent-skip", ",".join(self.transparent_skip)]
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
        port = PortMapping.from_json(data)
        second = None
        if data.get("host_ip2"):
            second = PortMapping(
                port.proto,
                str(data["host_ip2"]),
                port.host_port,
                str(data.get("container_ip2") or ""),
                port.container_port,
            )
        return cls.of(
            port,
            None if proxy_protocol is None else str(proxy_protocol),
            second,
            transparent=bool(data.get("transparent", False)),
            transparent_skip=tuple(str(n) for n in data.get("transparent_skip") or ()),
        )

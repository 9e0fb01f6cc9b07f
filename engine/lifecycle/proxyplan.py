"""Which proxies a container's published ports need, and the key each is supervised under.

A port published without a host address is reserved on 0.0.0.0 and on :: (netd's
``publish_addresses``); one pyengine-proxy serves both (proxy/spec.py), so N such ports cost
N processes, not 2N as docker-proxy's one process per port and family does. A port on an
explicit host address gets a proxy of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

ANY_ADDRESSES = ("0.0.0.0", "::")


class _Port(Protocol):
    """A published port as netd (PublishedPort) or a container's record (PortMapping) has it."""

    @property
    def proto(self) -> str: ...
    @property
    def host_ip(self) -> str: ...
    @property
    def host_port(self) -> int: ...
    @property
    def container_port(self) -> int: ...


P = TypeVar("P", bound=_Port)


def proxy_key(container_id: str, proto: str, host_ip: str, host_port: int) -> str:
    return f"{container_id}/{proto}/{host_ip}/{host_port}"


def proxy_groups(container_id: str, ports: Iterable[P]) -> list[tuple[str, list[P]]]:
    """The proxies for ``ports`` (ports without a host port, routed ones, need none): each
    one's key and the ports it serves, the IPv4 one first when it serves both families."""
    groups: list[tuple[str, list[P]]] = []
    pairs: dict[tuple[str, int, int], list[P]] = {}
    for p in ports:
        if not p.host_port:
            continue
        if p.host_ip not in ANY_ADDRESSES:
            groups.append((proxy_key(container_id, p.proto, p.host_ip, p.host_port), [p]))
            continue
        pair = pairs.setdefault((p.proto, p.host_port, p.container_port), [])
        if any(q.host_ip == p.host_ip for q in pair):
            # The same address twice (not something netd publishes): a proxy of its own.
            groups.append((proxy_key(container_id, p.proto, p.host_ip, p.host_port), [p]))
            continue
        pair.append(p)
    for pair in pairs.values():
        pair.sort(key=lambda p: ANY_ADDRESSES.index(p.host_ip))
        first = pair[0]
        groups.append((proxy_key(container_id, first.proto, first.host_ip, first.host_port), pair))
    return groups


def proxy_keys(container_id: str, ports: Iterable[_Port]) -> list[str]:
    return [key for key, _ in proxy_groups(container_id, ports)]

"""Address management inside one network's subnet, IPv4 or IPv6 (the controller persists it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from netd.errors import Conflict, NetdError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


def _address(text: str) -> IPAddress:
    return ip_address(text)


@dataclass
class Ipam:
    """Allocations of host addresses in ``subnet`` (gateway and reserved addresses excluded).

    Automatic allocation takes addresses from ``ip_range`` (the whole subnet when None),
    round-robin after the last address handed out like Docker's default IPAM, so a just-released
    address is not reused at once (stale ARP/neighbour/conntrack entries). A requested address
    may be anywhere in the subnet, as with Docker's ``--ip`` / ``--ip6``.

    Reserved: in IPv4 the network and broadcast addresses (not in a /31 or /32); in IPv6 the
    Subnet-Router anycast address, i.e. the subnet's first address (RFC 4291 2.6.1).
    """

    subnet: IPNetwork
    gateway: IPAddress
    ip_range: IPNetwork | None = None
    allocations: dict[str, str] = field(default_factory=dict)  # address -> owner (container id)
    last: str = ""

    @property
    def family_name(self) -> str:
        return f"IPv{self.subnet.version}"

    def to_json(self) -> dict[str, Any]:
        return {"allocations": dict(self.allocations), "last": self.last}

    def load_json(self, data: dict[str, Any]) -> None:
        self.allocations = {str(_address(a)): o for a, o in data.get("allocations", {}).items()}
        self.last = data.get("last", "")

    def _is_host_address(self, addr: IPAddress) -> bool:
        if addr.version != self.subnet.version or addr not in self.subnet or addr == self.gateway:
            return False
        if isinstance(self.subnet, IPv6Network):
            return self.subnet.prefixlen >= 127 or addr != self.subnet.network_address
        return self.subnet.prefixlen >= 31 or addr not in (
            self.subnet.network_address,
            self.subnet.broadcast_address,
        )

    def allocate(self, owner: str, preferred: str | None = None) -> IPAddress:
        if preferred:
            return self._allocate_preferred(owner, preferred)
        pool = self.ip_range or self.subnet
        first = int(pool.network_address)
        size = pool.num_addresses
        make = type(pool.network_address)
        start = 0
        if self.last and _address(self.last) in pool:
            start = int(_address(self.last)) - first + 1
        # The scan stops at the first free address: bounded by the allocations, not by the size
        # of an IPv6 subnet.
        for step in range(min(size, len(self.allocations) + 4)):
            addr = make(first + (start + step) % size)
            if self._is_host_address(addr) and str(addr) not in self.allocations:
                self.allocations[str(addr)] = owner
                self.last = str(addr)
                return addr
        raise NetdError(f"no free address left in {pool}")

    def _allocate_preferred(self, owner: str, preferred: str) -> IPAddress:
        try:
            addr = _address(preferred)
        except ValueError:
            raise NetdError(f'invalid {self.family_name} address "{preferred}"') from None
        if addr.version != self.subnet.version:
            raise NetdError(f'invalid {self.family_name} address "{preferred}"')
        if addr not in self.subnet:
            raise NetdError(f"address {addr} is not in subnet {self.subnet}")
        if not self._is_host_address(addr):
            raise NetdError(f"address {addr} is reserved in subnet {self.subnet}")
        holder = self.allocations.get(str(addr))
        if holder is not None and holder != owner:
            raise Conflict(f"address {addr} is already in use")
        self.allocations[str(addr)] = owner
        return addr

    def claim(self, addr: str, owner: str) -> None:
        """Record ``addr`` as held by ``owner`` (reconciling state after a crash)."""
        self.allocations[str(_address(addr))] = owner

    def release(self, addr: str) -> None:
        if addr:
            self.allocations.pop(str(_address(addr)), None)

"""IPv4 address management inside one network's subnet (the controller persists it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from netd.errors import Conflict, NetdError


@dataclass
class Ipam:
    """Allocations of host addresses in ``subnet`` (gateway, network and broadcast excluded).

    Automatic allocation takes addresses from ``ip_range`` (the whole subnet when None),
    round-robin after the last address handed out like Docker's default IPAM, so a just-released
    address is not reused at once (stale ARP/conntrack entries). A requested address may be
    anywhere in the subnet, as with Docker's ``--ip``.
    """

    subnet: IPv4Network
    gateway: IPv4Address
    ip_range: IPv4Network | None = None
    allocations: dict[str, str] = field(default_factory=dict)  # address -> owner (container id)
    last: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"allocations": dict(self.allocations), "last": self.last}

    def load_json(self, data: dict[str, Any]) -> None:
        self.allocations = {str(IPv4Address(a)): o for a, o in data.get("allocations", {}).items()}
        self.last = data.get("last", "")

    def _is_host_address(self, addr: IPv4Address) -> bool:
        if addr not in self.subnet or addr == self.gateway:
            return False
        return self.subnet.prefixlen >= 31 or addr not in (
            self.subnet.network_address,
            self.subnet.broadcast_address,
        )

    def allocate(self, owner: str, preferred: str | None = None) -> IPv4Address:
        if preferred:
            return self._allocate_preferred(owner, preferred)
        pool = self.ip_range or self.subnet
        first = int(pool.network_address)
        size = pool.num_addresses
        start = 0
        if self.last and IPv4Address(self.last) in pool:
            start = int(IPv4Address(self.last)) - first + 1
        for step in range(size):
            addr = IPv4Address(first + (start + step) % size)
            if self._is_host_address(addr) and str(addr) not in self.allocations:
                self.allocations[str(addr)] = owner
                self.last = str(addr)
                return addr
        raise NetdError(f"no free address left in {pool}")

    def _allocate_preferred(self, owner: str, preferred: str) -> IPv4Address:
        try:
            addr = IPv4Address(preferred)
        except ValueError:
            raise NetdError(f'invalid IPv4 address "{preferred}"') from None
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
        self.allocations[str(IPv4Address(addr))] = owner

    def release(self, addr: str) -> None:
        self.allocations.pop(str(IPv4Address(addr)), None)

    def owners(self) -> set[str]:
        return set(self.allocations.values())

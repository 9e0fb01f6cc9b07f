"""IPv4 address management for one bridge subnet, persisted as JSON."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from netd.errors import NetdError
from netd.jsonstate import read_json, write_json_atomic


@dataclass
class Ipam:
    """Allocations of host addresses in ``subnet`` (gateway, network and broadcast excluded).

    Allocation is round-robin after the last address handed out, like Docker's default IPAM,
    so a just-released address is not reused at once (stale ARP/conntrack entries).
    """

    state_path: Path
    subnet: IPv4Network
    gateway: IPv4Address
    allocations: dict[str, str] = field(default_factory=dict)  # address -> owner (container id)
    last: str = ""

    @classmethod
    def load(cls, state_path: Path, subnet: IPv4Network, gateway: IPv4Address) -> Ipam:
        data = read_json(state_path, None) or {}
        ipam = cls(state_path, subnet, gateway)
        if data and data.get("subnet") != str(subnet):
            if data.get("allocations"):
                raise NetdError(
                    f"subnet changed from {data.get('subnet')} to {subnet} while addresses "
                    "are allocated; remove the containers first"
                )
            return ipam
        ipam.allocations = dict(data.get("allocations", {}))
        ipam.last = data.get("last", "")
        return ipam

    def _save(self) -> None:
        write_json_atomic(
            self.state_path,
            {"subnet": str(self.subnet), "allocations": self.allocations, "last": self.last},
        )

    def _is_assignable(self, addr: IPv4Address) -> bool:
        if addr == self.gateway:
            return False
        if self.subnet.prefixlen < 31 and addr in (
            self.subnet.network_address,
            self.subnet.broadcast_address,
        ):
            return False
        return str(addr) not in self.allocations

    def allocate(self, owner: str) -> IPv4Address:
        first = int(self.subnet.network_address)
        size = self.subnet.num_addresses
        start = int(IPv4Address(self.last)) - first + 1 if self.last else 0
        for step in range(size):
            addr = IPv4Address(first + (start + step) % size)
            if self._is_assignable(addr):
                self.allocations[str(addr)] = owner
                self.last = str(addr)
                self._save()
                return addr
        raise NetdError(f"no free address left in {self.subnet}")

    def release(self, addr: str) -> None:
        if self.allocations.pop(str(ipaddress.IPv4Address(addr)), None) is not None:
            self._save()

    def release_owner(self, owner: str) -> None:
        """Release every address held by ``owner``."""
        stale = [a for a, o in self.allocations.items() if o == owner]
        for addr in stale:
            del self.allocations[addr]
        if stale:
            self._save()

    def owners(self) -> set[str]:
        return set(self.allocations.values())

    def clear(self) -> None:
        self.allocations.clear()
        self.last = ""
        self.state_path.unlink(missing_ok=True)

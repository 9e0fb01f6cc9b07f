"""Host ports for the run: ports free for TCP and UDP on every address.

They come from below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by
default), so connections the load generators open cannot take them meanwhile.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

LOW = 15000
HIGH = 32000  # exclusive


class NoFreePorts(Exception):
    pass


def port_is_free(port: int) -> bool:
    """Whether pyengined could reserve ``port`` for TCP and UDP on every address. TCP is
    probed with SO_REUSEADDR, as netd binds it: connections in TIME_WAIT do not hold a port."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


@dataclass
class PortPool:
    low: int = LOW
    high: int = HIGH
    _given: set[int] = field(default_factory=set)

    def take(self, count: int) -> list[int]:
        """``count`` free ports, not necessarily consecutive, from a random point of the range
        on. Other programs come and go on a shared machine: take ports right before binding
        them, and give them back afterwards."""
        span = self.high - self.low
        if count < 1 or count > span:
            raise NoFreePorts(f"cannot hand out {count} ports from {self.low}-{self.high - 1}")
        offset = random.randrange(span)
        found: list[int] = []
        for i in range(span):
            port = self.low + (offset + i) % span
            if port not in self._given and port_is_free(port):
                found.append(port)
                if len(found) == count:
                    self._given.update(found)
                    return sorted(found)
        raise NoFreePorts(f"no {count} free ports in {self.low}-{self.high - 1}")

    def one(self) -> int:
        return self.take(1)[0]

    def give_back(self, ports: list[int]) -> None:
        """Let ``ports`` be handed out again (their user has closed every socket on them)."""
        self._given.difference_update(ports)

"""Whether published ports answer a connection attempt, without waking their proxies.

A full connect would: an idle pyengine-proxy waits in poll(2) on its listener and makes its
event loop on the first connection, copying ~2.5 MB of pages it then writes (measured: 200
ports woken by one connect each, helpers' PSS 39 MB -> 529 MB), which 10,000 ports cannot
afford. A SYN sent from a raw socket is answered with a SYN-ACK by the kernel from the
listener's SYN queue (tcp(7)); the client side has no socket, so the kernel answers the SYN-ACK
with a RST and the connection never reaches the accept queue: the listener never turns
readable. A port answers only when its socket is listening and nothing drops the packets on the
way: what a connect() needs, short of the proxy's relay, which the study checks on a sample of
ports with a full HTTP request instead.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from scapy.config import conf
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import sr
from scapy.supersocket import L3RawSocket

SYN_ACK = 0x12
BATCH = 500


def answering(host: str, ports: Iterable[int], timeout: float = 2.0) -> set[int]:
    """The ``ports`` of ``host`` (a loopback address) that answer a SYN with a SYN-ACK."""
    wanted = sorted(set(ports))
    answered: set[int] = set()
    # Loopback has no link layer for scapy's default sockets; a raw IP socket reaches it.
    socket_class = conf.L3socket6 if ":" in host else conf.L3socket
    conf.L3socket, conf.L3socket6 = L3RawSocket, L3RawSocket
    try:
        layer = IPv6(dst=host) if ":" in host else IP(dst=host)
        sport = random.randrange(40000, 60000)
        for start in range(0, len(wanted), BATCH):
            batch = wanted[start : start + BATCH]
            for _ in range(2):  # once more for what a full queue dropped
                left = [p for p in batch if p not in answered]
                if not left:
                    break
                replies, _ = sr(
                    layer / TCP(sport=sport, dport=left, flags="S"),
                    timeout=timeout,
                    verbose=0,
                )
                for _, reply in replies:
                    if TCP in reply and reply[TCP].flags & SYN_ACK == SYN_ACK:
                        answered.add(int(reply[TCP].sport))
    finally:
        if ":" in host:
            conf.L3socket6 = socket_class
        else:
            conf.L3socket = socket_class
    return answered

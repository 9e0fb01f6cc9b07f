"""A fake upstream resolver on a loopback address, for tests of the embedded DNS's forwarding."""

from __future__ import annotations

import socket
import threading

from dnslib import QTYPE, RR, A, DNSRecord


class FakeUpstream:
    """A resolver on ``address``:53/udp: A queries get ``answer``, names starting with
    ``silent_prefix`` get nothing at all; every name asked is recorded."""

    def __init__(self, address: str, answer: str, silent_prefix: str | None = None) -> None:
        self.answer = answer
        self.silent_prefix = silent_prefix
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.2)
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = DNSRecord.parse(data)
            except Exception:
                continue
            name = str(query.q.qname)
            self.queries.append(name)
            if self.silent_prefix and name.startswith(self.silent_prefix):
                continue
            reply = query.reply()
            if query.q.qtype == QTYPE.A:
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(self.answer), ttl=60))
            self.sock.sendto(reply.pack(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

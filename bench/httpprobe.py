"""A one-shot HTTP probe on a fresh TCP connection, waiting until a server answers 200, and
counting the ports that accept a connection."""

from __future__ import annotations

import contextlib
import socket
import time

CONNECT_TIMEOUT_SECONDS = 2.0


def probe(ip: str, port: int, timeout: float, path: str = "/") -> str:
    """``"ok"`` for an HTTP 200, else what happened: ``"refused"``, ``"timeout"``, ``"reset"``,
    ``"status <code>"``, ``"closed"`` or the OSError's name."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                head += chunk
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return type(exc).__name__
    if not head:
        return "closed"
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[1] == b"200":
        return "ok"
    return f"status {parts[1].decode(errors='replace') if len(parts) >= 2 else '?'}"


def wait_for_200(ip: str, port: int, timeout: float, path: str = "/") -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(ip, port, 0.5, path) == "ok":
            return True
        time.sleep(0.05)
    return False


def count_connecting(host: str, ports: list[int]) -> int:
    """How many of ``ports`` accept a TCP connection on ``host`` (closed at once)."""
    accepted = 0
    for port in ports:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS).close()
            accepted += 1
    return accepted

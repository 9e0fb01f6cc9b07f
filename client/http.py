"""A small synchronous client for the daemon's API over its unix socket."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import quote, urlencode

API_PREFIX = "/v1.41"


class DaemonError(Exception):
    """The daemon answered with an error: ``status`` and Docker's ``{"message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DaemonUnreachable(Exception):
    """No answer: the socket is missing or refuses, or the connection broke mid-request."""


# What a broken connection to the daemon raises, while sending or while reading an answer
# (http.client.RemoteDisconnected is both a ConnectionResetError and an HTTPException).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    http.client.HTTPException,
)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    def __init__(self, host: str) -> None:
        if host.startswith("unix://"):
            host = host[len("unix://") :]
        if not host.startswith("/"):
            raise ValueError(f"only unix:// daemon addresses are supported, got {host!r}")
        self.socket_path = host

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
        stream: BinaryIO | None = None,
        timeout: float | None = 120,
        headers: dict[str, str] | None = None,
        api_version: str | None = None,  # a call whose meaning changed after API_PREFIX's
    ) -> http.client.HTTPResponse:
        url = (f"/v{api_version}" if api_version else API_PREFIX) + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        conn = UnixHTTPConnection(self.socket_path, timeout)
        headers = {"Host": "pyengine", **(headers or {})}
        data: Any = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif stream is not None:
            data = stream
            headers["Content-Type"] = "application/x-tar"
            headers["Transfer-Encoding"] = "chunked"
        try:
            conn.request(method, url, body=data, headers=headers, encode_chunked=stream is not None)
            resp = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise DaemonUnreachable(
                f"Cannot connect to the pyengine daemon at unix://{self.socket_path}. "
                "Is pyengined running?"
            ) from e
        except CONNECTION_ERRORS + (OSError,) as e:
            raise DaemonUnreachable(self.connection_error(e)) from e
        if resp.status >= 400:
            raw = resp.read()
            try:
                message = json.loads(raw)["message"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace").strip() or resp.reason
            raise DaemonError(resp.status, message)
        return resp

    def connection_error(self, error: BaseException) -> str:
        """One line for a connection to the daemon that failed after it was made."""
        reason = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, TimeoutError):
            reason = "timed out"
        return f"error during connect to unix://{self.socket_path}: {reason}"

    def json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.request(method, path, **kw)
        raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    # ---- calls ---------------------------------------------------------------------------

    def ping(self) -> str:
        return self.request("GET", "/_ping", timeout=5).read().decode()

    def rename(self, ref: str, name: str) -> None:
        self.request("POST", f"/containers/{ref}/rename", query={"name": name}).read()

    # ---- networks ------------------------------------------------------------------------

    def networks(self, filters: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
        query = {"filters": json.dumps(filters)} if filters else None
        return self.json("GET", "/networks", query=query)

    def network_inspect(self, ref: str) -> dict[str, Any]:
        return self.json("GET", f"/networks/{ref}")

    def network_create(self, request: dict[str, Any]) -> str:
        return self.json("POST", "/networks/create", body=request)["Id"]

    def network_remove(self, ref: str) -> None:
        self.request("DELETE", f"/networks/{ref}").read()

    def network_connect(
        self, network: str, container: str, endpoint_config: dict[str, Any]
    ) -> None:
        body = {"Container": container, "EndpointConfig": endpoint_config}
        self.request("POST", f"/networks/{network}/connect", body=body).read()

    def network_disconnect(self, network: str, container: str, force: bool = False) -> None:
        body = {"Container": container, "Force": force}
        self.request("POST", f"/networks/{network}/disconnect", body=body).read()

    def create(self, name: str | None, config: dict[str, Any]) -> str:
        return self.json("POST", "/containers/create", query={"name": name}, body=config)["Id"]

    def start(self, ref: str) -> None:
        self.request("POST", f"/containers/{quote(ref)}/start").read()

    def stop(self, ref: str, timeout: int | None = None) -> None:
        self.request(
            "POST", f"/containers/{quote(ref)}/stop", query={"t": timeout}, timeout=None
        ).read()

    def remove(self, ref: str, force: bool = False, volumes: bool = False) -> None:
        query = {"force": int(force), "v": int(volumes)}
        self.request("DELETE", f"/containers/{quote(ref)}", query=query, timeout=None).read()

    def inspect(self, ref: str) -> dict[str, Any]:
        return self.json("GET", f"/containers/{quote(ref)}/json")

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        return self.json("GET", "/containers/json", query={"all": int(all)})

    def kill(self, ref: str, signal: str | None = None) -> None:
        self.request("POST", f"/containers/{quote(ref)}/kill", query={"signal": signal}).read()

    def restart(self, ref: str, timeout: int | None = None) -> None:
        self.request(
            "POST", f"/containers/{quote(ref)}/restart", query={"t": timeout}, timeout=None
        ).read()

    def wait(self, ref: str, condition: str = "not-running") -> int:
        return self.json(
            "POST", f"/containers/{quote(ref)}/wait", query={"condition": condition}, timeout=None
        )["StatusCode"]

    def logs(
        self, ref: str, follow: bool = False, tail: str = "all", timestamps: bool = False
    ) -> Iterator[tuple[int, bytes]]:
        """(stream id, payload) frames of Docker's multiplexed log stream."""
        resp = self.request(
            "GET",
            f"/containers/{quote(ref)}/logs",
            query={
                "stdout": 1,
                "stderr": 1,
                "follow": int(follow),
                "tail": tail,
                "timestamps": int(timestamps),
            },
            timeout=None,
        )
        while True:
            header = resp.read(8)
            if not header and not resp.length:  # the end (chunked, or all of a known length)
                return
            if len(header) < 8:
                raise DaemonUnreachable(self.connection_error(EOFError("log stream cut short")))
            stream_id, size = struct.unpack(">BxxxL", header)
            payload = resp.read(size)
            if len(payload) < size:
                raise DaemonUnreachable(self.connection_error(EOFError("log stream cut short")))
            yield stream_id, payload

    def images(self) -> list[dict[str, Any]]:
        return self.json("GET", "/images/json")

    def image_inspect(self, ref: str) -> dict[str, Any]:
        return self.json("GET", f"/images/{quote(ref)}/json")

    def tag(self, source: str, repo: str, tag: str | None) -> None:
        self.request(
            "POST", f"/images/{quote(source)}/tag", query={"repo": repo, "tag": tag}
        ).read()

    def remove_image(self, ref: str, force: bool = False) -> list[dict[str, str]]:
        return self.json("DELETE", f"/images/{quote(ref)}", query={"force": int(force)})

    def pull(self, ref: str, auth: tuple[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """Docker's progress objects; a failed pull ends with one holding ``error``."""
        headers = {}
        if auth is not None:
            encoded = json.dumps({"username": auth[0], "password": auth[1]}).encode()
            headers["X-Registry-Auth"] = base64.urlsafe_b64encode(encoded).decode()
        resp = self.request(
            "POST", "/images/create", query={"fromImage": ref}, headers=headers, timeout=None
        )
        for line in resp:
            if line.strip():
                yield json.loads(line)

    def login(self, server: str, username: str, password: str) -> dict[str, Any]:
        return self.json(
            "POST",
            "/auth",
            body={"username": username, "password": password, "serveraddress": server},
        )

    def load(self, archive: BinaryIO) -> list[str]:
        resp = self.request("POST", "/images/load", stream=archive, timeout=None)
        out = []
        for line in resp.read().decode().splitlines():
            if line.strip():
                msg = json.loads(line)
                if "error" in msg:
                    raise DaemonError(500, msg["error"])
                out.append(msg.get("stream", "").strip())
        return out

"""Raw Engine API requests over a daemon's unix socket, for tests that send what no client would."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from client.http import UnixHTTPConnection
from tests.conftest import Daemon, stop_daemon


@dataclass
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> str:
        try:
            return str(json.loads(self.body).get("message", ""))
        except (ValueError, AttributeError):
            return self.body.decode(errors="replace")


class RawApi:
    """One request per connection; bodies are sent as given (bytes) or as JSON (anything else)."""

    def __init__(self, host: str, timeout: float = 30) -> None:
        self.path = host.removeprefix("unix://")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        url = "/v1.41" + path
        if isinstance(query, str):
            url += "?" + query
        elif query:
            # surrogatepass: a lone surrogate goes out as the bytes a broken client would send
            url += "?" + urlencode(query, quote_via=quote, errors="surrogatepass")
        headers = {"Host": "pyengine", **(headers or {})}
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = UnixHTTPConnection(self.path, self.timeout)
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            return Answer(resp.status, resp.read())
        finally:
            conn.close()

    def ping(self) -> bool:
        try:
            return self.request("GET", "/_ping").status == 200
        except OSError:
            return False

    def remove_all_containers(self) -> None:
        for c in self.request("GET", "/containers/json", {"all": "1"}).json():
            self.request("DELETE", f"/containers/{c['Id']}", {"force": "1"})

    def remove_user_networks(self) -> None:
        for net in self.request("GET", "/networks").json():
            if net["Name"] not in ("bridge", "host", "none"):
                self.request("DELETE", f"/networks/{net['Id']}")


def remove_all_and_stop(d: Daemon) -> None:
    """A module daemon's teardown: what the tests created goes through the API (if the daemon
    still answers), then the daemon stops; the caller checks that nothing is left."""
    api = RawApi(d.host)
    if api.ping():
        api.remove_all_containers()
        api.remove_user_networks()
    stop_daemon(d)

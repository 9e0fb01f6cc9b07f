"""HTTP to one registry (OCI distribution-spec ``spec.md``): endpoints, auth handshakes, errors.

- Endpoint: Docker Hub (``docker.io``) is served by ``registry-1.docker.io``; every registry
  speaks HTTPS, except the insecure ones (by default ``localhost`` and ``127.0.0.0/8``, as in
  Docker), which get plain HTTP.
- Auth: a request is sent with what is known; a 401 carries ``WWW-Authenticate`` challenges.
  ``Bearer`` (distribution ``docs/spec/auth/token.md``): GET ``realm?service=&scope=`` (with
  Basic credentials and ``account=`` when there are credentials, which go to an https realm
  only, or to the host of an insecure registry itself; anonymously otherwise), then
  retry with ``Authorization: Bearer <token>``. ``Basic`` (RFC 7617): retry with the
  credentials. One retry per request: a second 401 is the answer.
- Errors: every failure is a RegistryError with a one-line message; the registry's own error
  body (``{"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}``)
  becomes ``unauthorized: authentication required``, the way Docker prints it.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from common.credentials import DOCKER_HUB_HOST
from common.reference import DEFAULT_DOMAIN
from engine.images.registry_auth import Challenge, basic_authorization, parse_challenges

DEFAULT_INSECURE_REGISTRIES: frozenset[str] = frozenset({"localhost", "127.0.0.0/8"})
USER_AGENT = "pyengine/0.1"
_MAX_ERROR_BODY = 64 * 1024
_MAX_TOKEN_BODY = 1 << 20


class RegistryError(Exception):
    """A pull or login that failed; the message is one line, e.g. ``connection refused``."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class RegistryHTTPError(RegistryError):
    """A registry answered with an error status (``status``, the first error ``code``)."""

    def __init__(self, message: str, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def registry_host(domain: str) -> str:
    """The host[:port] serving a reference's domain: Docker Hub's is ``registry-1.docker.io``."""
    return DOCKER_HUB_HOST if domain == DEFAULT_DOMAIN else domain


def _split_host_port(host: str) -> str:
    """``127.0.0.1:5000`` → ``127.0.0.1``; ``[::1]:5000`` → ``::1``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_insecure(domain: str, insecure_registries: Collection[str]) -> bool:
    """Whether ``domain`` may be reached over plain HTTP.

    An entry matches by ``host:port``, by host, or, for an IP address, by a CIDR that holds it
    (Docker's ``--insecure-registry`` semantics, without resolving host names).
    """
    host = registry_host(domain).lower()
    bare = _split_host_port(host)
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        address = None
    for entry in insecure_registries:
        entry = entry.strip().lower()
        if entry in (host, bare):
            return True
        if address is not None and "/" in entry:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def registry_base_url(domain: str, insecure_registries: Collection[str]) -> str:
    """``https://registry-1.docker.io`` for docker.io, ``http://127.0.0.1:5000`` for loopback."""
    scheme = "http" if is_insecure(domain, insecure_registries) else "https"
    return f"{scheme}://{registry_host(domain)}"


def error_from_body(status: int, reason: str, body: bytes, url: str) -> RegistryHTTPError:
    """The registry's error body as Docker prints it: ``<code in words>: <message>``."""
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        code = str(first.get("code") or "")
        message = str(first.get("message") or "")
    except (ValueError, AttributeError, IndexError, KeyError, TypeError):
        code = message = ""
    if code:
        words = code.lower().replace("_", " ")
        return RegistryHTTPError(f"{words}: {message or reason}", status, code)
    return RegistryHTTPError(f"unexpected HTTP status {status} {reason} from {url}", status)


def transport_error(error: BaseException, url: str) -> RegistryError:
    """A connection-level failure in one line: ``Get "http://…/v2/": connection refused``."""
    where = f'Get "{url}"'
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return RegistryError(f"{where}: tls: certificate verification failed: {error}")
    if isinstance(error, aiohttp.ClientSSLError):
        return RegistryError(f"{where}: tls: {error}")
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        if os_error.errno is not None and os_error.errno in errno.errorcode:
            return RegistryError(f"{where}: {os.strerror(os_error.errno).lower()}")
        if isinstance(os_error, ConnectionRefusedError):
            return RegistryError(f"{where}: connection refused")
        return RegistryError(f"{where}: {os_error.strerror or os_error}")
    if isinstance(error, (TimeoutError, aiohttp.ServerTimeoutError)):
        return RegistryError(f"{where}: timeout")
    if isinstance(error, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return RegistryError(f"{where}: connection closed by the registry")
    return RegistryError(f"{where}: {error or type(error).__name__}")


class RegistryClient:
    """Requests to one registry through one aiohttp session, answering auth challenges."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        domain: str,
        credentials: tuple[str, str] | None,
        insecure_registries: Collection[str] = DEFAULT_INSECURE_REGISTRIES,
    ) -> None:
        self.session = session
        self.domain = domain
        self.base_url = registry_base_url(domain, insecure_registries)
        self.credentials = credentials
        self._tokens: dict[str, str] = {}  # scope → bearer token
        self._basic: str | None = None  # set once the registry asked for Basic

    def _authorization(self, scope: str) -> str | None:
        if scope in self._tokens:
            return f"Bearer {self._tokens[scope]}"
        return self._basic

    @asynccontextmanager
    async def get(
        self, path: str, *, scope: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET ``base_url + path``; the 2xx response (any error status raises)."""
        url = self.base_url + path
        response = await self._send(url, scope, headers or {})
        try:
            if response.status >= 300:
                body = await response.content.read(_MAX_ERROR_BODY)
                raise error_from_body(response.status, response.reason or "", body, url)
            yield response
        except (TimeoutError, aiohttp.ClientError) as e:
            raise transport_error(e, url) from e
        finally:
            response.release()

    async def ping(self) -> None:
        """GET /v2/, authenticated if the registry asks (what ``docker login`` verifies)."""
        async with self.get("/v2/", scope=""):
            pass

    async def _send(self, url: str, scope: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        answered = False
        while True:
            sent = dict(headers)
            authorization = self._authorization(scope)
            if authorization is not None:
                sent["Authorization"] = authorization
            try:
                response = await self.session.get(url, headers=sent)
            except (TimeoutError, aiohttp.ClientError) as e:
                raise transport_error(e, url) from e
            if response.status != 401 or answered:
                return response
            header = ", ".join(response.headers.getall("WWW-Authenticate", []))
            body = await response.content.read(_MAX_ERROR_BODY)
            response.release()
            challenges = parse_challenges(header)
            if not await self._answer(challenges, scope, authorization):
                raise error_from_body(401, response.reason or "Unauthorized", body, url)
            answered = True

    async def _answer(self, challenges: list[Challenge], scope: str, tried: str | None) -> bool:
        """Learn a new Authorization for ``scope`` from the challenges; False if there is none."""
        for challenge in challenges:
            if challenge.scheme == "bearer" and challenge.params.get("realm"):
                self._tokens[scope] = await self._fetch_token(challenge, scope)
                return True
        for challenge in challenges:
            if challenge.scheme == "basic" and self.credentials is not None:
                self._basic = basic_authorization(*self.credentials)
                return self._basic != tried
        return False

    def _credentials_refused_by(self, realm: str) -> str | None:
        """Why the login must not go to the token realm ``realm``; None when it may.

        The realm comes from the registry's answer, which a registry reached over plain
        HTTP cannot vouch for: anyone on the path can point it elsewhere (containers/image
        issue 45). So Basic credentials go to a realm over https only, or over plain http to
        the very host of a registry that is itself insecure (the credentials already cross
        that path in clear, to that host, with Basic auth); aiohttp drops the header on a
        redirect to another origin."""
        try:
            url, registry = urlsplit(realm), urlsplit(self.base_url)
            host, registry_host = url.hostname, registry.hostname  # lower case
        except ValueError:
            return f"the token realm {realm!r} is not a URL"
        if url.scheme.lower() == "https":
            return None
        if registry.scheme == "http" and host is not None and host == registry_host:
            return None
        return (
            f"refusing to send credentials to the token realm {realm} over plain http "
            "(only to an https realm, or to the insecure registry's own host)"
        )

    async def _fetch_token(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.params["realm"]
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.domain}: unsupported token realm {realm!r}")
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        # The challenge names the scope it wants (e.g. for insufficient_scope); else ours.
        for one in (challenge.params.get("scope") or scope).split():
            params.append(("scope", one))
        headers = {}
        if self.credentials is not None:
            refusal = self._credentials_refused_by(realm)
            if refusal is not None:
                raise RegistryError(f"registry {self.domain}: {refusal}")
            params.append(("account", self.credentials[0]))
            headers["Authorization"] = basic_authorization(*self.credentials)
        try:
            async with self.session.get(realm, params=params, headers=headers) as response:
                body = await response.content.read(_MAX_TOKEN_BODY)
                status, reason = response.status, response.reason or ""
        except (TimeoutError, aiohttp.ClientError) as e:
            raise transport_error(e, realm) from e
        if status == 401:
            if self.credentials is not None:
                raise RegistryHTTPError("unauthorized: incorrect username or password", 401)
            raise RegistryHTTPError("unauthorized: authentication required", 401)
        if status != 200:
            raise error_from_body(status, reason, body, realm)
        try:
            answer: Any = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm} answered without a token")
        return token

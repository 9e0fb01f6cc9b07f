"""The Docker Engine API (v1.24 to v1.47) over aiohttp: translation between HTTP and the engine.

The parts: api_system (ping, version, info), api_containers, api_images (and ``/auth``),
api_networks (the default bridge and user-defined networks). Every route is served with and
without the ``/v1.NN`` prefix; a version outside [MIN_API_VERSION, API_VERSION] is a 400 as in
Docker. Errors are ``{"message": ...}`` with Docker's status codes; a Docker feature pyengined
lacks is a 501 that names it, never a 500 with a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from common.errors import Conflict, Forbidden, InvalidParameter, NotFound
from engine.api.archive import ArchiveApi
from engine.api.attach import AttachApi
from engine.api.common import (
    MAX_JSON_BODY,
    NotImplementedByEngine,
    error_response,
    log,
)
from engine.api.containers import ContainersApi
from engine.api.events import EventsApi
from engine.api.execs import ExecsApi
from engine.api.images import ImagesApi
from engine.api.networks import NetworksApi
from engine.api.resources import ResourcesApi
from engine.api.system import SystemApi
from engine.api.version import API_VERSION, MIN_API_VERSION, ApiVersion, set_api_version
from engine.api.volumes import VolumesApi
from engine.lifecycle.engine import Engine

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Docker calls pyengined does not have (yet), answered 501 with what they are.
NOT_IMPLEMENTED: list[tuple[str, str, str]] = [
    ("POST", "/containers/{id}/pause", "pause"),
    ("POST", "/containers/{id}/unpause", "unpause"),
    ("GET", "/containers/{id}/export", "export"),
    ("GET", "/containers/{id}/changes", "diff"),
    ("POST", "/containers/prune", "container prune"),
    ("POST", "/build", "build"),
    ("POST", "/commit", "commit"),
    ("GET", "/images/get", "save"),
    ("GET", "/images/search", "search"),
    ("POST", "/images/prune", "image prune"),
    ("GET", "/images/{name:.+}/history", "history"),
    ("GET", "/images/{name:.+}/get", "save"),
    ("POST", "/images/{name:.+}/push", "push"),
    ("GET", "/system/df", "system df"),
]


def _not_implemented(what: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise NotImplementedByEngine(f"{what} is not supported by pyengined")

    return handler


# Exception → status, first match wins: common.errors' family (every component's errors derive
# from it), then ValueError from parsing a request. Anything else is a 500 with one line.
_STATUS: list[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = [
    (NotFound, 404),
    (Conflict, 409),
    (Forbidden, 403),
    (NotImplementedByEngine, 501),
    ((InvalidParameter, ValueError), 400),
]


def _one_line(text: str) -> str:
    return " ".join(text.split())


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map engine exceptions to Docker's status codes; never a traceback to the client."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status == 404:
            return error_response(404, f"page not found: {request.method} {request.path}")
        if e.status == 413:
            return error_response(413, f"request body too large (at most {MAX_JSON_BODY} bytes)")
        if e.status >= 400:
            return error_response(e.status, f"{e.reason}: {request.method} {request.path}")
        raise
    except json.JSONDecodeError as e:
        return error_response(400, f"invalid JSON body: {e}")
    except Exception as e:
        for kinds, status in _STATUS:
            if isinstance(e, kinds):
                return error_response(status, _one_line(str(e)) or type(e).__name__)
        # The daemon keeps serving; the client gets one line, the log the traceback.
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, _one_line(f"{type(e).__name__}: {e}"))


@web.middleware
async def version_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Docker's API version check on ``/v1.NN/...`` paths; the version, parsed, goes on the
    request for the handlers (``engine.api.version.api_version``)."""
    text = request.match_info.get("version")
    if text:
        version = ApiVersion.parse(text)  # the route's pattern admits only digits.digits
        if version > API_VERSION:
            return error_response(
                400,
                f"client version {text} is too new. Maximum supported API version is {API_VERSION}",
            )
        if version < MIN_API_VERSION:
            return error_response(
                400,
                f"client version {text} is too old. Minimum supported API version is "
                f"{MIN_API_VERSION}, please upgrade your client to a newer version",
            )
        set_api_version(request, version)
    return await handler(request)


def routes(engine: Engine) -> list[tuple[str, str, Handler]]:
    networks = NetworksApi(engine)
    containers = ContainersApi(engine, networks)
    # Attach with stdin or a TTY is engine.api.attach's; it hands the rest to containers'.
    attach = AttachApi(engine, containers.attach)
    replaced = {(method, path) for method, path, _ in attach.routes()}
    table: list[tuple[str, str, Handler]] = [
        *SystemApi(engine).routes(),
        *((m, p, h) for m, p, h in containers.routes() if (m, p) not in replaced),
        *attach.routes(),
        *ExecsApi(engine).routes(),
        *ImagesApi(engine).routes(),
        *networks.routes(),
        *VolumesApi(engine).routes(),
        *EventsApi(engine).routes(),
        *ResourcesApi(engine).routes(),
        *ArchiveApi(engine).routes(),
    ]
    table += [(method, path, _not_implemented(what)) for method, path, what in NOT_IMPLEMENTED]
    return table


def make_app(engine: Engine) -> web.Application:
    # client_max_size bounds the bodies read whole (JSON); image archives are streamed.
    app = web.Application(
        middlewares=[errors_middleware, version_middleware], client_max_size=MAX_JSON_BODY
    )

    async def end_streams(_app: web.Application) -> None:
        # Runs before the server waits for open requests: follows, attaches and waits end
        # now instead of holding the daemon's shutdown up.
        engine.end_streams()

    app.on_shutdown.append(end_streams)
    for method, path, handler in routes(engine):
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/v{version:[0-9]+[.][0-9]+}" + path, handler)
    return app

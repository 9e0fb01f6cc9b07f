"""The Docker Engine API (v1.41 shapes) over aiohttp: translation between HTTP and the engine."""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import struct
import tempfile
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from engine.containers import Container, ContainerConflict, ContainerNotFound
from engine.engine import Engine, InvalidParameter, NotRunning, exposed_ports
from engine.images import ImageLoadError, ImageNotFound
from engine.reference import familiar

API_VERSION = "1.41"
MIN_API_VERSION = "1.24"
ENGINE_VERSION = "0.1.0"

log = logging.getLogger("pyengined.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Docker's multiplexed stream (no TTY): an 8-byte header [stream, 0, 0, 0, size uint32 BE].
STREAM_IDS = {"stdin": 0, "stdout": 1, "stderr": 2}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map engine exceptions to Docker's status codes; never a traceback to the client."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, f"{e.reason}: {request.method} {request.path}")
        raise
    except (ContainerNotFound, ImageNotFound) as e:
        return _error(404, str(e))
    except ContainerConflict as e:
        return _error(409, str(e))
    except NotRunning as e:
        return _error(409, str(e))
    except (InvalidParameter, ImageLoadError, ValueError) as e:
        return _error(400, str(e))
    except json.JSONDecodeError as e:
        return _error(400, f"invalid JSON body: {e}")
    except Exception as e:  # the daemon keeps serving; the client gets one line
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(500, f"{type(e).__name__}: {e}")


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    return value.lower() in ("1", "true", "yes")


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise InvalidParameter("request body must be a JSON object")
    return body


def _unix_seconds(rfc3339: str) -> int:
    try:
        return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


class Api:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- shapes --------------------------------------------------------------------------

    def _ports_map(self, c: Container) -> dict[str, list[dict[str, str]] | None]:
        image_config: dict[str, Any] = {}
        try:
            image_config = self.engine.images.get(c.image_id).config.get("config") or {}
        except ImageNotFound:
            pass
        ports: dict[str, list[dict[str, str]] | None] = {
            k: None for k in exposed_ports(c, image_config)
        }
        if c.state.running:
            for p in c.network.ports:
                ports.setdefault(f"{p.container_port}/{p.proto}", None)
                entry = {"HostIp": p.host_ip, "HostPort": str(p.host_port)}
                ports[f"{p.container_port}/{p.proto}"] = [
                    *(ports[f"{p.container_port}/{p.proto}"] or []),
                    entry,
                ]
        return ports

    def _status_text(self, c: Container) -> str:
        s = c.state
        if s.status == "running":
            return f"Up {_ago(s.started_at, suffix=False)}"
        if s.status == "exited":
            return f"Exited ({s.exit_code}) {_ago(s.finished_at)}"
        return s.status.capitalize()

    def container_summary(self, c: Container) -> dict[str, Any]:
        ports = [
            {
                "IP": p.host_ip,
                "PrivatePort": p.container_port,
                "PublicPort": p.host_port,
                "Type": p.proto,
            }
            for p in (c.network.ports if c.state.running else [])
        ]
        return {
            "Id": c.id,
            "Names": [f"/{c.name}"],
            "Image": c.image,
            "ImageID": c.image_id,
            "Command": " ".join(c.args),
            "Created": _unix_seconds(c.created),
            "Ports": ports,
            "Labels": c.config.get("Labels") or {},
            "State": c.state.status,
            "Status": self._status_text(c),
            "HostConfig": {"NetworkMode": c.host_config.get("NetworkMode") or "default"},
            "NetworkSettings": {"Networks": {"bridge": self._endpoint_settings(c)}},
            "Mounts": [],
        }

    def _endpoint_settings(self, c: Container) -> dict[str, Any]:
        n = c.network
        return {
            "IPAMConfig": None,
            "Links": None,
            "Aliases": None,
            "NetworkID": "bridge",
            "EndpointID": c.id if n.ip else "",
            "Gateway": n.gateway,
            "IPAddress": n.ip,
            "IPPrefixLen": n.prefixlen,
            "IPv6Gateway": "",
            "GlobalIPv6Address": "",
            "GlobalIPv6PrefixLen": 0,
            "MacAddress": n.mac,
            "DriverOpts": None,
        }

    def container_inspect(self, c: Container) -> dict[str, Any]:
        s = c.state
        n = c.network
        return {
            "Id": c.id,
            "Created": c.created,
            "Path": c.args[0] if c.args else "",
            "Args": c.args[1:],
            "State": {
                "Status": s.status,
                "Running": s.running,
                "Paused": False,
                "Restarting": False,
                "OOMKilled": False,
                "Dead": False,
                "Pid": s.pid,
                "ExitCode": s.exit_code,
                "Error": s.error,
                "StartedAt": s.started_at,
                "FinishedAt": s.finished_at,
            },
            "Image": c.image_id,
            "Name": f"/{c.name}",
            "RestartCount": 0,
            "Driver": "overlay2",
            "Platform": "linux",
            "HostConfig": {
                "NetworkMode": "default",
                "PortBindings": {},
                "AutoRemove": False,
                "PublishAllPorts": False,
                **c.host_config,
            },
            "Config": {
                "Hostname": c.config.get("Hostname", ""),
                "User": c.config.get("User", ""),
                "Tty": False,
                "OpenStdin": False,
                "AttachStdout": True,
                "AttachStderr": True,
                "Env": c.config.get("Env") or [],
                "Cmd": c.config.get("Cmd"),
                "Image": c.image,
                "WorkingDir": c.config.get("WorkingDir", ""),
                "Entrypoint": c.config.get("Entrypoint"),
                "ExposedPorts": {k: {} for k in self._ports_map(c)},
                "Labels": c.config.get("Labels") or {},
                "StopSignal": c.config.get("StopSignal"),
            },
            "NetworkSettings": {
                "Bridge": "",
                "SandboxID": c.id if n.ip else "",
                "SandboxKey": n.netns_path,
                "Ports": self._ports_map(c),
                "Gateway": n.gateway,
                "IPAddress": n.ip,
                "IPPrefixLen": n.prefixlen,
                "MacAddress": n.mac,
                "Networks": {"bridge": self._endpoint_settings(c)},
            },
            "Mounts": [],
        }

    # ---- system ----------------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        headers = {
            "Api-Version": API_VERSION,
            "Docker-Experimental": "false",
            "Ostype": "linux",
            "Cache-Control": "no-cache, no-store, must-revalidate",
        }
        body = "" if request.method == "HEAD" else "OK"
        return web.Response(text=body, headers=headers, content_type="text/plain")

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "Platform": {"Name": "pyengine"},
                "Components": [
                    {
                        "Name": "Engine",
                        "Version": ENGINE_VERSION,
                        "Details": {"ApiVersion": API_VERSION},
                    }
                ],
                "Version": ENGINE_VERSION,
                "ApiVersion": API_VERSION,
                "MinAPIVersion": MIN_API_VERSION,
                "Os": "linux",
                "Arch": _arch(),
                "KernelVersion": platform.release(),
                "GoVersion": f"python{platform.python_version()}",
                "GitCommit": "",
                "BuildTime": "",
            }
        )

    # ---- containers ------------------------------------------------------------------------

    async def container_create(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        host_config = body.pop("HostConfig", None) or {}
        body.pop("NetworkingConfig", None)
        name = request.query.get("name") or None
        c = await self.engine.create(name, body, host_config)
        return web.json_response({"Id": c.id, "Warnings": []}, status=201)

    async def container_start(self, request: web.Request) -> web.Response:
        c = self.engine.containers.get(request.match_info["id"])
        if c.state.running:
            return web.Response(status=304)
        await self.engine.start(c.id)
        return web.Response(status=204)

    async def container_stop(self, request: web.Request) -> web.Response:
        t = request.query.get("t")
        timeout = float(t) if t not in (None, "") else None
        stopped = await self.engine.stop(request.match_info["id"], timeout)
        return web.Response(status=204 if stopped else 304)

    async def container_kill(self, request: web.Request) -> web.Response:
        await self.engine.kill(request.match_info["id"], request.query.get("signal", "SIGKILL"))
        return web.Response(status=204)

    async def container_wait(self, request: web.Request) -> web.StreamResponse:
        c = self.engine.containers.get(request.match_info["id"])
        condition = request.query.get("condition", "not-running")
        waiter = asyncio.ensure_future(self.engine.wait(c.id, condition))
        # Docker sends the status line at once so the client knows the wait is registered.
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        code = await waiter
        await resp.write(json.dumps({"StatusCode": code, "Error": None}).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def container_delete(self, request: web.Request) -> web.Response:
        await self.engine.remove(request.match_info["id"], force=_flag(request, "force"))
        return web.Response(status=204)

    async def container_list(self, request: web.Request) -> web.Response:
        show_all = _flag(request, "all")
        out = [
            self.container_summary(c)
            for c in self.engine.containers.all()
            if show_all or c.state.running
        ]
        return web.json_response(out)

    async def container_inspect_handler(self, request: web.Request) -> web.Response:
        c = self.engine.containers.get(request.match_info["id"])
        return web.json_response(self.container_inspect(c))

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        c = self.engine.containers.get(request.match_info["id"])
        want = {s for s in ("stdout", "stderr") if _flag(request, s)}
        if not want:
            raise InvalidParameter("Bad parameters: you must choose at least one stream")
        tail_q = request.query.get("tail", "all")
        tail = None if tail_q in ("all", "") else int(tail_q)
        timestamps = _flag(request, "timestamps")
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "application/vnd.docker.multiplexed-stream"}
        )
        await resp.prepare(request)
        async for stream, ts, text in self.engine.logs(c.id, _flag(request, "follow"), tail):
            if stream not in want:
                continue
            payload = (f"{ts} {text}" if timestamps else text).encode()
            await resp.write(struct.pack(">BxxxL", STREAM_IDS[stream], len(payload)) + payload)
        await resp.write_eof()
        return resp

    # ---- images ----------------------------------------------------------------------------

    async def image_list(self, request: web.Request) -> web.Response:
        out = []
        for img in self.engine.images.list():
            out.append(
                {
                    "Id": img.id,
                    "ParentId": "",
                    "RepoTags": [familiar(t) for t in img.repo_tags],
                    "RepoDigests": [],
                    "Created": _unix_seconds(img.created),
                    "Size": img.size,
                    "SharedSize": -1,
                    "VirtualSize": img.size,
                    "Labels": None,
                    "Containers": -1,
                }
            )
        return web.json_response(out)

    async def image_inspect(self, request: web.Request) -> web.Response:
        img = self.engine.images.get(request.match_info["name"])
        return web.json_response(
            {
                "Id": img.id,
                "RepoTags": [familiar(t) for t in img.repo_tags],
                "RepoDigests": [],
                "Created": img.created,
                "Size": img.size,
                "Architecture": img.config.get("architecture"),
                "Os": img.config.get("os"),
                "Config": img.config.get("config") or {},
                "RootFS": {"Type": "layers", "Layers": img.diff_ids},
            }
        )

    async def image_load(self, request: web.Request) -> web.StreamResponse:
        with tempfile.TemporaryFile(dir=self.engine.cfg.data_root) as f:
            async for chunk in request.content.iter_chunked(1 << 20):
                f.write(chunk)
            f.seek(0)
            refs = await asyncio.to_thread(self.engine.images.load, f)
        lines = [json.dumps({"stream": f"Loaded image: {r}\n"}) for r in refs]
        return web.Response(text="\n".join(lines) + "\n", content_type="application/json")

    # ---- wiring ----------------------------------------------------------------------------

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/_ping", self.ping),
            ("HEAD", "/_ping", self.ping),
            ("GET", "/version", self.version),
            ("POST", "/containers/create", self.container_create),
            ("GET", "/containers/json", self.container_list),
            ("GET", "/containers/{id}/json", self.container_inspect_handler),
            ("POST", "/containers/{id}/start", self.container_start),
            ("POST", "/containers/{id}/stop", self.container_stop),
            ("POST", "/containers/{id}/kill", self.container_kill),
            ("POST", "/containers/{id}/wait", self.container_wait),
            ("GET", "/containers/{id}/logs", self.container_logs),
            ("DELETE", "/containers/{id}", self.container_delete),
            ("GET", "/images/json", self.image_list),
            ("POST", "/images/load", self.image_load),
            ("GET", "/images/{name:.+}/json", self.image_inspect),
        ]


def make_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=0)
    api = Api(engine)
    for method, path, handler in api.routes():
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/v{version:[0-9]+[.][0-9]+}" + path, handler)
    return app


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _ago(rfc3339: str, suffix: bool = True) -> str:
    """Docker's human durations: 'Less than a second', '5 seconds', 'About a minute', '3 hours'."""
    try:
        then = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    except ValueError:
        return ""
    seconds = (datetime.now(then.tzinfo) - then).total_seconds()
    if seconds < 1:
        text = "Less than a second"
    elif seconds < 60:
        text = f"{int(seconds)} seconds"
    elif seconds < 120:
        text = "About a minute"
    elif seconds < 3600:
        text = f"{int(seconds // 60)} minutes"
    elif seconds < 7200:
        text = "About an hour"
    elif seconds < 48 * 3600:
        text = f"{int(seconds // 3600)} hours"
    else:
        text = f"{int(seconds // 86400)} days"
    return f"{text} ago" if suffix else text

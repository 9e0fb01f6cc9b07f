"""``/containers``: Docker's container calls (v1.41 shapes) translated to the engine.

What the docker CLI sends (traced against dockerd 20.10): ``run -d`` is
create → ``wait?condition=next-exit`` → start; ``run`` in the foreground attaches first (a
hijacked connection); ``--rm`` sets ``HostConfig.AutoRemove`` and waits with
``condition=removed``. A create that asks for something pyengined cannot do is refused with 501
(a feature it lacks) or 400 (what Docker itself refuses on the default network), never run
without it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web

from common.ports import PortKey
from common.timefmt import unix_seconds
from engine.api.common import (
    MEDIA_MULTIPLEXED_STREAM,
    BadParameter,
    HijackedResponse,
    NotImplementedByEngine,
    flag,
    float_query,
    int_query,
    json_body,
    json_response,
    log,
    parse_filters,
    stream_frame,
)
from engine.api.containerfilters import CONTAINER_FILTERS, container_filter
from engine.api.create import parse_create_body
from engine.api.networks import NetworksApi
from engine.api.stateview import health_suffix, state_json
from engine.api.version import API_VERSION, V1_44, V1_46, ApiVersion, api_version
from engine.images.store import ImageNotFound
from engine.lifecycle.containers import Container
from engine.lifecycle.engine import (
    DaemonShuttingDown,
    Engine,
    InvalidParameter,
    LogEntry,
    exposed_ports,
)
from engine.lifecycle.netmodes import create_warnings
from engine.lifecycle.networking import DEFAULT_NETWORK

DISCONNECT_POLL_INTERVAL = 1.0
T = TypeVar("T")


def _command_text(args: list[str]) -> str:
    """Docker's ``Command`` column: arguments with a space are single-quoted."""
    if not args:
        return ""
    rest = [f"'{a}'" if " " in a else a for a in args[1:]]
    return " ".join([args[0], *rest])


def _tree_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _ago(seconds: float) -> str:
    """Docker's go-units HumanDuration: '5 seconds', 'About a minute', '3 hours'."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 2:
        return "1 second"
    if seconds < 60:
        return f"{int(seconds)} seconds"
    minutes = int(seconds // 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds // 3600) // 24 // 365} years"


class ContainersApi:
    def __init__(self, engine: Engine, networks: NetworksApi) -> None:
        self.engine = engine
        self.networks = networks

    # ---- shapes --------------------------------------------------------------------------

    def _image_config(self, c: Container) -> dict[str, Any]:
        try:
            return self.engine.images.get(c.image_id).config.get("config") or {}
        except ImageNotFound:
            return {}

    def ports_map(self, c: Container) -> dict[str, list[dict[str, str]] | None]:
        """``NetworkSettings.Ports``: published ports with their bindings (HostPort a string),
        exposed ones with ``null``; empty while the container is not running, as in Docker."""
        if not c.state.running:
            return {}
        ports: dict[str, list[dict[str, str]] | None] = {
            str(k): None for k in exposed_ports(c, self._image_config(c))
        }
        for p in c.network.ports:
            key = str(p.key)
            ports[key] = [
                *(ports.get(key) or []),
                # Routed: no host port, Docker shows "" (docs: "Gateway modes").
                {"HostIp": p.host_ip, "HostPort": str(p.host_port) if p.host_port else ""},
            ]
        return ports

    def _ports_list(self, c: Container) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for text, bindings in self.ports_map(c).items():
            key = PortKey.parse(text)
            if not bindings:
                out.append({"PrivatePort": key.port, "Type": key.proto})
            for b in bindings or []:
                if not b["HostPort"]:
                    out.append({"IP": b["HostIp"], "PrivatePort": key.port, "Type": key.proto})
                    continue
                out.append(
                    {
                        "IP": b["HostIp"],
                        "PrivatePort": key.port,
                        "PublicPort": int(b["HostPort"]),
                        "Type": key.proto,
                    }
                )
        return out

    def _status_text(self, c: Container) -> str:
        s = c.state
        now = time.time()
        if s.status == "running":
            return f"Up {_ago(now - unix_seconds(s.started_at))}{health_suffix(s.health)}"
        if s.restarting:
            return f"Restarting ({s.exit_code}) {_ago(now - unix_seconds(s.finished_at))} ago"
        if s.status == "exited":
            return f"Exited ({s.exit_code}) {_ago(now - unix_seconds(s.finished_at))} ago"
        if s.status == "removing":
            return "Removal In Progress"
        return "Created"

    def summary(
        self, c: Container, size: bool = False, version: ApiVersion = API_VERSION
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Id": c.id,
            "Names": [f"/{c.name}"],
            "Image": c.image,
            "ImageID": c.image_id,
            "Command": _command_text(c.args),
            "Created": unix_seconds(c.created),
            "Ports": self._ports_list(c),
            "Labels": c.config.get("Labels") or {},
            "State": "restarting" if c.state.restarting else c.state.status,
            "Status": self._status_text(c),
            "HostConfig": {"NetworkMode": c.host_config.get("NetworkMode") or "default"},
            "NetworkSettings": {"Networks": self.networks.container_networks(c, version)},
            "Mounts": self.engine.mounts_json(c),
        }
        if version.at_least(V1_46) and c.host_config.get("Annotations"):
            out["HostConfig"]["Annotations"] = c.host_config["Annotations"]
        if size:
            upper = self.engine.containers.dir(c) / "overlay" / "upper"
            rw = _tree_size(str(upper))
            try:
                image_size = self.engine.images.get(c.image_id).size
            except ImageNotFound:
                image_size = 0
            out.update(SizeRw=rw, SizeRootFs=rw + image_size)
        return out

    def inspect(self, c: Container, version: ApiVersion = API_VERSION) -> dict[str, Any]:
        s = c.state
        n = c.network
        networks = self.networks.container_networks(c, version)
        default = networks.get(DEFAULT_NETWORK) or {}
        cdir = self.engine.containers.dir(c)
        files = self.engine.network_files_dir(c)
        host_config = {
            "Binds": None,
            "ContainerIDFile": "",
            "LogConfig": {
                "Type": "json-file",
                "Config": dict((c.host_config.get("LogConfig") or {}).get("Config") or {}),
            },
            "NetworkMode": "default",
            "PortBindings": {},
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "AutoRemove": False,
            "VolumeDriver": "",
            "VolumesFrom": None,
            "CapAdd": None,
            "CapDrop": None,
            "Dns": [],
            "DnsOptions": [],
            "DnsSearch": [],
            "ExtraHosts": None,
            "Privileged": False,
            "PublishAllPorts": False,
            "ReadonlyRootfs": False,
            **{k: v for k, v in c.host_config.items() if v is not None},
        }
        config = {
            "Hostname": c.config.get("Hostname", ""),
            "Domainname": c.config.get("Domainname", ""),
            "User": c.config.get("User", ""),
            "AttachStdin": bool(c.config.get("AttachStdin")),
            "AttachStdout": bool(c.config.get("AttachStdout")),
            "AttachStderr": bool(c.config.get("AttachStderr")),
            "ExposedPorts": {str(k): {} for k in exposed_ports(c, self._image_config(c))} or None,
            "Tty": bool(c.config.get("Tty")),
            "OpenStdin": bool(c.config.get("OpenStdin")),
            "StdinOnce": bool(c.config.get("StdinOnce")),
            "Env": c.config.get("Env") or [],
            "Cmd": c.config.get("Cmd"),
            "Image": c.image,
            "Volumes": c.config.get("Volumes") or None,
            "WorkingDir": c.config.get("WorkingDir", ""),
            "Entrypoint": c.config.get("Entrypoint"),
            "OnBuild": None,
            "Labels": c.config.get("Labels") or {},
            "StopSignal": c.config.get("StopSignal"),
            **({"Healthcheck": c.config["Healthcheck"]} if c.config.get("Healthcheck") else {}),
        }
        if c.config.get("StopTimeout") is not None:
            config["StopTimeout"] = c.config["StopTimeout"]
        attachments = self.engine.attachments(c)  # none in container: mode
        if version.below(V1_44) and attachments and attachments[0].mac:
            config["MacAddress"] = attachments[0].mac  # Config.MacAddress: the first network's
        return {
            "Id": c.id,
            "Created": c.created,
            "Path": c.args[0] if c.args else "",
            "Args": c.args[1:],
            "State": {
                **state_json(s),
                "Paused": False,
                "OOMKilled": s.oom_killed,
                "Dead": False,
                "Pid": s.pid,
                "ExitCode": s.exit_code,
                "Error": s.error,
                "StartedAt": s.started_at,
                "FinishedAt": s.finished_at,
                **({"Health": s.health} if s.health else {}),
            },
            "Image": c.image_id,
            "ResolvConfPath": str(files / "resolv.conf"),
            "HostnamePath": str(files / "hostname"),
            "HostsPath": str(files / "hosts"),
            "LogPath": str(self.engine.log_path(c)),
            "Name": f"/{c.name}",
            "RestartCount": s.restart_count,
            "Driver": "overlay2",
            "Platform": "linux",
            "MountLabel": "",
            "ProcessLabel": "",
            "AppArmorProfile": "",
            "ExecIDs": None,
            "HostConfig": host_config,
            "GraphDriver": {
                "Name": "overlay2",
                "Data": {
                    "UpperDir": str(cdir / "overlay" / "upper"),
                    "WorkDir": str(cdir / "overlay" / "work"),
                    "MergedDir": str(cdir / "bundle" / "rootfs"),
                },
            },
            "Mounts": self.engine.mounts_json(c),
            "Config": config,
            "NetworkSettings": {
                "Bridge": "",
                "SandboxID": c.id if c.state.running else "",
                "HairpinMode": False,
                "LinkLocalIPv6Address": "",
                "LinkLocalIPv6PrefixLen": 0,
                "Ports": self.ports_map(c),
                "SandboxKey": n.netns_path if c.state.running else "",
                "SecondaryIPAddresses": None,
                "SecondaryIPv6Addresses": None,
                # Docker fills these from the default network's endpoint only.
                "EndpointID": default.get("EndpointID", ""),
                "Gateway": default.get("Gateway", ""),
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "IPAddress": default.get("IPAddress", ""),
                "IPPrefixLen": default.get("IPPrefixLen", 0),
                "IPv6Gateway": "",
                "MacAddress": default.get("MacAddress", ""),
                "Networks": networks,
            },
        }

    # ---- listing -------------------------------------------------------------------------

    async def list(self, request: web.Request) -> web.Response:
        filters = parse_filters(request, CONTAINER_FILTERS)
        limit = int_query(request, "limit", 0) or 0
        show_all = flag(request, "all") or limit > 0 or "status" in filters or "exited" in filters
        keep = container_filter(self.engine, filters, self._image_config)
        chosen = [
            c
            for c in self.engine.containers.all()
            if (show_all or state_json(c.state)["Running"]) and keep(c)
        ]
        if limit > 0:
            chosen = chosen[:limit]
        size = flag(request, "size")
        version = api_version(request)
        return json_response([self.summary(c, size, version) for c in chosen])

    async def inspect_handler(self, request: web.Request) -> web.Response:
        c = self.engine.containers.get(request.match_info["id"])
        out = self.inspect(c, api_version(request))
        if flag(request, "size"):
            out.update({k: v for k, v in self.summary(c, True).items() if k.startswith("Size")})
        return json_response(out)

    # ---- lifecycle -------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        create = parse_create_body(await json_body(request), api_version(request))
        platform = request.query.get("platform")
        if platform:
            self._check_platform(create.config.get("Image") or "", platform)
        name = request.query.get("name") or None
        args = (create.config, create.host_config, create.endpoints, create.port_bindings)
        c = await self.engine.create(name, *args, mounts=create.mounts)
        warnings = [*create.warnings, *create_warnings(create.host_config)]
        return json_response({"Id": c.id, "Warnings": warnings}, status=201)

    def _check_platform(self, image_ref: str, platform: str) -> None:
        os_name, _, arch = platform.partition("/")
        if not image_ref:
            return
        image = self.engine.images.get(image_ref)
        have = (image.config.get("os") or "linux", image.config.get("architecture") or "")
        if os_name != have[0] or (arch and arch.split("/")[0] != have[1]):
            raise BadParameter(
                f"image with reference {image_ref} was found but does not match the specified "
                f"platform: wanted {platform}, actual: {have[0]}/{have[1]}"
            )

    async def start(self, request: web.Request) -> web.Response:
        c = self.engine.containers.get(request.match_info["id"])
        if c.state.running:
            return web.Response(status=304)
        await self.engine.start(c.id)
        return web.Response(status=204)

    def _timeout(self, request: web.Request) -> float | None:
        return float_query(request, "t")

    async def stop(self, request: web.Request) -> web.Response:
        stopped = await self.engine.stop(request.match_info["id"], self._timeout(request))
        return web.Response(status=204 if stopped else 304)

    async def restart(self, request: web.Request) -> web.Response:
        await self.engine.restart(request.match_info["id"], self._timeout(request))
        return web.Response(status=204)

    async def kill(self, request: web.Request) -> web.Response:
        await self.engine.kill(request.match_info["id"], request.query.get("signal") or "SIGKILL")
        return web.Response(status=204)

    async def wait(self, request: web.Request) -> web.StreamResponse:
        condition = request.query.get("condition") or "not-running"
        result = await self.engine.wait(request.match_info["id"], condition)
        # The status line goes out at once: clients (docker run) start the container only
        # after it, and ``next-exit`` counts from here.
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            code = await until_disconnected(request, result())
        except DaemonShuttingDown:
            resp.force_close()  # the client sees the connection end without a status
            return resp
        if code is not None:
            try:
                await resp.write(f'{{"Error":null,"StatusCode":{code}}}\n'.encode())
                await resp.write_eof()
            except ConnectionError:
                pass  # the client left between the exit and this write (docker run -d does)
        return resp

    async def remove(self, request: web.Request) -> web.Response:
        if flag(request, "link"):
            raise NotImplementedByEngine("links are not supported by pyengined")
        force, volumes = flag(request, "force"), flag(request, "v")
        await self.engine.remove(request.match_info["id"], force=force, volumes=volumes)
        return web.Response(status=204)

    # ---- output ----------------------------------------------------------------------------

    def _streams(self, request: web.Request) -> set[str]:
        want = {s for s in ("stdout", "stderr") if flag(request, s)}
        if not want and not flag(request, "stdin"):
            raise InvalidParameter("Bad parameters: you must choose at least one stream")
        return want

    async def logs(self, request: web.Request) -> web.StreamResponse:
        c = self.engine.containers.get(request.match_info["id"])
        want = self._streams(request)
        tail_q = request.query.get("tail", "all")
        try:
            tail = None if tail_q in ("all", "") else max(int(tail_q), 0)
        except ValueError:
            raise BadParameter(f"invalid value for tail: {tail_q!r}") from None
        since = float_query(request, "since") or 0.0
        until = float_query(request, "until") or 0.0
        timestamps = flag(request, "timestamps")
        resp = web.StreamResponse(status=200, headers={"Content-Type": MEDIA_MULTIPLEXED_STREAM})
        await resp.prepare(request)
        entries = self.engine.logs(c.id, flag(request, "follow"), tail, since, until)
        await until_disconnected(request, _copy_frames(resp, entries, want, timestamps))
        return resp

    async def attach(self, request: web.Request) -> web.StreamResponse:
        """A hijacked connection carrying the container's output until its run ends.

        stdin is not forwarded: pyengined refuses ``OpenStdin`` containers at create, so a
        container's stdin is always empty.
        """
        c = self.engine.containers.get(request.match_info["id"])
        want = self._streams(request)
        replay, follow = flag(request, "logs"), flag(request, "stream")
        if not (replay or follow):
            raise BadParameter("Bad parameters: at least one of logs or stream must be set")
        entries = self.engine.attach(c.id, replay=replay, follow=follow)
        resp = HijackedResponse(upgrade="Upgrade" in request.headers)
        await resp.prepare(request)
        await until_disconnected(request, _copy_frames(resp, entries, want, timestamps=False))
        return resp

    # ---- wiring ----------------------------------------------------------------------------

    async def rename(self, request: web.Request) -> web.Response:
        name = request.query.get("name") or ""
        if not name:
            raise BadParameter("a new name is required (name)")
        await self.engine.rename(request.match_info["id"], name)
        return web.Response(status=204)

    def routes(self) -> builtins.list[tuple[str, str, Any]]:
        return [
            ("POST", "/containers/create", self.create),
            ("GET", "/containers/json", self.list),
            ("GET", "/containers/{id}/json", self.inspect_handler),
            ("POST", "/containers/{id}/start", self.start),
            ("POST", "/containers/{id}/stop", self.stop),
            ("POST", "/containers/{id}/restart", self.restart),
            ("POST", "/containers/{id}/kill", self.kill),
            ("POST", "/containers/{id}/wait", self.wait),
            ("POST", "/containers/{id}/attach", self.attach),
            ("GET", "/containers/{id}/logs", self.logs),
            ("POST", "/containers/{id}/rename", self.rename),
            ("DELETE", "/containers/{id}", self.remove),
        ]


async def until_disconnected(request: web.Request, work: Awaitable[T]) -> T | None:
    """Run ``work`` unless the client goes away first (then cancel it and return None).

    A follow or a wait may have nothing to send for hours; without this, a client that gave up
    would leave it running until the container ends.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_INTERVAL)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
    finally:
        if not task.done():
            task.cancel()


async def _copy_frames(
    resp: web.StreamResponse, entries: Any, want: set[str], timestamps: bool
) -> None:
    """Write log entries as multiplexed frames until they end or the client goes away."""
    try:
        async for entry in entries:
            if entry.stream not in want:
                continue
            await resp.write(_frame(entry, timestamps))
    except ConnectionError as e:
        # aiohttp raises ConnectionResetError ("Cannot write to closing transport") once the
        # client has gone; the stream simply ends.
        log.debug("stream to client ended: %s", e)
    finally:
        await entries.aclose()


def _frame(entry: LogEntry, timestamps: bool) -> bytes:
    text = f"{entry.time} {entry.text}" if timestamps else entry.text
    return stream_frame(entry.stream, text.encode())

"""``/images`` and ``/auth``: Docker's image calls (v1.41 shapes) over the ImageStore and the
registry client (engine/images/registry.py).

``POST /images/create?fromImage=&tag=`` is ``docker pull``: it streams Docker's progress objects
(newline-delimited JSON, HTTP 200 even when the pull fails; the failure is the last object,
``{"errorDetail": {"message": m}, "error": m}``). Credentials come from the ``X-Registry-Auth``
header (base64url of ``{"username", "password", "serveraddress"}``), as the docker CLI and
docker-py send them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import fnmatch
import tempfile
from typing import Any

from aiohttp import web

from common.reference import Reference, familiar, normalize
from common.timefmt import ZERO_TIME, unix_seconds
from engine.api.common import (
    BadParameter,
    JsonLinesResponse,
    NotImplementedByEngine,
    error_response,
    flag,
    json_body,
    json_response,
    log,
    parse_filters,
    parse_json,
)
from engine.api.version import API_VERSION, V1_43, V1_44, V1_45, ApiVersion, api_version
from engine.images import registry
from engine.images.store import Image
from engine.lifecycle.engine import Engine

IMAGE_FILTERS = {"reference", "dangling", "label", "before", "since"}


def human_size(size: float) -> str:
    """go-units HumanSize: decimal units, four significant digits ("2.772MB", "512B")."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{size:.4g}{units[i]}"


def progress_text(current: int, total: int) -> str:
    """Docker's ``progress`` string (jsonmessage.JSONProgress at a 200-column width)."""
    if current <= 0 and total <= 0:
        return ""
    if total <= 0:
        return f"{human_size(current):>8}"
    filled = min(int(current / total * 100) // 2, 50)
    bar = f"[{'=' * filled}>{' ' * (50 - filled)}] "
    numbers = (
        f"{human_size(current):>8}"
        if current > total
        else f"{human_size(current):>8}/{human_size(total)}"
    )
    return bar + numbers


def progress_message(event: registry.PullProgress) -> dict[str, Any]:
    """One PullProgress as Docker's JSON progress object."""
    message: dict[str, Any] = {"status": event.status}
    if event.id:
        message["id"] = event.id
    if event.status in ("Downloading", "Extracting"):
        message["progressDetail"] = {"current": event.current, "total": event.total}
        message["progress"] = progress_text(event.current, event.total)
    elif event.id and not event.status.startswith("Pulling from"):
        message["progressDetail"] = {}
    return message


def registry_auth(header: str | None) -> tuple[str, str] | None:
    """``X-Registry-Auth``: base64url (padded or not) JSON with username and password."""
    if not header:
        return None
    try:
        raw = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    except (binascii.Error, ValueError):
        raise BadParameter("invalid X-Registry-Auth header") from None
    data = parse_json(raw, "X-Registry-Auth header")
    if not isinstance(data, dict):
        return None
    username, password = data.get("username"), data.get("password")
    if isinstance(username, str) and username and isinstance(password, str):
        return username, password
    return None


def pull_error_status(error: Exception) -> int:
    """The status dockerd gives a pull that failed before any progress: 404 for an unknown
    manifest or repository, 500 for the rest (unauthorized included: a 401 would make the
    docker CLI ask for a login interactively)."""
    cause: BaseException | None = error
    while cause is not None:  # the registry client wraps a 404 in a friendlier message
        if getattr(cause, "status", None) == 404:
            return 404
        cause = cause.__cause__
    return 500


def login_error_status(error: Exception) -> int:
    status = getattr(error, "status", None)
    if status == 401 or "unauthorized" in str(error):
        return 401
    return 500


def tag_matches(tag: str, pattern: str) -> bool:
    """Docker's ``reference`` filter: a glob on ``name:tag`` or on ``name`` alone."""
    short = familiar(tag)
    name = short.split("@")[0].rpartition(":")[0] or short
    return fnmatch.fnmatchcase(short, pattern) or fnmatch.fnmatchcase(name, pattern)


class ImagesApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- shapes ----------------------------------------------------------------------------

    def summary(self, img: Image, version: ApiVersion = API_VERSION) -> dict[str, Any]:
        config = img.config.get("config") or {}
        out = {
            "Containers": -1,
            "Created": unix_seconds(img.created),
            "Id": img.id,
            "Labels": config.get("Labels"),
            "ParentId": "",
            "RepoDigests": [],
            "RepoTags": [familiar(t) for t in img.repo_tags],
            "SharedSize": -1,
            "Size": img.size,
            "VirtualSize": img.size,
        }
        if version.at_least(V1_44):
            del out["VirtualSize"]
        if version.below(V1_43) and not img.repo_tags:
            out.update(RepoTags=["<none>:<none>"], RepoDigests=["<none>@<none>"])
        return out

    def inspect(self, img: Image, version: ApiVersion = API_VERSION) -> dict[str, Any]:
        config = img.config.get("config") or {}
        out = {
            "Id": img.id,
            "RepoTags": [familiar(t) for t in img.repo_tags],
            "RepoDigests": [],
            "Parent": "",
            "Comment": img.config.get("comment", ""),
            "Created": img.created or ZERO_TIME,
            "Container": "",
            "ContainerConfig": {},
            "DockerVersion": img.config.get("docker_version", ""),
            "Author": img.config.get("author", ""),
            "Config": {"Labels": None, **config},
            "Architecture": img.config.get("architecture", ""),
            "Os": img.config.get("os", ""),
            "Size": img.size,
            "VirtualSize": img.size,
            "GraphDriver": {
                "Name": "overlay2",
                "Data": {
                    "LowerDir": ":".join(
                        str(p) for p in reversed(self.engine.images.layer_dirs(img))
                    )
                },
            },
            "RootFS": {"Type": "layers", "Layers": img.diff_ids},
            "Metadata": {"LastTagTime": ZERO_TIME},
        }
        if img.config.get("variant"):
            out["Variant"] = img.config["variant"]
        if version.at_least(V1_44):
            del out["VirtualSize"]
        if version.at_least(V1_45):
            del out["Container"], out["ContainerConfig"]
        return out

    # ---- reading ---------------------------------------------------------------------------

    def _keep(self, filters: dict[str, list[str]]) -> Any:
        before = [self.engine.images.get(v).created for v in filters.get("before", [])]
        since = [self.engine.images.get(v).created for v in filters.get("since", [])]

        def reference(img: Image, pattern: str) -> bool:
            return any(tag_matches(tag, pattern) for tag in img.repo_tags)

        def label(img: Image, value: str) -> bool:
            key, eq, want = value.partition("=")
            labels = (img.config.get("config") or {}).get("Labels") or {}
            return key in labels and (not eq or labels[key] == want)

        checks = {
            "reference": reference,
            "dangling": lambda img, v: (not img.repo_tags) == (v.lower() in ("1", "true")),
            "label": label,
            "before": lambda img, v: all(img.created < t for t in before),
            "since": lambda img, v: all(img.created > t for t in since),
        }
        return lambda img: all(
            any(checks[k](img, v) for v in vs) for k, vs in filters.items() if vs
        )

    async def list(self, request: web.Request) -> web.Response:
        filters = parse_filters(request, IMAGE_FILTERS)
        name = request.query.get("filter")  # API < 1.25 spelling of reference=
        if name:
            filters.setdefault("reference", []).append(name)
        keep = self._keep(filters)
        version = api_version(request)
        images = await asyncio.to_thread(self.engine.images.list)
        out = []
        for img in images:
            if not keep(img):
                continue
            summary = self.summary(img, version)
            if filters.get("reference"):  # as Docker: only the tags the filter matched
                summary["RepoTags"] = [
                    familiar(t)
                    for t in img.repo_tags
                    if any(tag_matches(t, p) for p in filters["reference"])
                ]
            out.append(summary)
        return json_response(out)

    async def inspect_handler(self, request: web.Request) -> web.Response:
        img = await asyncio.to_thread(self.engine.images.get, request.match_info["name"])
        return json_response(self.inspect(img, api_version(request)))

    # ---- changes ---------------------------------------------------------------------------

    async def load(self, request: web.Request) -> web.StreamResponse:
        with tempfile.TemporaryFile(dir=self.engine.cfg.data_root) as f:
            async for chunk in request.content.iter_chunked(1 << 20):
                f.write(chunk)
            f.seek(0)
            refs = await asyncio.to_thread(self.engine.images.load, f)
        resp = JsonLinesResponse()
        await resp.prepare(request)
        for ref in refs:
            line = (
                f"Loaded image ID: {ref}" if ref.startswith("sha256:") else f"Loaded image: {ref}"
            )
            await resp.send({"stream": line + "\n"})
            self._event("load", ref, ref)
        await resp.write_eof()
        return resp

    async def tag(self, request: web.Request) -> web.Response:
        repo = request.query.get("repo") or ""
        if not repo:
            raise BadParameter("repository name must have at least one component")
        tag = request.query.get("tag") or ""
        new_ref = f"{repo}:{tag}" if tag else repo
        if tag and Reference.parse(repo).tag is not None:
            raise BadParameter(f"refusing to create an ambiguous tag: {repo} already has a tag")
        await asyncio.to_thread(self.engine.images.tag, request.match_info["name"], new_ref)
        with contextlib.suppress(Exception):
            image_id = self.engine.images.get(new_ref).id
            self._event("tag", image_id, familiar(normalize(new_ref)))
        return web.Response(status=201)

    async def remove(self, request: web.Request) -> web.Response:
        lines = await self.engine.remove_image(request.match_info["name"], flag(request, "force"))
        out = []
        for line in lines:
            kind, _, what = line.partition(": ")
            out.append({kind: what})
            if kind in ("Untagged", "Deleted"):
                self._event("untag" if kind == "Untagged" else "delete", what, what)
        return json_response(out)

    async def create(self, request: web.Request) -> web.StreamResponse:
        """``docker pull``: stream the registry client's progress as Docker's JSON objects."""
        if request.query.get("fromSrc"):
            raise NotImplementedByEngine("importing images (docker import) is not supported")
        from_image = request.query.get("fromImage") or ""
        if not from_image:
            raise BadParameter("fromImage is required")
        tag = request.query.get("tag") or ""
        ref = from_image
        if tag:
            ref += f"@{tag}" if tag.startswith("sha256:") else f":{tag}"
        try:
            parsed = Reference.parse(ref)
        except ValueError as e:
            raise BadParameter(str(e)) from None
        login = registry_auth(request.headers.get("X-Registry-Auth"))
        credentials = {parsed.domain: login} if login else None
        platform = request.query.get("platform") or "linux/amd64"

        resp = JsonLinesResponse()

        async def relay(event: registry.PullProgress) -> None:
            if not resp.prepared:
                await resp.prepare(request)
            await resp.send(progress_message(event))

        try:
            await registry.pull(
                ref,
                self.engine.images,
                credentials=credentials,
                progress=relay,
                platform=platform,
            )
        except ConnectionError as e:
            log.debug("pull of %s: the client went away: %s", ref, e)
            return resp
        except Exception as e:
            if not isinstance(e, (registry.RegistryError, ValueError)):
                log.exception("pull of %s failed", ref)
            message = " ".join(str(e).split()) or type(e).__name__
            if not resp.prepared:
                # As dockerd: a pull that fails before any progress is an HTTP error (the
                # docker CLI shows "Error response from daemon: ..."); later, the stream's last
                # object carries it.
                return error_response(pull_error_status(e), message)
            with contextlib.suppress(ConnectionError):
                await resp.send_error(message)
            return resp
        self._event("pull", parsed.familiar(), parsed.familiar())
        await resp.write_eof()
        return resp

    def _event(self, action: str, actor_id: str, name: str) -> None:
        self.engine.events.emit("image", action, actor_id, {"name": name})

    async def auth(self, request: web.Request) -> web.Response:
        """``docker login``: check the credentials against the registry; nothing is stored."""
        body = await json_body(request)
        username = body.get("username") or ""
        password = body.get("password") or ""
        server = body.get("serveraddress") or ""
        if not username or not isinstance(username, str) or not isinstance(password, str):
            raise BadParameter("username and password are required")
        try:
            status = await registry.login(server, username, password)
        except registry.RegistryError as e:
            return error_response(login_error_status(e), str(e))
        return json_response({"Status": status, "IdentityToken": ""})

    def routes(self) -> builtins.list[tuple[str, str, Any]]:
        return [
            ("GET", "/images/json", self.list),
            ("POST", "/images/load", self.load),
            ("POST", "/images/create", self.create),
            ("POST", "/auth", self.auth),
            ("GET", "/images/{name:.+}/json", self.inspect_handler),
            ("POST", "/images/{name:.+}/tag", self.tag),
            ("DELETE", "/images/{name:.+}", self.remove),
        ]

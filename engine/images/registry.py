"""Pulling images from registries that speak the OCI distribution API (``docker pull``).

Interface (engine/api/app.py's ``/images/create`` and ``/auth``, and ``pyengine pull``/``login``,
are written against exactly this)::

    @dataclass
    class PullProgress:
        id: str        # short layer id (12 hex of the blob digest); the tag for "Pulling from";
                       # "" for the closing "Digest: …" and "Status: …" lines
        status: str    # Docker's words: "Pulling from library/nginx", "Pulling fs layer",
                       # "Waiting", "Downloading", "Verifying Checksum", "Download complete",
                       # "Extracting", "Pull complete", "Already exists", "Digest: sha256:…",
                       # "Status: Downloaded newer image for nginx:latest" /
                       # "Status: Image is up to date for nginx:latest"
        current: int = 0   # bytes so far ("Downloading", "Extracting")
        total: int = 0     # bytes in all (0 when unknown)

    class RegistryError(Exception)   # one line: "manifest unknown: nginx:nosuch",
                                     # "unauthorized: authentication required",
                                     # 'Get "http://127.0.0.1:5999/v2/": connection refused', ...

    class CredentialStore(path)      # Docker's {"auths": {"host:port": {"auth": b64(user:pass)}}}
        .all() -> dict[str, tuple[str, str]]     # what pull(credentials=) takes
        .get(registry) -> tuple[str, str] | None
        .save(registry, username, password)       # the file is written with mode 0600
        .remove(registry) -> bool
    default_credentials_path() -> Path            # ~/.config/pyengine/auth.json

    async def pull(ref: str, store: ImageStore, *,
                   credentials: dict[str, tuple[str, str]] | None = None,
                   progress: Callable[[PullProgress], Awaitable[None] | None] | None = None,
                   insecure_registries: Collection[str] = {"localhost", "127.0.0.0/8"},
                   platform: str = "linux/amd64") -> Image
    async def login(registry: str, username: str, password: str, *,
                    insecure_registries: Collection[str] = ...) -> str   # "Login Succeeded"

How a pull goes:

1. ``nginx`` is ``docker.io/library/nginx:latest`` (common/reference.py); docker.io is served
   by ``registry-1.docker.io``. Insecure registries (loopback by default) get plain HTTP.
2. GET the manifest with the full Accept list (both OCI and both Docker types: distribution
   2.8 answers 404 for OCI content that is not accepted, and down-converts to schema 1 when
   nothing is). An index or manifest list is resolved to ``platform``, skipping
   ``unknown/unknown`` attestation entries (buildkit ``docs/attestations``).
3. Every manifest and blob is checked against the digest it was fetched by (and the
   ``Docker-Content-Digest`` header for a tag) and the size its descriptor gives.
4. Layers whose diff_id the store already has are not downloaded ("Already exists"); the
   others download concurrently (three at a time, Docker's default) into the store's
   download directory, and ``ImageStore.add_pulled`` verifies and commits the image at once:
   a failure anywhere leaves no image, blob or layer behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from common.credentials import (
    CredentialsError,
    CredentialStore,
    credentials_for,
    default_credentials_path,
    registry_key,
)
from common.reference import Reference
from engine.images.oci import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
)
from engine.images.registry_client import (
    DEFAULT_INSECURE_REGISTRIES,
    USER_AGENT,
    RegistryClient,
    RegistryError,
    RegistryHTTPError,
    registry_base_url,
    registry_host,
)
from engine.images.store import Image, ImageLoadError, ImageNotFound, ImageStore

__all__ = [
    "DEFAULT_INSECURE_REGISTRIES",
    "MANIFEST_ACCEPT",
    "CredentialStore",
    "CredentialsError",
    "Platform",
    "PullProgress",
    "RegistryError",
    "default_credentials_path",
    "login",
    "pull",
    "registry_base_url",
    "registry_host",
    "registry_key",
    "select_manifest",
]

MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
CONFIG_TYPES = (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG)
MANIFEST_ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST,
                             MEDIA_DOCKER_MANIFEST))  # fmt: skip
MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit
MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_DEPTH = 4
DOWNLOAD_CONCURRENCY = 3  # dockerd's --max-concurrent-downloads default
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
_CHUNK = 1 << 16
_PROGRESS_STEP = 512 * 1024
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30, sock_read=120)

ProgressCallback = Callable[["PullProgress"], Awaitable[None] | None]


@dataclass
class PullProgress:
    id: str
    status: str
    current: int = 0
    total: int = 0


# --- platforms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, with Go's names (image-spec ``image-index.md``)."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RegistryError(f"invalid platform {text!r}: want os/arch[/variant]")
        return cls(parts[0], parts[1], _normal_variant(parts[1], parts[2:] and parts[2] or None))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _normal_variant(architecture: str, variant: str | None) -> str | None:
    # containerd's platforms.Normalize: arm64 is v8 unless told otherwise, arm is v7.
    if architecture == "arm64" and variant in (None, "8", "v8"):
        return "v8"
    if architecture == "arm" and variant is None:
        return "v7"
    if variant is not None and variant.isdigit():
        return f"v{variant}"
    return variant


def _is_attestation(descriptor: dict[str, Any]) -> bool:
    platform = descriptor.get("platform") or {}
    annotations = descriptor.get("annotations") or {}
    return (platform.get("os"), platform.get("architecture")) == ("unknown", "unknown") or (
        annotations.get(ATTESTATION_ANNOTATION) == "attestation-manifest"
    )


def select_manifest(index: dict[str, Any], platform: Platform) -> dict[str, Any]:
    """The descriptor in an image index / manifest list that serves ``platform``."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError("image index has no manifests list")
    candidates = []
    for entry in entries:
        if not isinstance(entry, dict) or _is_attestation(entry):
            continue
        plat = entry.get("platform") or {}
        if plat.get("os") != platform.os or plat.get("architecture") != platform.architecture:
            continue
        variant = _normal_variant(platform.architecture, plat.get("variant") or None)
        if platform.variant is not None and variant != platform.variant:
            continue
        candidates.append((variant or "", entry))
    if not candidates:
        raise RegistryError(f"no matching manifest for {platform} in the manifest list entries")
    # Without a wanted variant (amd64), the plain entry comes before v2/v3 ones.
    candidates.sort(key=lambda pair: pair[0])
    return candidates[0][1]


# --- helpers -------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _checked_digest(descriptor: Any, what: str) -> str:
    digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise RegistryError(f"{what}: unsupported or malformed digest {digest!r}")
    return digest


def _descriptor_size(descriptor: dict[str, Any]) -> int | None:
    size = descriptor.get("size")
    return size if isinstance(size, int) and size >= 0 else None


def _media_type(content_type: str, body: dict[str, Any]) -> str:
    """What a manifest is: the Content-Type, else its mediaType field, else its shape."""
    declared = content_type.split(";")[0].strip().lower()
    if declared in INDEX_TYPES + MANIFEST_TYPES + MEDIA_DOCKER_SCHEMA1:
        return declared
    field = body.get("mediaType")
    if isinstance(field, str) and field:
        return field
    # umoci writes OCI manifests without a mediaType field (image-spec makes it optional).
    if "manifests" in body:
        return MEDIA_OCI_INDEX
    if "layers" in body:
        return MEDIA_OCI_MANIFEST
    return declared


class _Emitter:
    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback

    async def __call__(self, event: PullProgress) -> None:
        if self._callback is None:
            return
        result = self._callback(event)
        if inspect.isawaitable(result):
            await result


@dataclass
class _Layer:
    index: int
    descriptor: dict[str, Any]
    digest: str
    diff_id: str
    size: int | None

    @property
    def short_id(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


# --- one pull ------------------------------------------------------------------------------------


class _Pull:
    def __init__(
        self, client: RegistryClient, ref: Reference, store: ImageStore, emit: _Emitter
    ) -> None:
        self.client = client
        self.ref = ref
        self.store = store
        self.emit = emit
        self.scope = f"repository:{ref.path}:pull"

    async def fetch_manifest(
        self, reference: str, expected: str | None, size: int | None
    ) -> tuple[bytes, str, dict[str, Any], str]:
        """(bytes, media type, parsed JSON, digest) of one manifest, verified."""
        path = f"/v2/{self.ref.path}/manifests/{reference}"
        try:
            async with self.client.get(
                path, scope=self.scope, headers={"Accept": MANIFEST_ACCEPT}
            ) as response:
                length = response.content_length
                if length is not None and length > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"manifest {reference}: {length} bytes is too large")
                body = await response.content.read(MAX_MANIFEST_BYTES + 1)
                content_type = response.headers.get("Content-Type", "")
                header_digest = response.headers.get("Docker-Content-Digest", "")
        except RegistryHTTPError as e:
            if e.status == 404 and e.code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", ""):
                raise RegistryError(f"manifest unknown: {self.ref.familiar()}") from e
            raise
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"manifest {reference}: more than {MAX_MANIFEST_BYTES} bytes")
        actual = _sha256(body)
        if expected is not None and actual != expected:
            raise RegistryError(f"manifest {expected}: digest mismatch (content is {actual})")
        if expected is None and _DIGEST_RE.fullmatch(header_digest) and header_digest != actual:
            raise RegistryError(
                f"manifest {self.ref.familiar()}: digest mismatch (registry says {header_digest},"
                f" content is {actual})"
            )
        if size is not None and len(body) != size:
            raise RegistryError(f"manifest {actual}: {len(body)} bytes, descriptor says {size}")
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryError(f"manifest {actual}: not valid JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise RegistryError(f"manifest {actual}: not a JSON object")
        media_type = _media_type(content_type, parsed)
        if media_type in MEDIA_DOCKER_SCHEMA1:
            raise RegistryError(f"manifest {actual}: Docker schema 1 manifests are not supported")
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            raise RegistryError(f"manifest {actual}: unsupported media type {media_type!r}")
        return body, media_type, parsed, actual

    async def resolve(self, platform: Platform) -> tuple[str, bytes, dict[str, Any]]:
        """(the digest the reference names, the platform manifest's bytes and JSON)."""
        reference = self.ref.digest or self.ref.tag or "latest"
        body, media_type, parsed, top_digest = await self.fetch_manifest(
            reference, self.ref.digest, None
        )
        for _ in range(MAX_INDEX_DEPTH):
            if media_type in MANIFEST_TYPES:
                return top_digest, body, parsed
            descriptor = select_manifest(parsed, platform)
            digest = _checked_digest(descriptor, "manifest list entry")
            body, media_type, parsed, _ = await self.fetch_manifest(
                digest, digest, _descriptor_size(descriptor)
            )
        raise RegistryError(f"manifest {top_digest}: image indexes nested too deep")

    async def fetch_config(self, descriptor: dict[str, Any]) -> bytes:
        digest = _checked_digest(descriptor, "config")
        size = _descriptor_size(descriptor)
        if size is not None and size > MAX_CONFIG_BYTES:
            raise RegistryError(f"config {digest}: {size} bytes is too large")
        async with self.client.get(f"/v2/{self.ref.path}/blobs/{digest}", scope=self.scope) as r:
            data = await r.content.read(MAX_CONFIG_BYTES + 1)
        if size is not None and len(data) != size:
            raise RegistryError(f"config {digest}: {len(data)} bytes, descriptor says {size}")
        actual = _sha256(data)
        if actual != digest:
            raise RegistryError(f"config {digest}: digest mismatch (content is {actual})")
        return data

    async def download(self, layer: _Layer, dest: Path, slots: asyncio.Semaphore) -> None:
        if slots.locked():
            await self.emit(PullProgress(layer.short_id, "Waiting"))
        async with slots:
            await self._download(layer, dest)

    async def _download(self, layer: _Layer, dest: Path) -> None:
        hasher = hashlib.sha256()
        received = reported = 0
        total = layer.size or 0
        path = f"/v2/{self.ref.path}/blobs/{layer.digest}"
        async with self.client.get(path, scope=self.scope) as response:
            with open(dest, "wb") as out:
                async for chunk in response.content.iter_chunked(_CHUNK):
                    received += len(chunk)
                    if layer.size is not None and received > layer.size:
                        raise RegistryError(
                            f"layer {layer.digest}: more than the {layer.size} bytes"
                            " its descriptor says"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                    if received - reported >= max(_PROGRESS_STEP, total // 50):
                        reported = received
                        await self.emit(
                            PullProgress(layer.short_id, "Downloading", received, total)
                        )
        if received != reported:
            await self.emit(PullProgress(layer.short_id, "Downloading", received, total))
        await self.emit(PullProgress(layer.short_id, "Verifying Checksum"))
        if layer.size is not None and received != layer.size:
            raise RegistryError(
                f"layer {layer.digest}: {received} bytes, descriptor says {layer.size}"
            )
        actual = "sha256:" + hasher.hexdigest()
        if actual != layer.digest:
            raise RegistryError(f"layer {layer.digest}: digest mismatch (content is {actual})")
        await self.emit(PullProgress(layer.short_id, "Download complete"))


def _layers(manifest: dict[str, Any], config: dict[str, Any]) -> list[_Layer]:
    descriptors = manifest.get("layers")
    rootfs = config.get("rootfs") if isinstance(config.get("rootfs"), dict) else {}
    diff_ids = rootfs.get("diff_ids") if rootfs else None
    if not isinstance(descriptors, list) or not isinstance(diff_ids, list):
        raise RegistryError("image manifest or config lists no layers")
    if len(descriptors) != len(diff_ids):
        raise RegistryError(
            f"manifest has {len(descriptors)} layers but the config has {len(diff_ids)} diff_ids"
        )
    layers = []
    for index, (descriptor, diff_id) in enumerate(zip(descriptors, diff_ids, strict=True)):
        digest = _checked_digest(descriptor, "layer")
        if not isinstance(diff_id, str) or not _DIGEST_RE.fullmatch(diff_id):
            raise RegistryError(f"image config: malformed diff_id {diff_id!r}")
        media_type = str(descriptor.get("mediaType") or "")
        if "zstd" in media_type:
            raise RegistryError(f"layer {digest}: zstd-compressed layers are not supported")
        if "foreign" in media_type or "nondistributable" in media_type:
            raise RegistryError(f"layer {digest}: foreign layers are not supported")
        layers.append(_Layer(index, descriptor, digest, diff_id, _descriptor_size(descriptor)))
    return layers


def _session() -> aiohttp.ClientSession:
    # auto_decompress off: a blob's bytes must reach the hash exactly as the registry sent them.
    return aiohttp.ClientSession(
        timeout=_TIMEOUT, auto_decompress=False, headers={"User-Agent": USER_AGENT}
    )


def _current_image_id(store: ImageStore, ref: str) -> str | None:
    try:
        return store.get(ref).id
    except ImageNotFound:
        return None


async def pull(
    ref: str,
    store: ImageStore,
    *,
    credentials: dict[str, tuple[str, str]] | None = None,
    progress: ProgressCallback | None = None,
    insecure_registries: Collection[str] = DEFAULT_INSECURE_REGISTRIES,
    platform: str = "linux/amd64",
) -> Image:
    """Pull ``ref`` into ``store`` and tag it (a digest reference stays untagged)."""
    try:
        parsed = Reference.parse(ref.strip()).with_default_tag()
    except ValueError as e:
        raise RegistryError(str(e)) from e
    wanted = Platform.parse(platform)
    emit = _Emitter(progress)
    tag_ref = None if parsed.digest else str(parsed)
    display = parsed.familiar()
    async with _session() as session:
        client = RegistryClient(
            session, parsed.domain, credentials_for(credentials, parsed.domain), insecure_registries
        )
        job = _Pull(client, parsed, store, emit)
        top_digest, manifest_bytes, manifest = await job.resolve(wanted)
        await emit(PullProgress(parsed.digest or parsed.tag or "", f"Pulling from {parsed.path}"))
        config_descriptor = manifest.get("config")
        if not isinstance(config_descriptor, dict):
            raise RegistryError(f"manifest {top_digest}: no config descriptor")
        config_type = str(config_descriptor.get("mediaType") or MEDIA_OCI_CONFIG)
        if config_type not in CONFIG_TYPES:
            raise RegistryError(f"{display} is not a container image (config is {config_type})")
        image_id = _checked_digest(config_descriptor, "config")
        before = await asyncio.to_thread(_current_image_id, store, tag_ref or image_id)
        if before == image_id:
            await emit(PullProgress("", f"Digest: {top_digest}"))
            await emit(PullProgress("", f"Status: Image is up to date for {display}"))
            return await asyncio.to_thread(store.get, image_id)
        config_bytes = await job.fetch_config(config_descriptor)
        try:
            config = json.loads(config_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryError(f"config {image_id}: not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise RegistryError(f"config {image_id}: not a JSON object")
        layers = _layers(manifest, config)
        image = await _fetch_and_commit(job, tag_ref, manifest_bytes, config_bytes, layers)
    await emit(PullProgress("", f"Digest: {top_digest}"))
    await emit(PullProgress("", f"Status: Downloaded newer image for {display}"))
    return image


async def _fetch_and_commit(
    job: _Pull,
    tag_ref: str | None,
    manifest_bytes: bytes,
    config_bytes: bytes,
    layers: list[_Layer],
) -> Image:
    store, emit = job.store, job.emit
    present = {d for d in {layer.diff_id for layer in layers} if store.has_layer(d)}
    wanted: dict[str, _Layer] = {}  # blob digest → first layer with it (downloaded once)
    for layer in layers:
        if layer.diff_id in present:
            await emit(PullProgress(layer.short_id, "Already exists"))
        elif layer.digest not in wanted:
            wanted[layer.digest] = layer
            await emit(PullProgress(layer.short_id, "Pulling fs layer"))
    with store.download_dir() as directory:
        blobs = {digest: directory / digest.removeprefix("sha256:") for digest in wanted}
        slots = asyncio.Semaphore(DOWNLOAD_CONCURRENCY)
        tasks = [
            asyncio.create_task(job.download(layer, blobs[digest], slots))
            for digest, layer in wanted.items()
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        layer_blobs: list[Path | None] = [
            None if layer.diff_id in present else blobs[layer.digest] for layer in layers
        ]
        return await _commit(job, tag_ref, manifest_bytes, config_bytes, layers, layer_blobs)


async def _commit(
    job: _Pull,
    tag_ref: str | None,
    manifest_bytes: bytes,
    config_bytes: bytes,
    layers: list[_Layer],
    layer_blobs: list[Path | None],
) -> Image:
    """ImageStore.add_pulled in a thread, turning its per-layer calls into progress events."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    reported: set[str] = set()

    def on_layer(index: int, stage: str) -> None:  # called from the worker thread
        loop.call_soon_threadsafe(events.put_nowait, (index, stage))

    async def relay() -> None:
        while (item := await events.get()) is not None:
            index, stage = item
            layer = layers[index]
            key = f"{layer.digest}/{stage}"
            if layer_blobs[index] is None or key in reported:
                continue  # "Already exists", or the second use of one blob
            reported.add(key)
            if stage == "extracting":
                size = layer.size or 0
                await job.emit(PullProgress(layer.short_id, "Extracting", 0, size))
            else:
                await job.emit(PullProgress(layer.short_id, "Pull complete"))

    relay_task = asyncio.create_task(relay())
    commit = asyncio.ensure_future(
        asyncio.to_thread(
            job.store.add_pulled, tag_ref, manifest_bytes, config_bytes, layer_blobs, on_layer
        )
    )
    try:
        # Shielded: the download directory must outlive the thread that reads from it.
        image = await asyncio.shield(commit)
    except asyncio.CancelledError:
        await asyncio.wait([commit])
        relay_task.cancel()
        raise
    except ImageLoadError as e:
        relay_task.cancel()
        raise RegistryError(str(e)) from e
    except BaseException:
        relay_task.cancel()
        raise
    # The thread's last events were queued before its result was delivered.
    events.put_nowait(None)
    await relay_task
    return image


async def login(
    registry: str,
    username: str,
    password: str,
    *,
    insecure_registries: Collection[str] = DEFAULT_INSECURE_REGISTRIES,
) -> str:
    """Check the credentials against ``/v2/`` (through the token server if there is one)."""
    domain = registry_key(registry)
    async with _session() as session:
        client = RegistryClient(session, domain, (username, password), insecure_registries)
        try:
            await client.ping()
        except RegistryHTTPError as e:
            if e.status == 401:
                raise RegistryError("unauthorized: incorrect username or password") from e
            raise
    return "Login Succeeded"

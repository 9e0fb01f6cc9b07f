"""Pulling images from registries: engine/images/registry.py against real registries on loopback.

Real set-ups (tests/registry_helpers.py): Debian's docker-registry (distribution 2.8) on
127.0.0.1 without auth, with htpasswd Basic auth, and with Bearer tokens from a token server
these tests run; images go in with skopeo and, for indexes and broken images, by hand over HTTP.
A small in-process registry (aiohttp, over TLS) stands in for Docker Hub: a resolver sends
``registry-1.docker.io`` and ``auth.docker.io`` to it, so the Hub's naming and token flow run
for real without leaving the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

import engine.images.registry as registry_module
from common.reference import Reference
from engine.images.registry import (
    DEFAULT_INSECURE_REGISTRIES,
    MANIFEST_ACCEPT,
    CredentialStore,
    Platform,
    PullProgress,
    RegistryError,
    login,
    pull,
    registry_base_url,
    registry_key,
    select_manifest,
)
from engine.images.registry_auth import parse_challenges
from engine.images.registry_client import is_insecure
from engine.images.store import ImageStore
from tests.conftest import free_port, require_tool
from tests.registry_helpers import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    PASSWORD,
    USER,
    BuiltImage,
    Registry,
    TokenServer,
    build_image,
    make_layer,
    push_image,
    push_index,
    sha256,
    skopeo_push,
    start_registry,
)

T = TypeVar("T")
BUSYBOX_CONFIG = "sha256:c7185d5ecea085ff034cea9f865d15e1183b75b9f8b646b02e469b2839abecb1"


def run_pull(ref: str, store: ImageStore, **kwargs: Any) -> tuple[Any, list[PullProgress]]:
    events: list[PullProgress] = []
    image = asyncio.run(pull(ref, store, progress=events.append, **kwargs))
    return image, events


def pull_error(ref: str, store: ImageStore, **kwargs: Any) -> str:
    with pytest.raises(RegistryError) as info:
        asyncio.run(pull(ref, store, **kwargs))
    message = str(info.value)
    assert "\n" not in message
    return message


def statuses(events: list[PullProgress], layer: str | None = None) -> list[str]:
    return [e.status for e in events if layer is None or e.id == layer]


def assert_store_empty(store: ImageStore) -> None:
    """No image, blob, layer, download or temporary left: a failed pull kept nothing."""
    assert store.list() == []
    assert list((store.root / "blobs" / "sha256").iterdir()) == []
    assert list((store.root / "layers").iterdir()) == []
    downloads = store.root / "downloads"
    assert not downloads.exists() or list(downloads.iterdir()) == []
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


# --- units: naming, endpoints, challenges, platforms, the credentials file ------------------------


def test_docker_hub_naming_and_endpoints() -> None:
    ref = Reference.parse("nginx").with_default_tag()
    assert (str(ref), ref.path) == ("docker.io/library/nginx:latest", "library/nginx")
    assert registry_base_url(ref.domain, DEFAULT_INSECURE_REGISTRIES) == (
        "https://registry-1.docker.io"
    )
    assert registry_base_url("127.0.0.1:5000", DEFAULT_INSECURE_REGISTRIES) == (
        "http://127.0.0.1:5000"
    )
    assert registry_base_url("127.9.8.7", DEFAULT_INSECURE_REGISTRIES) == "http://127.9.8.7"
    assert registry_base_url("localhost:5000", DEFAULT_INSECURE_REGISTRIES) == (
        "http://localhost:5000"
    )
    assert registry_base_url("quay.io", DEFAULT_INSECURE_REGISTRIES) == "https://quay.io"
    assert registry_base_url("[::1]:5000", DEFAULT_INSECURE_REGISTRIES) == "https://[::1]:5000"
    assert is_insecure("[::1]:5000", {"::1/128"})
    assert is_insecure("registry.test:5000", {"registry.test:5000"})
    assert not is_insecure("registry.test:5001", {"registry.test:5000"})
    assert not is_insecure("198.18.0.5:5000", DEFAULT_INSECURE_REGISTRIES)
    assert is_insecure("198.18.0.5:5000", {"198.18.0.0/15"})
    for name in ("", "docker.io", "index.docker.io", "registry-1.docker.io",
                 "https://index.docker.io/v1/"):  # fmt: skip
        assert registry_key(name) == "docker.io"
    assert registry_key("http://127.0.0.1:5000/") == "127.0.0.1:5000"


def test_www_authenticate_challenges() -> None:
    bearer = parse_challenges(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/nginx:pull,push",error="insufficient_scope"'
    )
    assert len(bearer) == 1 and bearer[0].scheme == "bearer"
    assert bearer[0].params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull,push",
        "error": "insufficient_scope",
    }
    two = parse_challenges('Basic realm="a \\"quoted\\" realm", Bearer realm=http://x/token')
    assert [(c.scheme, c.params["realm"]) for c in two] == [
        ("basic", 'a "quoted" realm'),
        ("bearer", "http://x/token"),
    ]


def test_platform_selection_skips_attestations() -> None:
    def entry(name: str, os_: str, arch: str, variant: str = "", **extra: Any) -> dict[str, Any]:
        platform = {"os": os_, "architecture": arch} | ({"variant": variant} if variant else {})
        return {"digest": name, "platform": platform, **extra}

    index = {
        "manifests": [
            entry("attest", "unknown", "unknown"),
            entry("arm7", "linux", "arm", "v7"),
            entry("arm64", "linux", "arm64", "v8"),
            entry("amd64v3", "linux", "amd64", "v3"),
            entry("amd64", "linux", "amd64"),
            entry("amd64-attest", "linux", "amd64",
                  annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        ]
    }  # fmt: skip
    assert select_manifest(index, Platform.parse("linux/amd64"))["digest"] == "amd64"
    assert select_manifest(index, Platform.parse("linux/arm64"))["digest"] == "arm64"
    assert select_manifest(index, Platform.parse("linux/arm/v7"))["digest"] == "arm7"
    assert select_manifest(index, Platform.parse("linux/amd64/v3"))["digest"] == "amd64v3"
    with pytest.raises(RegistryError, match=r"^no matching manifest for linux/s390x in the"):
        select_manifest(index, Platform.parse("linux/s390x"))
    only_attestation = {"manifests": [entry("attest", "unknown", "unknown")]}
    with pytest.raises(RegistryError, match="no matching manifest"):
        select_manifest(only_attestation, Platform.parse("linux/amd64"))
    with pytest.raises(RegistryError, match="invalid platform"):
        Platform.parse("amd64")


def test_credential_store_docker_shape_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "config" / "pyengine" / "auth.json"
    credentials = CredentialStore(path)
    assert credentials.all() == {}
    credentials.save("127.0.0.1:5000", "alice", "s3cret:with:colons")
    credentials.save("docker.io", "bob", "hunter2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = json.loads(path.read_text())
    assert data == {
        "auths": {
            "127.0.0.1:5000": {"auth": "YWxpY2U6czNjcmV0OndpdGg6Y29sb25z"},
            "https://index.docker.io/v1/": {"auth": "Ym9iOmh1bnRlcjI="},
        }
    }
    assert credentials.get("http://127.0.0.1:5000") == ("alice", "s3cret:with:colons")
    assert credentials.get("index.docker.io") == ("bob", "hunter2")
    # Other keys survive, a login is replaced, and a world-readable file is made 0600 again.
    data["credsStore"] = "none"
    path.write_text(json.dumps(data))
    os.chmod(path, 0o644)
    credentials.save("https://index.docker.io/v1/", "bob", "changed")
    assert json.loads(path.read_text())["credsStore"] == "none"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.all() == {
        "127.0.0.1:5000": ("alice", "s3cret:with:colons"),
        "docker.io": ("bob", "changed"),
    }
    assert credentials.remove("docker.io") is True
    assert credentials.remove("docker.io") is False
    assert list(credentials.all()) == ["127.0.0.1:5000"]


def test_download_dirs_left_by_a_killed_pull_are_removed(store: ImageStore) -> None:
    stale = store.root / "downloads" / "pull-killed"
    stale.mkdir(parents=True)
    (stale / "half-a-layer").write_bytes(b"x" * 100)
    with store.download_dir() as first:
        assert not stale.exists()
        (first / "blob").write_bytes(b"in use")
        with store.download_dir() as second:  # a concurrent pull must not lose its files
            assert (first / "blob").exists() and second.is_dir()
        assert not second.exists()
    assert list((store.root / "downloads").iterdir()) == []


# --- an in-process registry standing in for Docker Hub --------------------------------------------


@dataclass
class FakeHub:
    """Serves one repository over TLS with Docker Hub's Bearer flow and CDN redirects."""

    repo: str
    manifests: dict[str, tuple[str, bytes]]  # tag or digest → (media type, body)
    blobs: dict[str, bytes]
    concurrent_blobs: int = 0  # hold blob answers until this many are in flight at once
    lie_about_digest: bool = False
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    token_queries: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/", self.ping)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self.manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self.blob)
        app.router.add_get("/cdn/{digest}", self.cdn)
        app.router.add_get("/token", self.token)
        return app

    def _authorized(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.path, dict(request.headers)))
        if request.headers.get("Authorization") == f"Bearer token-for-{self.repo}":
            return None
        challenge = (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            f'scope="repository:{self.repo}:pull"'
        )
        body = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        return web.json_response(body, status=401, headers={"WWW-Authenticate": challenge})

    async def ping(self, request: web.Request) -> web.Response:
        return self._authorized(request) or web.json_response({})

    async def token(self, request: web.Request) -> web.Response:
        self.token_queries.append(dict(request.query))
        if request.query.get("scope") != f"repository:{self.repo}:pull":
            return web.json_response({"details": "bad scope"}, status=400)
        return web.json_response({"token": f"token-for-{self.repo}", "expires_in": 300})

    async def manifest(self, request: web.Request) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        if request.match_info["name"] != self.repo:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        found = self.manifests.get(request.match_info["ref"])
        if found is None:
            error = {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}
            return web.json_response({"errors": [error]}, status=404)
        media_type, body = found
        digest = sha256(b"something else" if self.lie_about_digest else body)
        return web.Response(
            body=body, headers={"Content-Type": media_type, "Docker-Content-Digest": digest}
        )

    async def blob(self, request: web.Request) -> web.StreamResponse:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        digest = request.match_info["digest"]
        if digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        # Docker Hub answers blob GETs with a redirect to its CDN (distribution-spec: MAY 307).
        raise web.HTTPTemporaryRedirect(f"/cdn/{digest}")

    async def cdn(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers)))
        data = self.blobs[request.match_info["digest"]]
        if self.concurrent_blobs and len(data) > 1000:  # the layers, not the config
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.in_flight >= self.concurrent_blobs:
                self._all_in.set()
            try:
                await asyncio.wait_for(self._all_in.wait(), timeout=30)
            except TimeoutError:
                return web.Response(status=503, text="layers were not fetched concurrently")
            finally:
                self.in_flight -= 1
        return web.Response(body=data, content_type="application/octet-stream")


class LoopbackResolver(aiohttp.abc.AbstractResolver):
    """Every name resolves to 127.0.0.1 and the fake's port: no traffic leaves the machine."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, Any]]:
        return [
            {"hostname": host, "host": "127.0.0.1", "port": self.port,
             "family": socket.AF_INET, "proto": 0, "flags": 0}
        ]  # fmt: skip

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require_tool("openssl")
    directory = tmp_path_factory.mktemp("pyetest-tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=registry-1.docker.io", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def hub_image() -> BuiltImage:
    return build_image(
        [{f"hub/layer{i}": os.urandom(4096)} for i in range(3)],
        architecture="amd64",
    )


def serve_hub(
    fake: FakeHub,
    tls: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    scenario: Callable[[], Awaitable[T]],
) -> T:
    """Run ``scenario()`` (a coroutine function) while the fake Hub serves over TLS."""

    async def main() -> Any:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]

        def session() -> aiohttp.ClientSession:
            # ssl=False: the fake's certificate is self-signed; the resolver pins 127.0.0.1.
            connector = aiohttp.TCPConnector(resolver=LoopbackResolver(port), ssl=False)
            return aiohttp.ClientSession(connector=connector, auto_decompress=False)

        monkeypatch.setattr(registry_module, "_session", session)
        try:
            return await scenario()
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def fake_hub_for(image: BuiltImage, **options: Any) -> FakeHub:
    blobs = {sha256(b): b for b in [*image.layers, image.config]}
    manifests = {
        "latest": (OCI_MANIFEST, image.manifest),
        image.digest: (OCI_MANIFEST, image.manifest),
    }
    return FakeHub("library/nginx", manifests, blobs, **options)


def test_docker_hub_flow_tls_bearer_and_cdn_redirect(
    store: ImageStore, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = hub_image()
    fake = fake_hub_for(image)
    events: list[PullProgress] = []
    pulled = serve_hub(
        fake, tls_files, monkeypatch, lambda: pull("nginx", store, progress=events.append)
    )
    assert pulled.repo_tags == ["docker.io/library/nginx:latest"]
    assert pulled.id == image.image_id
    assert store.get("nginx").id == image.image_id
    paths = [path for path, _ in fake.requests]
    assert paths[0] == "/v2/library/nginx/manifests/latest"
    assert f"/cdn/{sha256(image.layers[0])}" in paths
    # The full Accept list on every manifest request; the Hub's token service and scope.
    for path, headers in fake.requests:
        if "/manifests/" in path:
            assert headers["Accept"] == MANIFEST_ACCEPT
    for media_type in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, "manifest.v2+json"):
        assert media_type in MANIFEST_ACCEPT
    assert fake.token_queries == [
        {"service": "registry.docker.io", "scope": "repository:library/nginx:pull"}
    ]
    assert events[0] == PullProgress("latest", "Pulling from library/nginx")
    assert events[-2:] == [
        PullProgress("", f"Digest: {image.digest}"),
        PullProgress("", "Status: Downloaded newer image for nginx:latest"),
    ]


def test_layers_are_fetched_concurrently(
    store: ImageStore, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = hub_image()
    fake = fake_hub_for(image, concurrent_blobs=3)  # each answer waits for all three requests
    pulled = serve_hub(fake, tls_files, monkeypatch, lambda: pull("nginx:latest", store))
    assert pulled.id == image.image_id
    assert fake.max_in_flight == 3
    assert len(store.layer_dirs(pulled)) == 3


def test_manifest_digest_header_mismatch_keeps_nothing(
    store: ImageStore, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_hub_for(hub_image(), lie_about_digest=True)

    async def scenario() -> str:
        with pytest.raises(RegistryError) as info:
            await pull("nginx", store)
        return str(info.value)

    message = serve_hub(fake, tls_files, monkeypatch, scenario)
    assert message.startswith("manifest nginx:latest: digest mismatch")
    assert_store_empty(store)


# --- a real registry without auth -----------------------------------------------------------------


@dataclass
class Pushed:
    registry: Registry
    layered_one: BuiltImage
    layered_two: BuiltImage
    amd64: BuiltImage
    arm64: BuiltImage
    oci_index: bytes
    docker_list: bytes


def _platform(arch: str) -> dict[str, str]:
    return {"os": "linux", "architecture": arch} | ({"variant": "v8"} if arch == "arm64" else {})


@pytest.fixture(scope="module")
def plain_registry(
    tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path
) -> Iterator[Pushed]:
    registry = start_registry(tmp_path_factory.mktemp("pyetest-registry-plain"), "none")
    try:
        skopeo_push(busybox_archive, registry, "library/busybox:latest")
        skopeo_push(busybox_archive, registry, "library/busybox:v2s2", docker_format=True)
        base = {"base/os-release": b"pyetest base layer\n" * 100}
        one = build_image([base, {"app/one": b"one\n" * 500}])
        two = build_image([base, {"app/two": b"two\n" * 500}, {"app/extra": b"x" * 3000}])
        push_image(registry, "pyetest/layered", one, "one")
        push_image(registry, "pyetest/layered", two, "two")
        amd64 = build_image([{"arch": b"amd64\n"}], architecture="amd64")
        arm64 = build_image([{"arch": b"arm64\n"}], architecture="arm64")
        attestation = build_image([{"attestation.json": b"{}"}], architecture="unknown")
        docker_amd64 = build_image([{"arch": b"amd64\n"}], docker_types=True)
        docker_arm64 = build_image([{"arch": b"arm64\n"}], architecture="arm64", docker_types=True)
        for image in (amd64, arm64, attestation, docker_amd64, docker_arm64):
            push_image(registry, "pyetest/multi", image)
        unknown = {"os": "unknown", "architecture": "unknown"}
        attestation_entry = attestation.descriptor(unknown) | {
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"}
        }
        oci_index = push_index(
            registry,
            "pyetest/multi",
            "oci",
            [attestation_entry, arm64.descriptor(_platform("arm64")),
             amd64.descriptor(_platform("amd64"))],
        )  # fmt: skip
        docker_list = push_index(
            registry,
            "pyetest/multi",
            "docker",
            [docker_arm64.descriptor(_platform("arm64")),
             docker_amd64.descriptor(_platform("amd64"))],
            docker=True,
        )  # fmt: skip
        yield Pushed(registry, one, two, amd64, arm64, oci_index, docker_list)
    finally:
        registry.stop()


def test_pull_oci_image_from_real_registry(plain_registry: Pushed, store: ImageStore) -> None:
    host = plain_registry.registry.host
    image, events = run_pull(f"{host}/library/busybox", store)
    assert image.id == BUSYBOX_CONFIG
    assert image.repo_tags == [f"{host}/library/busybox:latest"]
    assert (store.layer_dirs(image)[0] / "bin" / "busybox").exists()
    layer_id = "94477e626439"
    assert statuses(events, layer_id)[:2] == ["Pulling fs layer", "Downloading"]
    assert statuses(events, layer_id)[-4:] == [
        "Verifying Checksum",
        "Download complete",
        "Extracting",
        "Pull complete",
    ]
    downloading = [e for e in events if e.status == "Downloading"]
    assert downloading[-1].current == downloading[-1].total == 1036227
    assert events[0] == PullProgress("latest", "Pulling from library/busybox")
    assert events[-1].status == f"Status: Downloaded newer image for {host}/library/busybox:latest"
    digest = events[-2].status.removeprefix("Digest: ")
    # Pulling again changes nothing; by digest it is the same image.
    again, events = run_pull(f"{host}/library/busybox:latest", store)
    assert again.id == image.id
    assert statuses(events) == [
        "Pulling from library/busybox",
        f"Digest: {digest}",
        f"Status: Image is up to date for {host}/library/busybox:latest",
    ]
    by_digest, _ = run_pull(f"{host}/library/busybox@{digest}", store)
    assert by_digest.id == image.id
    assert [i.id for i in store.list()] == [image.id]


def test_pull_docker_schema2_media_types(plain_registry: Pushed, store: ImageStore) -> None:
    host = plain_registry.registry.host
    image, _ = run_pull(f"{host}/library/busybox:v2s2", store)
    manifest = json.loads(_manifest_bytes(store, image.manifest_digest))
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert image.diff_ids == [
        "sha256:e0ab8421a9c49aa70ae8e65e6112fd6920ef5824880760e7ba82e539c89e8afe"
    ]
    assert (store.layer_dirs(image)[0] / "bin" / "busybox").exists()


def _manifest_bytes(store: ImageStore, digest: str) -> bytes:
    return (store.root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def test_shared_layers_are_downloaded_and_stored_once(
    plain_registry: Pushed, store: ImageStore
) -> None:
    host = plain_registry.registry.host
    one, _ = run_pull(f"{host}/pyetest/layered:one", store)
    two, events = run_pull(f"{host}/pyetest/layered:two", store)
    base_layer = sha256(plain_registry.layered_one.layers[0]).removeprefix("sha256:")[:12]
    assert statuses(events, base_layer) == ["Already exists"]
    pulled_layers = {e.id for e in events if e.status == "Pulling fs layer"}
    assert len(pulled_layers) == 2 and base_layer not in pulled_layers
    assert one.diff_ids[0] == two.diff_ids[0]
    assert len(list((store.root / "layers").iterdir())) == 4  # base + one + two + extra
    assert store.layer_dirs(one)[0] == store.layer_dirs(two)[0]
    assert (store.layer_dirs(two)[2] / "app" / "extra").read_bytes() == b"x" * 3000


@pytest.mark.parametrize("tag", ["oci", "docker"])
def test_index_selects_the_amd64_child(plain_registry: Pushed, store: ImageStore, tag: str) -> None:
    host = plain_registry.registry.host
    index = plain_registry.oci_index if tag == "oci" else plain_registry.docker_list
    image, events = run_pull(f"{host}/pyetest/multi:{tag}", store)
    assert image.config["architecture"] == "amd64"
    assert (store.layer_dirs(image)[0] / "arch").read_bytes() == b"amd64\n"
    assert PullProgress("", f"Digest: {sha256(index)}") in events
    arm, _ = run_pull(f"{host}/pyetest/multi:{tag}", store, platform="linux/arm64")
    assert arm.config["architecture"] == "arm64"
    assert (store.layer_dirs(arm)[0] / "arch").read_bytes() == b"arm64\n"
    assert store.get(f"{host}/pyetest/multi:{tag}").id == arm.id  # the tag moved


def test_no_platform_in_index_keeps_nothing(plain_registry: Pushed, store: ImageStore) -> None:
    host = plain_registry.registry.host
    message = pull_error(f"{host}/pyetest/multi:oci", store, platform="linux/s390x")
    assert message == "no matching manifest for linux/s390x in the manifest list entries"
    assert_store_empty(store)


def test_missing_tag_keeps_nothing(plain_registry: Pushed, store: ImageStore) -> None:
    host = plain_registry.registry.host
    message = pull_error(f"{host}/library/busybox:nosuch", store)
    assert message == f"manifest unknown: {host}/library/busybox:nosuch"
    assert_store_empty(store)


def test_registry_down_keeps_nothing(store: ImageStore) -> None:
    port = free_port()  # nothing listens there
    message = pull_error(f"127.0.0.1:{port}/library/busybox", store)
    url = f"http://127.0.0.1:{port}/v2/library/busybox/manifests/latest"
    assert message == f'Get "{url}": connection refused'
    assert_store_empty(store)


@pytest.mark.parametrize("broken", ["layer", "config"])
def test_wrong_blob_digest_keeps_nothing(
    plain_registry: Pushed, store: ImageStore, broken: str
) -> None:
    registry = plain_registry.registry
    image = build_image([{"ok": b"fine\n" * 300}, {f"corrupt-{broken}": os.urandom(2048)}])
    repo = f"pyetest/corrupt-{broken}"
    push_image(registry, repo, image, "latest")
    blob = image.layers[1] if broken == "layer" else image.config
    data_path = registry.blob_data_path(sha256(blob))
    data = bytearray(data_path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: the registry serves it as is
    data_path.write_bytes(bytes(data))
    message = pull_error(f"{registry.host}/{repo}", store)
    assert message.startswith(f"{broken} {sha256(blob)}: digest mismatch (content is sha256:")
    assert_store_empty(store)


def test_wrong_diff_id_keeps_nothing(plain_registry: Pushed, store: ImageStore) -> None:
    registry = plain_registry.registry
    lying = "sha256:" + "ab" * 32
    layers = [{"good": b"good\n"}, {"bad": b"bad\n"}]
    (_, good), (_, real) = (make_layer(files) for files in layers)
    image = build_image(layers, diff_ids=[good, lying])
    push_image(registry, "pyetest/lying", image, "latest")
    message = pull_error(f"{registry.host}/pyetest/lying", store)
    assert message.endswith(f"diff_id is {real}, config says {lying}")
    assert_store_empty(store)


# --- a real registry with htpasswd (Basic) auth ---------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(
    tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path
) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("pyetest-registry-basic"), "htpasswd")
    try:
        skopeo_push(busybox_archive, registry, "library/busybox:latest")
        yield registry
    finally:
        registry.stop()


def test_basic_auth_401_without_credentials_keeps_nothing(
    basic_registry: Registry, store: ImageStore
) -> None:
    message = pull_error(f"{basic_registry.host}/library/busybox", store)
    assert message == "unauthorized: authentication required"
    assert_store_empty(store)
    wrong = {basic_registry.host: (USER, "wrong")}
    message = pull_error(f"{basic_registry.host}/library/busybox", store, credentials=wrong)
    assert message == "unauthorized: authentication required"
    assert_store_empty(store)


def test_basic_auth_login_then_pull_with_stored_credentials(
    basic_registry: Registry, store: ImageStore, tmp_path: Path
) -> None:
    host = basic_registry.host
    assert asyncio.run(login(host, USER, PASSWORD)) == "Login Succeeded"
    with pytest.raises(RegistryError, match=r"^unauthorized: incorrect username or password$"):
        asyncio.run(login(host, USER, "wrong"))
    credentials = CredentialStore(tmp_path / "auth.json")
    credentials.save(f"http://{host}/", USER, PASSWORD)
    image, _ = run_pull(f"{host}/library/busybox", store, credentials=credentials.all())
    assert image.id == BUSYBOX_CONFIG


# --- a real registry with Bearer tokens from our token server -------------------------------------


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path
) -> Iterator[Registry]:
    registry = start_registry(tmp_path_factory.mktemp("pyetest-registry-token"), "token")
    try:
        skopeo_push(busybox_archive, registry, "library/busybox:latest")
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def token_server(token_registry: Registry) -> Iterator[TokenServer]:
    server = token_registry.token_server
    assert server is not None
    server.requests.clear()
    server.anonymous_pull = True
    yield server
    server.anonymous_pull = True


def test_token_auth_anonymous_pull(
    token_registry: Registry, token_server: TokenServer, store: ImageStore
) -> None:
    image, _ = run_pull(f"{token_registry.host}/library/busybox", store)
    assert image.id == BUSYBOX_CONFIG
    assert [(r.user, r.scopes) for r in token_server.requests] == [
        (None, ["repository:library/busybox:pull"])
    ]


def test_token_auth_denied_without_credentials_keeps_nothing(
    token_registry: Registry, token_server: TokenServer, store: ImageStore
) -> None:
    token_server.anonymous_pull = False
    message = pull_error(f"{token_registry.host}/library/busybox", store)
    assert message == "unauthorized: authentication required"
    assert_store_empty(store)


def test_token_auth_with_credentials(
    token_registry: Registry, token_server: TokenServer, store: ImageStore
) -> None:
    token_server.anonymous_pull = False
    host = token_registry.host
    credentials = {host: (USER, PASSWORD)}
    image, _ = run_pull(f"{host}/library/busybox", store, credentials=credentials)
    assert image.id == BUSYBOX_CONFIG
    assert {(r.account, r.user) for r in token_server.requests} == {(USER, USER)}
    assert asyncio.run(login(host, USER, PASSWORD)) == "Login Succeeded"
    with pytest.raises(RegistryError, match=r"^unauthorized: incorrect username or password$"):
        asyncio.run(login(host, USER, "wrong"))

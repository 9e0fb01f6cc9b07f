"""Real registries on loopback for the pull tests: Debian's docker-registry and a token server.

- ``start_registry(tmp, auth=...)`` runs ``docker-registry serve`` (distribution 2.8) with a
  config of ours (the package's own enables htpasswd with a directory path and fails), on
  127.0.0.1 and a free port, storage under ``tmp``: no auth, htpasswd (bcrypt, made with
  apache2-utils' ``htpasswd -B``), or Bearer tokens from a ``TokenServer``.
- ``TokenServer`` issues RS256 JWTs (distribution ``docs/spec/auth/jwt.md``) signed with the
  ``openssl`` CLI; the certificate rides in the ``x5c`` header and is the registry's
  ``rootcertbundle``. Anonymous callers get ``pull`` (unless ``anonymous_pull`` is off), Basic
  ``user:password`` callers get every action they ask for.
- ``skopeo_push`` copies an OCI archive in; ``push_image`` / ``push_index`` PUT hand-made
  images, OCI indexes and Docker manifest lists (skopeo 1.9 cannot create the last two).

Every process started here is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import secrets
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_tool

USER = "testuser"
PASSWORD = "testpass"
SERVICE = "pyengine-registry"
ISSUER = "pyengine-test-issuer"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- the token server -----------------------------------------------------------------------------


@dataclass
class TokenRequest:
    account: str | None
    user: str | None  # who authenticated with Basic, None when anonymous
    scopes: list[str]


@dataclass
class TokenServer:
    """A Docker-style token server (distribution ``docs/spec/auth/token.md``) in a thread."""

    directory: Path
    users: dict[str, str] = field(default_factory=lambda: {USER: PASSWORD})
    anonymous_pull: bool = True
    requests: list[TokenRequest] = field(default_factory=list)
    port: int = 0
    _server: http.server.ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key_path(self) -> Path:
        return self.directory / "token-key.pem"

    @property
    def cert_path(self) -> Path:
        return self.directory / "token-cert.pem"

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> None:
        openssl = require_tool("openssl")
        self.directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=pyengine-test-token-issuer", "-keyout", str(self.key_path),
             "-out", str(self.cert_path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        der = subprocess.run(
            [openssl, "x509", "-in", str(self.cert_path), "-outform", "DER"],
            check=True, capture_output=True, timeout=60,
        ).stdout  # fmt: skip
        self._x5c = base64.b64encode(der).decode("ascii")
        self._openssl = openssl
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        # RS256 is RSASSA-PKCS1-v1_5 over SHA-256 (RFC 7518 §3.3): what `openssl dgst -sign` does.
        signature = subprocess.run(
            [self._openssl, "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode(), check=True, capture_output=True, timeout=60,
        ).stdout  # fmt: skip
        return signing_input + "." + _b64url(signature)

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            if user is None:
                wanted = [a for a in wanted if a == "pull" and self.anonymous_pull]
            if kind and name and wanted:
                access.append({"type": kind, "name": name, "actions": wanted})
        return access

    def token_for(self, user: str | None, account: str | None, scopes: list[str]) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": self.grant(user, scopes),
        }
        with self._lock:
            self.requests.append(TokenRequest(account, user, scopes))
        return self.sign(claims)


def _token_handler(server: TokenServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self._answer(404, {"details": "not found"})
                return
            query = urllib.parse.parse_qs(url.query)
            user = None
            authorization = self.headers.get("Authorization", "")
            if authorization.startswith("Basic "):
                decoded = base64.b64decode(authorization[6:]).decode(errors="replace")
                name, _, password = decoded.partition(":")
                if server.users.get(name) != password:
                    self._answer(401, {"details": "incorrect username or password"})
                    return
                user = name
            scopes = [s for value in query.get("scope", []) for s in value.split()]
            token = server.token_for(user, (query.get("account") or [None])[0], scopes)
            self._answer(
                200,
                {
                    "token": token,
                    "access_token": token,
                    "expires_in": 300,
                    "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )

    return Handler


# --- docker-registry ------------------------------------------------------------------------------


@dataclass
class Registry:
    """One ``docker-registry serve`` process on 127.0.0.1."""

    host: str  # "127.0.0.1:PORT", the domain part of image references
    storage: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    auth: str  # "none", "htpasswd" or "token"
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (distribution's ``paths.go`` layout)."""
        hex_digest = digest.removeprefix("sha256:")
        return (
            self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()


def make_htpasswd(directory: Path, user: str = USER, password: str = PASSWORD) -> Path:
    """A bcrypt htpasswd file: distribution 2.8 accepts no other hash."""
    htpasswd = require_tool("htpasswd")
    path = directory / "htpasswd"
    result = subprocess.run(
        [htpasswd, "-Bbn", user, password], check=True, capture_output=True, timeout=60
    )
    path.write_bytes(result.stdout)
    return path


def _config(addr: str, storage: Path, auth_block: str) -> str:
    return f"""version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {addr}
  secret: pyengine-test-http-secret
{auth_block}"""


def start_registry(tmp: Path, auth: str = "none") -> Registry:
    """Start a registry with ``auth`` "none", "htpasswd" or "token"; it answers when returned."""
    binary = require_tool("docker-registry")
    tmp.mkdir(parents=True, exist_ok=True)
    storage = tmp / "storage"
    storage.mkdir(exist_ok=True)
    token_server = None
    if auth == "none":
        auth_block = ""
    elif auth == "htpasswd":
        path = make_htpasswd(tmp)
        auth_block = f"auth:\n  htpasswd:\n    realm: pyengine-test\n    path: {path}\n"
    elif auth == "token":
        token_server = TokenServer(tmp / "token")
        token_server.start()
        auth_block = (
            "auth:\n  token:\n"
            f"    realm: {token_server.realm}\n    service: {SERVICE}\n"
            f"    issuer: {ISSUER}\n    rootcertbundle: {token_server.cert_path}\n"
        )
    else:
        raise ValueError(f"unknown auth set-up {auth!r}")
    port = free_port()
    config = tmp / "config.yml"
    config.write_text(_config(f"127.0.0.1:{port}", storage, auth_block))
    log_path = tmp / "registry.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    registry = Registry(f"127.0.0.1:{port}", storage, log_path, process, auth, token_server)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            registry.stop()
            raise AssertionError(f"docker-registry exited at start:\n{registry.log()}")
        try:
            with urllib.request.urlopen(f"{registry.url}/v2/", timeout=5):
                return registry
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return registry
        except OSError:
            pass
        time.sleep(0.1)
    registry.stop()
    raise AssertionError(f"docker-registry did not answer within 30 s:\n{registry.log()}")


def skopeo_push(
    archive: Path, registry: Registry, repo_tag: str, *, docker_format: bool = False
) -> None:
    """``skopeo copy oci-archive:ARCHIVE docker://HOST/REPO:TAG`` (with our login if needed)."""
    skopeo = require_tool("skopeo")
    cmd = [skopeo, "copy", "--dest-tls-verify=false"]
    if registry.auth != "none":
        cmd.append(f"--dest-creds={USER}:{PASSWORD}")
    if docker_format:
        cmd += ["--format", "v2s2"]
    cmd += [f"oci-archive:{archive}", f"docker://{registry.host}/{repo_tag}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"skopeo copy failed: {result.stderr.strip()}")


# --- hand-made images, pushed over HTTP (no-auth registries only) ---------------------------------


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip layer holding ``files``: (the blob, its diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({str(Path(name).parent) for name in files} - {"."})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256(tar_bytes)


@dataclass
class BuiltImage:
    config: bytes
    layers: list[bytes]
    manifest: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def image_id(self) -> str:
        return sha256(self.config)

    def descriptor(self, platform: dict[str, str] | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
        }
        if platform is not None:
            entry["platform"] = platform
        return entry


def build_image(
    layers: list[dict[str, bytes]],
    *,
    architecture: str = "amd64",
    docker_types: bool = False,
    diff_ids: list[str] | None = None,
) -> BuiltImage:
    """An image of the given layers; ``diff_ids`` overrides the true ones (to test checks)."""
    blobs_and_ids = [make_layer(files) for files in layers]
    config = {
        "architecture": architecture,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or [d for _, d in blobs_and_ids]},
        "history": [{"created_by": f"pyetest layer {i}"} for i in range(len(layers))],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    layer_type = DOCKER_LAYER_GZIP if docker_types else OCI_LAYER_GZIP
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker_types else OCI_MANIFEST,
        "config": {
            "mediaType": DOCKER_CONFIG if docker_types else OCI_CONFIG,
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": layer_type, "digest": sha256(blob), "size": len(blob)}
            for blob, _ in blobs_and_ids
        ],
    }
    return BuiltImage(
        config_bytes,
        [blob for blob, _ in blobs_and_ids],
        json.dumps(manifest, sort_keys=True).encode(),
        DOCKER_MANIFEST if docker_types else OCI_MANIFEST,
    )


def _http(method: str, url: str, data: bytes = b"", content_type: str = "") -> Any:
    request = urllib.request.Request(url, data=data or None, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    return urllib.request.urlopen(request, timeout=60)


def push_blob(registry: Registry, repo: str, data: bytes) -> str:
    """A monolithic upload: POST …/blobs/uploads/ then PUT <Location>&digest= (spec.md)."""
    digest = sha256(data)
    with _http("POST", f"{registry.url}/v2/{repo}/blobs/uploads/") as response:
        location = response.headers["Location"]
    location = urllib.parse.urljoin(registry.url + "/", location)
    separator = "&" if "?" in location else "?"
    put_url = f"{location}{separator}digest={urllib.parse.quote(digest)}"
    with _http("PUT", put_url, data, "application/octet-stream") as response:
        assert response.status == 201, response.status
    return digest


def push_manifest(
    registry: Registry, repo: str, reference: str, body: bytes, media_type: str
) -> str:
    url = f"{registry.url}/v2/{repo}/manifests/{reference}"
    with _http("PUT", url, body, media_type) as response:
        assert response.status == 201, response.status
        return response.headers["Docker-Content-Digest"]


def push_image(registry: Registry, repo: str, image: BuiltImage, tag: str | None = None) -> str:
    """Blobs, then the manifest by ``tag`` (or by its digest when there is none)."""
    for blob in [*image.layers, image.config]:
        push_blob(registry, repo, blob)
    return push_manifest(registry, repo, tag or image.digest, image.manifest, image.media_type)


def push_index(
    registry: Registry, repo: str, tag: str, entries: list[dict[str, Any]], *, docker: bool = False
) -> bytes:
    """An OCI image index (or a Docker manifest list) over manifests pushed before."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}, sort_keys=True
    ).encode()
    push_manifest(registry, repo, tag, body, media_type)
    return body

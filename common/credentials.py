"""Stored registry logins, in the shape of Docker's ``config.json`` so either tool can read them::

    {"auths": {"127.0.0.1:5000": {"auth": base64("user:password")},
               "https://index.docker.io/v1/": {"auth": ...}}}

Docker Hub is known by several names (``docker.io``, ``index.docker.io``,
``registry-1.docker.io``, ``https://index.docker.io/v1/``); they all map to one key here.
The client (``pyengine login``) and the daemon's registry code both use this module.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.reference import DEFAULT_DOMAIN, LEGACY_DEFAULT_DOMAIN

DOCKER_HUB_HOST = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"  # the key Docker's config.json uses
_HUB_NAMES = {DEFAULT_DOMAIN, LEGACY_DEFAULT_DOMAIN, DOCKER_HUB_HOST}


class CredentialsError(Exception):
    """A credentials file that cannot be read or written."""


# --- credential keys ---------------------------------------------------------------------------


def registry_key(registry: str) -> str:
    """The canonical name of a registry: ``docker.io`` for Docker Hub, else ``host[:port]``.

    Accepts what users and Docker write: ``127.0.0.1:5000``, ``http://127.0.0.1:5000/``,
    ``https://index.docker.io/v1/``, ``registry-1.docker.io``, or "" for Docker Hub.
    """
    name = registry.strip()
    name = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", name)
    name = name.split("/", 1)[0].lower()
    if not name or name in _HUB_NAMES:
        return DEFAULT_DOMAIN
    return name


def credentials_for(
    credentials: dict[str, tuple[str, str]] | None, registry: str
) -> tuple[str, str] | None:
    """The ``(username, password)`` for ``registry`` in a dict keyed by any of its names."""
    if not credentials:
        return None
    wanted = registry_key(registry)
    for key, value in credentials.items():
        if registry_key(key) == wanted:
            return value
    return None


# --- the credentials file -----------------------------------------------------------------------


def default_credentials_path() -> Path:
    """``$XDG_CONFIG_HOME/pyengine/auth.json`` (``~/.config`` when the variable is unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pyengine" / "auth.json"


def _decode_entry(key: str, entry: Any) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise CredentialsError(f"credentials for {key}: invalid auth field: {e}") from e
        username, colon, password = decoded.partition(":")
        if not colon:
            raise CredentialsError(f"credentials for {key}: auth field is not user:password")
        return username, password
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str):
        return user, secret
    return None


@dataclass
class CredentialStore:
    """Logins in Docker's ``config.json`` shape at ``path``, written with mode 0600."""

    path: Path

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CredentialsError(f"cannot read {self.path}: {e}") from e
        if not isinstance(data, dict):
            raise CredentialsError(f"{self.path} is not a JSON object")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        # Not common.jsonstate.write_json_atomic: that creates its temporary file with the
        # umask's mode, and a password must never sit in a world-readable file, even briefly.
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{self.path.name}.tmp{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode is ignored for an existing file
                json.dump(data, f, indent="\t", sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CredentialsError(f"cannot write {self.path}: {e.strerror or e}") from e

    def all(self) -> dict[str, tuple[str, str]]:
        """Every stored login, keyed by registry_key(): the ``credentials`` pull() takes."""
        auths = self._read().get("auths") or {}
        if not isinstance(auths, dict):
            raise CredentialsError(f"{self.path}: auths is not a JSON object")
        found = {}
        for key, entry in auths.items():
            login = _decode_entry(key, entry)
            if login is not None:
                found[registry_key(key)] = login
        return found

    def get(self, registry: str) -> tuple[str, str] | None:
        return self.all().get(registry_key(registry))

    def _file_key(self, registry: str) -> str:
        key = registry_key(registry)
        return DOCKER_HUB_AUTH_KEY if key == DEFAULT_DOMAIN else key

    def save(self, registry: str, username: str, password: str) -> None:
        """Store (or replace) the login for ``registry``; other keys of the file are kept."""
        if ":" in username:
            raise CredentialsError("a username cannot contain ':'")
        data = self._read()
        auths = data.get("auths")
        if not isinstance(auths, dict):
            auths = data["auths"] = {}
        wanted = registry_key(registry)
        for key in [k for k in auths if registry_key(k) == wanted]:
            del auths[key]
        encoded = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        auths[self._file_key(registry)] = {"auth": encoded}
        self._write(data)

    def remove(self, registry: str) -> bool:
        """Forget the login for ``registry``; whether there was one."""
        data = self._read()
        auths = data.get("auths")
        if not isinstance(auths, dict):
            return False
        wanted = registry_key(registry)
        keys = [k for k in auths if registry_key(k) == wanted]
        for key in keys:
            del auths[key]
        if keys:
            self._write(data)
        return bool(keys)

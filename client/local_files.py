"""What the client reads on this machine rather than through the daemon: the registry logins
``pyengine login`` keeps, and the seccomp profiles ``--security-opt seccomp=FILE`` names."""

from __future__ import annotations

import json
from typing import Any

from common.credentials import CredentialsError, CredentialStore, default_credentials_path

# The most of a profile the client reads; the daemon enforces its own cap on what it is sent.
MAX_PROFILE_BYTES = 1 << 20

__all__ = ["CredentialStore", "CredentialsError", "credentials", "read_seccomp_profile"]


def credentials() -> CredentialStore:
    return CredentialStore(default_credentials_path())


def read_seccomp_profile(path: str) -> Any:
    """The profile's JSON; OSError, ValueError or RecursionError when it cannot be had."""
    with open(path, "rb") as f:
        raw = f.read(MAX_PROFILE_BYTES + 1)
    if len(raw) > MAX_PROFILE_BYTES:
        raise ValueError(f"larger than {MAX_PROFILE_BYTES} bytes")
    return json.loads(raw)

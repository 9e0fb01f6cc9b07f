"""CNI errors: the spec's JSON on stdout and a non-zero exit (CNI SPEC.md, "Error").

Codes 1-99 are the spec's; 100 and above are this plugin's own.
"""

from __future__ import annotations

from typing import Any

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs now (spec 1.1.0)
OPERATION_FAILED = 100  # netd refused or failed (the message says why)
CHECK_FAILED = 101  # CHECK found the attachment not as ADD left it
INTERNAL = 999


class CniError(Exception):
    """One CNI error: ``code``, a one-line ``msg`` and optional ``details``."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        data: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            data["details"] = self.details
        return data


def config_error(msg: str) -> CniError:
    return CniError(INVALID_CONFIG, msg)

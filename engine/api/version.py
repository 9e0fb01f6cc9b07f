"""The Engine API version a request speaks, parsed once from its ``/v1.NN/`` prefix.

Docker serves every version from its minimum to its current one and shapes some bodies by the
version asked for (api/docs/CHANGELOG.md in moby); a request without a prefix speaks the current
version. The middleware puts an ``ApiVersion`` on every request; handlers ask ``api_version``.
docs/api.md lists what differs between versions in pyengined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

_VERSION = re.compile(r"^([0-9]{1,4})\.([0-9]{1,4})$")
_REQUEST_KEY = "pyengine.api_version"


@dataclass(frozen=True, order=True)
class ApiVersion:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> ApiVersion:
        match = _VERSION.fullmatch(text)
        if match is None:
            raise ValueError(f"invalid API version {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, text: str) -> bool:
        return self >= ApiVersion.parse(text)

    def below(self, text: str) -> bool:
        return self < ApiVersion.parse(text)


API_VERSION = ApiVersion(1, 47)  # /_ping's Api-Version, /version's ApiVersion
MIN_API_VERSION = ApiVersion(1, 24)

# Versions at which shapes change (moby api/docs/CHANGELOG.md).
V1_42 = "1.42"  # /info omits KernelMemory(TCP) when unsupported
V1_43 = "1.43"  # /images/json: no <none>:<none> for untagged images
V1_44 = "1.44"  # several EndpointsConfig at create, EndpointSettings.MacAddress, DNSNames
V1_45 = "1.45"  # Aliases no longer include the short container id
V1_46 = "1.46"  # /containers/json shows HostConfig.Annotations


def set_api_version(request: web.Request, version: ApiVersion) -> None:
    request[_REQUEST_KEY] = version


def api_version(request: web.Request) -> ApiVersion:
    """The version ``request`` speaks (the current one without a ``/v1.NN`` prefix)."""
    version = request.get(_REQUEST_KEY)
    return version if isinstance(version, ApiVersion) else API_VERSION

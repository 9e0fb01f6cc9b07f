"""Registry authentication: the ``WWW-Authenticate`` challenges and ``Authorization`` values.

Challenges (RFC 7235 §4.1, RFC 6750 §3)::

    WWW-Authenticate: Bearer realm="https://auth.docker.io/token",service="registry.docker.io",
                      scope="repository:library/nginx:pull"
    WWW-Authenticate: Basic realm="pyengine-test"

The stored logins themselves are common/credentials.py.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

# --- challenges ---------------------------------------------------------------------------------


@dataclass
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict)  # parameter names in lower case


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_PART = re.compile(
    rf"""\s*(?:
        (?P<name>{_TOKEN})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>[^\s,]*))
      | (?P<scheme>{_TOKEN})(?:\s+(?P<token68>[A-Za-z0-9\-._~+/]+=*)(?=\s*(?:,|$)))?
      | (?P<comma>,)
    )""",
    re.VERBOSE,
)


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in one ``WWW-Authenticate`` value (several may share it, RFC 7235 §4.1)."""
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        match = _CHALLENGE_PART.match(header, position)
        if match is None or match.end() == position:
            break  # a malformed tail: keep what was understood
        position = match.end()
        if match["comma"]:
            continue
        if match["name"] is not None:
            if not challenges:
                continue  # a parameter before any scheme
            value = match["quoted"]
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else match["bare"]
            challenges[-1].params[match["name"].lower()] = value
        else:
            challenges.append(Challenge(match["scheme"].lower()))
    return challenges


# --- authorization values ----------------------------------------------------------------------


def basic_authorization(username: str, password: str) -> str:
    """An ``Authorization`` value for HTTP Basic (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")

"""Image references, normalized the way Docker does it.

The grammar is the one of github.com/distribution/reference (``reference.go``):

    reference := name [ ":" tag ] [ "@" digest ]
    name      := [ domain "/" ] path-component [ "/" path-component ]*
    domain    := host [ ":" port ]

Docker's normalization on top of it: a name without a domain lives on ``docker.io``, a single
path component on ``docker.io`` lives under ``library/``, and a reference with neither tag nor
digest means ``:latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_MAX_LENGTH = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE_RE = re.compile(
    rf"(?P<domain>{_DOMAIN})/(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)
_IMAGE_ID_RE = re.compile(r"[a-f0-9]{64}")
_SHA256_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")


def _invalid(ref: str, why: str = "") -> ValueError:
    return ValueError(f"invalid reference format: {why or repr(ref)}")


def _split_domain(ref: str) -> tuple[str, str]:
    """Docker's splitDockerDomain: is the first component a registry host or a path?"""
    first, slash, rest = ref.partition("/")
    is_host = bool(slash) and (
        any(c in first for c in ".:") or first == "localhost" or first.lower() != first
    )
    if not is_host:
        domain, remainder = DEFAULT_DOMAIN, ref
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


@dataclass(frozen=True)
class Reference:
    """A parsed, normalized reference. ``tag`` and ``digest`` are None when absent."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        """Parse and normalize ``ref`` (domain and ``library/``, but no default tag)."""
        if not ref:
            raise _invalid(ref)
        if _IMAGE_ID_RE.fullmatch(ref):
            raise _invalid(
                ref, f"invalid repository name ({ref}), cannot specify 64-byte hexadecimal strings"
            )
        domain, remainder = _split_domain(ref)
        name_part = re.split(r"[:@]", remainder, maxsplit=1)[0]
        if name_part.lower() != name_part:
            raise _invalid(ref, f"repository name ({name_part}) must be lowercase")
        match = _REFERENCE_RE.fullmatch(f"{domain}/{remainder}")
        if match is None:
            raise _invalid(ref)
        parsed = cls(match["domain"], match["path"], match["tag"], match["digest"])
        if len(parsed.name) > NAME_MAX_LENGTH:
            raise _invalid(
                ref, f"repository name must not be more than {NAME_MAX_LENGTH} characters"
            )
        if parsed.digest is not None and parsed.digest.startswith("sha256:"):
            if not _SHA256_DIGEST_RE.fullmatch(parsed.digest):
                raise _invalid(ref, f"invalid sha256 digest {parsed.digest}")
        return parsed

    @property
    def name(self) -> str:
        """``docker.io/library/nginx``: the repository, without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def familiar_name(self) -> str:
        """``nginx`` for ``docker.io/library/nginx``, ``foo/bar`` for ``docker.io/foo/bar``."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        path = self.path
        if path.startswith(OFFICIAL_REPO_PREFIX) and "/" not in path[len(OFFICIAL_REPO_PREFIX) :]:
            return path[len(OFFICIAL_REPO_PREFIX) :]
        return path

    def with_default_tag(self) -> Reference:
        """The same reference, with ``:latest`` when it has neither tag nor digest."""
        if self.tag is None and self.digest is None:
            return replace(self, tag=DEFAULT_TAG)
        return self

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def familiar(self) -> str:
        return self.familiar_name + self._suffix()

    def __str__(self) -> str:
        return self.name + self._suffix()


def normalize(ref: str) -> str:
    """``nginx`` → ``docker.io/library/nginx:latest``; raises ValueError when malformed."""
    return str(Reference.parse(ref).with_default_tag())


def familiar(ref: str) -> str:
    """``docker.io/library/nginx:latest`` → ``nginx:latest`` (the short form Docker prints)."""
    return Reference.parse(ref).familiar()

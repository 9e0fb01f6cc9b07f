"""What the image store hands out (Image) and raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import errors


class ImageNotFound(errors.NotFound):
    """No image answers to a name or ID (message: ``No such image: nginx:latest``)."""


class ImageLoadError(errors.InvalidParameter):
    """An archive that cannot be loaded; nothing of it was kept."""


class ImageConflict(errors.Conflict):
    """An operation that would be ambiguous or destructive without being forced."""


@dataclass
class Image:
    id: str  # "sha256:<config digest>", Docker's image ID
    repo_tags: list[str]  # normalized refs
    config: dict[str, Any]  # the whole image config JSON ("config", "rootfs", "history"...)
    diff_ids: list[str]
    size: int  # bytes of unpacked layers
    created: str  # RFC 3339 from the config, or ""
    manifest_digest: str = ""  # the manifest the image was loaded with

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]

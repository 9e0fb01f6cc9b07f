"""A container's mount points as recorded with it (moby's ``container.MountPoints``), their
``Mounts`` entries in the API, and their OCI ``mounts`` entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.volumes.parse import BIND, TMPFS, VOLUME

# Docker's options for every tmpfs it mounts unless the request says otherwise (moby
# daemon/oci_linux.go): later options override earlier ones in mount(8) order.
TMPFS_DEFAULTS = ["noexec", "nosuid", "nodev"]


@dataclass
class MountPoint:
    type: str  # bind | volume | tmpfs
    destination: str
    source: str = ""  # the host path of a bind
    name: str = ""  # the volume's name
    driver: str = ""
    mode: str = ""
    rw: bool = True
    propagation: str = ""
    nocopy: bool = False
    anonymous: bool = False  # a volume made for this container (rm -v removes it)
    tmpfs_options: list[str] = field(default_factory=list)

    def to_api(self, volume_path: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"Type": self.type}
        if self.type == VOLUME:
            out["Name"] = self.name
        out.update(
            Source=volume_path if self.type == VOLUME else self.source,
            Destination=self.destination,
        )
        if self.type == VOLUME:
            out["Driver"] = self.driver or "local"
        out.update(Mode=self.mode, RW=self.rw, Propagation=self.propagation)
        return out

    def oci(self, destination: str, host_path: str) -> dict[str, Any]:
        """The runtime-spec entry at the resolved ``destination``; ``host_path`` is what a bind
        or volume mounts."""
        access = "rw" if self.rw else "ro"
        if self.type == TMPFS:
            return {
                "destination": destination,
                "type": "tmpfs",
                "source": "tmpfs",
                "options": [*TMPFS_DEFAULTS, *self.tmpfs_options, access],
            }
        propagation = self.propagation or "rprivate"
        return {
            "destination": destination,
            "type": "bind",
            "source": host_path,
            "options": ["rbind", propagation, access],
        }


def depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def rootfs_propagation(points: list[MountPoint]) -> str | None:
    """The rootfs propagation shared or slave mounts need (moby: a shared mount needs an
    rshared root, a slave one at least rslave), None when the default does."""
    wanted = {p.propagation for p in points if p.type == BIND}
    if wanted & {"shared", "rshared"}:
        return "rshared"
    if wanted & {"slave", "rslave"}:
        return "rslave"
    return None


__all__ = ["BIND", "TMPFS", "VOLUME", "MountPoint", "depth", "rootfs_propagation"]

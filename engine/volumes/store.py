"""The local volume driver's store: ``<data_root>/volumes/<name>/volume.json`` and the data
in ``<data_root>/volumes/<name>/_data``, laid out as Docker's.

A volume exists once its record is written (atomically, last); a directory without one is
what a crash during a create left and is removed when the store loads. A removal renames the
record away first, so a crash during one never brings a half-deleted volume back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import errors
from common.jsonstate import CorruptRecord, read_record, set_aside, write_json_atomic
from common.timefmt import utc_rfc3339
from engine.runtime import rootfs

# moby volume/local: volumeNameRegex (names.RestrictedNamePattern); fullmatch, not "$".
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
NAME_CHARS = "[a-zA-Z0-9][a-zA-Z0-9_.-]"
# Docker marks the volumes it makes for a container (anonymous) with this label; prune with
# API >= 1.42 removes only those unless asked for all.
ANONYMOUS_LABEL = "com.docker.volume.anonymous"
LOCAL = "local"
RECORD = "volume.json"
DATA = "_data"
STORE_DIR_MODE = 0o700  # the data root is 0710: nothing beneath it is open to others
VOLUME_OPTIONS = ("type", "device", "o")
MS_BIND = 0x1000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


class VolumeNotFound(errors.NotFound):
    def __init__(self, name: str, op: str = "get") -> None:
        super().__init__(f"{op} {name}: no such volume")


class VolumeInUse(errors.Conflict):
    def __init__(self, name: str, users: list[str]) -> None:
        super().__init__(f"remove {name}: volume is in use - [{', '.join(users)}]")


class InvalidVolume(errors.InvalidParameter):
    pass


@dataclass
class Volume:
    name: str
    created_at: str
    driver: str = LOCAL
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        return ANONYMOUS_LABEL in self.labels


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidVolume(
            f'create {name}: "{name}" includes invalid characters for a local volume name, '
            f'only "{NAME_CHARS}" are allowed. If you intended to pass a host directory, use '
            "absolute path"
        )
    return name


def check_options(options: dict[str, str]) -> None:
    """The local driver's ``type``/``device``/``o``: tmpfs and bind mounts of a host directory
    (``type=none,o=bind,device=/path``); other file systems are refused."""
    for key in options:
        if key not in VOLUME_OPTIONS:
            raise InvalidVolume(f'invalid option key: "{key}"')
    if not options:
        return
    kind, device, o = options.get("type", ""), options.get("device", ""), options.get("o", "")
    if not kind:
        raise InvalidVolume('missing required option: "type"')
    if kind == "tmpfs":
        return
    if kind == "none" and "bind" in o.split(","):
        if not device.startswith("/"):
            raise InvalidVolume(f"invalid bind device {device!r}: want an absolute host path")
        return
    raise InvalidVolume(f"volume type {kind!r} is not supported (tmpfs or a bind only)")


class VolumeStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=STORE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(root, STORE_DIR_MODE)
        self._volumes: dict[str, Volume] = {}
        self._lock = threading.Lock()
        for entry in sorted(root.iterdir()):
            if entry.name.endswith(".removing") and not rootfs.mounts_under(entry):
                shutil.rmtree(entry, ignore_errors=True)  # a removal the daemon did not finish
                continue
            volume = self._load(entry)
            if volume is not None:
                self._volumes[volume.name] = volume

    def _load(self, entry: Path) -> Volume | None:
        record = entry / RECORD
        if not entry.is_dir() or entry.is_symlink() or not NAME_RE.fullmatch(entry.name):
            return None
        if not os.path.lexists(record):  # a create the daemon did not finish
            for leftover in (entry / DATA, entry):
                try:
                    leftover.rmdir()
                except OSError:
                    break
            return None
        try:
            data = read_record(record)
            if not isinstance(data, dict) or data.get("name") != entry.name:
                raise CorruptRecord(f"not the record of volume {entry.name}")
            volume = Volume(**data)
            strings = [*volume.labels.values(), *volume.options.values()]
            if not all(isinstance(v, str) for v in strings):
                raise CorruptRecord(f"volume {entry.name}: labels and options must be strings")
        except (CorruptRecord, TypeError, ValueError, AttributeError) as e:
            set_aside(record, e)
            return None
        return volume

    def mountpoint(self, volume: Volume) -> Path:
        return self.root / volume.name / DATA

    def all(self) -> list[Volume]:
        return sorted(self._volumes.values(), key=lambda v: v.name)

    def get(self, name: str) -> Volume:
        volume = self._volumes.get(name)
        if volume is None:
            raise VolumeNotFound(name)
        return volume

    def create(
        self,
        name: str | None,
        labels: dict[str, str] | None = None,
        options: dict[str, str] | None = None,
        driver: str = LOCAL,
    ) -> tuple[Volume, bool]:
        """The volume ``name`` (a new 64-hex name when None), made unless it exists; True when
        it was made. As Docker, an existing name answers with the existing volume."""
        if (driver or LOCAL) != LOCAL:
            raise InvalidVolume(f"volume driver {driver!r} is not supported (local only)")
        if name is None:
            name = os.urandom(32).hex()
        check_name(name)
        with self._lock:  # creates and removes run in worker threads
            if name in self._volumes:
                return self._volumes[name], False
            check_options(options or {})
            labels, options = dict(labels or {}), dict(options or {})
            volume = Volume(name, utc_rfc3339(digits=0), LOCAL, labels, options)
            directory = self.root / name
            directory.mkdir(mode=STORE_DIR_MODE, exist_ok=True)
            (directory / DATA).mkdir(mode=0o755, exist_ok=True)
            write_json_atomic(directory / RECORD, asdict(volume))
            self._volumes[name] = volume
            return volume, True

    def is_empty(self, volume: Volume) -> bool:
        with os.scandir(self.mountpoint(volume)) as it:
            return next(it, None) is None

    def mount(self, volume: Volume) -> Path:
        """The host path to bind into a container; a volume with options has its tmpfs or
        bind mounted on ``_data`` first (when not already)."""
        path = self.mountpoint(volume)
        if volume.options and not rootfs.is_mounted(path):
            kind, o = volume.options["type"], volume.options.get("o", "")
            if kind == "tmpfs":
                args = (b"tmpfs", b"tmpfs", 0, o.encode() or None)
            else:
                device = volume.options["device"]
                args = (os.fsencode(device), b"none", MS_BIND, None)
            if _libc.mount(args[0], os.fsencode(str(path)), args[1], args[2], args[3]) != 0:
                err = ctypes.get_errno()
                raise InvalidVolume(f"error while mounting volume '{path}': {os.strerror(err)}")
        return path

    def unmount(self, volume: Volume) -> None:
        if volume.options:
            rootfs.unmount(self.mountpoint(volume))

    def remove(self, volume: Volume) -> None:
        """Forget ``volume`` and delete its data (blocking: call off the event loop)."""
        directory = self.root / volume.name
        with self._lock:
            self.unmount(volume)
            if rootfs.mounts_under(directory):  # never delete through a mount
                raise errors.Conflict(f"remove {volume.name}: its data is still mounted")
            self._volumes.pop(volume.name, None)
            if os.path.lexists(directory / RECORD):
                os.rename(directory / RECORD, directory / f".{RECORD}.removed")
            gone = directory.with_name(f".{volume.name}.removing")
            os.rename(directory, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def size(self, volume: Volume) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.mountpoint(volume)):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
        return total

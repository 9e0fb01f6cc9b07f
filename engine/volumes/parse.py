"""A create's mount requests (``Binds``, ``Mounts``, ``Tmpfs``, ``VolumesFrom``, ``Volumes``)
parsed once, at the API's boundary, into :class:`MountRequest` values.

The rules and messages are moby's ``volume/mounts/linux_parser.go``: a ``-v`` spec is
``[source:]destination[:mode]``; an absolute source is a bind, any other a volume name; the mode
is a comma list of at most one of each ``ro|rw``, ``z|Z``, a propagation and ``nocopy``.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidParameter

BIND, VOLUME, TMPFS = "bind", "volume", "tmpfs"
PROPAGATIONS = ("private", "rprivate", "shared", "rshared", "slave", "rslave")
DEFAULT_PROPAGATION = "rprivate"
# mount(8) tmpfs options Docker passes on (moby mount.ParseTmpfsOptions accepts these).
TMPFS_FLAGS = {
    "rw", "ro", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "sync", "async",
    "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "dirsync", "mand", "nomand",
}  # fmt: skip
TMPFS_VALUES = {
    "size": re.compile(r"[0-9]+[kKmMgG%]?"),
    "nr_blocks": re.compile(r"[0-9]+[kKmMgG]?"),
    "nr_inodes": re.compile(r"[0-9]+[kKmMgG]?"),
    "mode": re.compile(r"[0-7]{1,4}"),
    "uid": re.compile(r"[0-9]+"),
    "gid": re.compile(r"[0-9]+"),
}


class MountSpecError(InvalidParameter):
    """A mount request Docker refuses: 400."""


@dataclass
class MountRequest:
    """One mount a create asks for, before volumes are looked up or made."""

    type: str  # bind | volume | tmpfs
    target: str
    source: str = ""  # host path (bind), volume name ("" = anonymous), unused for tmpfs
    read_only: bool = False
    mode: str = ""  # the -v mode text, echoed in inspect
    propagation: str = ""
    nocopy: bool = False
    labels: dict[str, str] = field(default_factory=dict)  # a new volume's (VolumeOptions)
    tmpfs_options: list[str] = field(default_factory=list)  # mount(8) data for tmpfs
    create_source: bool = False  # a -v bind whose missing source Docker makes a directory


@dataclass
class VolumesFrom:
    container: str
    mode: str = ""  # "" (as the source container's) | ro | rw


@dataclass
class MountRequests:
    """Everything a create asks to mount, in Docker's order of precedence."""

    mounts: list[MountRequest] = field(default_factory=list)  # Binds, Mounts, Tmpfs
    volumes_from: list[VolumesFrom] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)  # Config.Volumes: anonymous volumes

    def __bool__(self) -> bool:
        return bool(self.mounts or self.volumes_from or self.volumes)


def _invalid_spec(raw: str) -> MountSpecError:
    return MountSpecError(f"invalid volume specification: '{raw}'")


def check_target(target: str) -> str:
    """An absolute container path other than ``/``, cleaned."""
    if not target:
        raise MountSpecError("field Target must not be empty")
    if not target.startswith("/"):
        raise MountSpecError(f"invalid mount path: '{target}' mount path must be absolute")
    clean = posixpath.normpath(target)
    if clean.startswith("//"):
        clean = "/" + clean.lstrip("/")
    if clean == "/":
        raise MountSpecError("invalid specification: destination can't be '/'")
    if "\x00" in target:
        raise MountSpecError(f"invalid mount path: {target!r}")
    return clean


def parse_mode(mode: str) -> tuple[bool, str, bool | None]:
    """(read-only, propagation, nocopy or None when unset) of a ``-v`` mode; ValueError when it
    is not one Docker takes (linuxValidMountMode)."""
    if not mode:
        return False, "", None
    rw = label = prop = copy = 0
    read_only, propagation, nocopy = False, "", None
    for part in mode.split(","):
        if part in ("rw", "ro"):
            rw += 1
            read_only = part == "ro"
        elif part in ("z", "Z"):
            label += 1
        elif part in PROPAGATIONS:
            prop += 1
            propagation = part
        elif part == "nocopy":
            copy += 1
            nocopy = True
        else:
            raise ValueError(mode)
    if max(rw, label, prop, copy) > 1:
        raise ValueError(mode)
    return read_only, propagation, nocopy


def parse_bind(raw: str) -> MountRequest:
    """One ``HostConfig.Binds`` entry (``docker run -v``)."""
    parts = raw.split(":", 3)
    if not parts[0]:
        raise _invalid_spec(raw)
    mode = ""
    if len(parts) == 1:
        source, target = "", parts[0]
    elif len(parts) == 2:
        try:
            parse_mode(parts[1])
            valid_mode = bool(parts[1])
        except ValueError:
            valid_mode = False
        if valid_mode:  # "/foo:rw": a volume cannot be given a mode without a source
            raise _invalid_spec(raw)
        source, target = parts
    elif len(parts) == 3:
        source, target, mode = parts
    else:
        raise _invalid_spec(raw)
    try:
        read_only, propagation, nocopy = parse_mode(mode)
    except ValueError:
        raise MountSpecError(f"invalid mode: {mode}") from None
    kind = BIND if source.startswith("/") else VOLUME
    try:
        target = check_target(target)
    except MountSpecError as e:
        raise MountSpecError(f"{_invalid_spec(raw)}: {e}") from None
    if kind == BIND:
        if nocopy is not None:
            raise MountSpecError(
                f'{_invalid_spec(raw)}: invalid mount config for type "bind": field '
                "VolumeOptions must not be specified"
            )
        return MountRequest(
            BIND,
            target,
            posixpath.normpath(source),
            read_only,
            mode,
            propagation or DEFAULT_PROPAGATION,
            create_source=True,
        )
    if propagation:
        raise MountSpecError(
            f'{_invalid_spec(raw)}: invalid mount config for type "volume": field '
            "BindOptions must not be specified"
        )
    if not source and read_only:
        raise MountSpecError(
            f'{_invalid_spec(raw)}: invalid mount config for type "volume": must not set '
            "ReadOnly mode when using anonymous volumes"
        )
    # moby setBindModeIfNull: a local volume asked for by -v or --mount shows mode "z".
    return MountRequest(VOLUME, target, source, read_only, mode or "z", nocopy=bool(nocopy))


def _mount_error(kind: str, message: str) -> MountSpecError:
    return MountSpecError(f'invalid mount config for type "{kind}": {message}')


def _get(d: Any, key: str, kind: type, what: str) -> Any:
    value = d.get(key) if isinstance(d, dict) else None
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise MountSpecError(f"invalid {what}.{key}: want {kind.__name__}")
    return value


def tmpfs_options(size: int | None = None, mode: int | None = None) -> list[str]:
    options = []
    if size:
        options.append(f"size={size}")
    if mode:
        options.append(f"mode={mode:o}")
    return options


def parse_mount(m: dict[str, Any], i: int) -> MountRequest:
    """One ``HostConfig.Mounts`` entry (``--mount``), api/types/mount.Mount."""
    what = f"HostConfig.Mounts[{i}]"
    kind = _get(m, "Type", str, what) or ""
    target = _get(m, "Target", str, what) or ""
    source = _get(m, "Source", str, what) or ""
    read_only = bool(_get(m, "ReadOnly", bool, what))
    bind_opts = _get(m, "BindOptions", dict, what)
    vol_opts = _get(m, "VolumeOptions", dict, what)
    tmpfs_opts = _get(m, "TmpfsOptions", dict, what)
    if kind not in (BIND, VOLUME, TMPFS):
        raise MountSpecError(f"mount type unknown: {kind!r}" if kind else "mount type unknown")
    try:
        target = check_target(target)
    except MountSpecError as e:
        raise _mount_error(kind, str(e)) from None
    extra = {BIND: ("VolumeOptions", "TmpfsOptions"), VOLUME: ("BindOptions", "TmpfsOptions")}
    extra[TMPFS] = ("BindOptions", "VolumeOptions")
    for name in extra[kind]:
        if m.get(name):
            raise _mount_error(kind, f"field {name} must not be specified")
    if kind == BIND:
        if not source:
            raise _mount_error(kind, "field Source must not be empty")
        if not source.startswith("/"):
            raise _mount_error(kind, f"invalid mount path: '{source}' mount path must be absolute")
        propagation = _get(bind_opts, "Propagation", str, what) or DEFAULT_PROPAGATION
        if propagation not in PROPAGATIONS:
            raise _mount_error(kind, f"invalid propagation mode: {propagation}")
        return MountRequest(BIND, target, posixpath.normpath(source), read_only, "", propagation)
    if kind == VOLUME:
        if not source and read_only:
            raise _mount_error(kind, "must not set ReadOnly mode when using anonymous volumes")
        driver = _get(vol_opts, "DriverConfig", dict, what) or {}
        if (_get(driver, "Name", str, what) or "local") != "local":
            raise MountSpecError(f"volume driver {driver['Name']!r} is not supported (local only)")
        labels = _get(vol_opts, "Labels", dict, what) or {}
        if not all(isinstance(v, str) for v in labels.values()):
            raise MountSpecError(f"invalid {what}.VolumeOptions.Labels: want strings")
        if _get(vol_opts, "Subpath", str, what):
            raise MountSpecError("volume subpaths are not supported")
        nocopy = bool(_get(vol_opts, "NoCopy", bool, what))
        return MountRequest(VOLUME, target, source, read_only, "z", nocopy=nocopy, labels=labels)
    if source:
        raise _mount_error(kind, "field Source must not be specified")
    size = _get(tmpfs_opts, "SizeBytes", int, what)
    mode = _get(tmpfs_opts, "Mode", int, what)
    if size is not None and size < 0:
        raise _mount_error(kind, "invalid tmpfs size")
    if mode is not None and not 0 <= mode <= 0o7777:
        raise _mount_error(kind, "invalid tmpfs mode")
    return MountRequest(TMPFS, target, read_only=read_only, tmpfs_options=tmpfs_options(size, mode))


def parse_tmpfs_options(text: str) -> list[str]:
    """``--tmpfs /run:size=64k,mode=1777`` options, checked against mount(8)'s tmpfs set."""
    options = []
    for option in filter(None, text.split(",")):
        key, eq, value = option.partition("=")
        pattern = TMPFS_VALUES.get(key)
        if (eq and (pattern is None or not pattern.fullmatch(value))) or (
            not eq and key not in TMPFS_FLAGS
        ):
            raise MountSpecError(f"invalid tmpfs option {option!r}")
        options.append(option)
    return options


def parse_volumes_from(raw: str) -> VolumesFrom:
    name, _, mode = raw.partition(":")
    if not name or mode not in ("", "ro", "rw"):
        raise MountSpecError(f"invalid mode: {mode}" if name else f"invalid volumes-from: {raw}")
    return VolumesFrom(name, mode)


def image_volume_paths(image_config: dict[str, Any]) -> dict[str, Any]:
    """The image's ``VOLUME`` paths (untrusted: checked as a create's), cleaned."""
    volumes = image_config.get("Volumes") or {}
    if not isinstance(volumes, dict) or not all(isinstance(v, str) for v in volumes):
        raise MountSpecError("the image's config has invalid Volumes")
    return {check_target(v): {} for v in volumes}


def parse_mount_requests(config: dict[str, Any], host_config: dict[str, Any]) -> MountRequests:
    """Binds, Mounts and Tmpfs (a destination twice is a 400, as Docker's "Duplicate mount
    point"), VolumesFrom and Config.Volumes of a create body whose types are checked."""
    driver = host_config.get("VolumeDriver") or "local"
    if driver != "local":
        raise MountSpecError(f"volume driver {driver!r} is not supported (local only)")
    out = MountRequests()
    for raw in host_config.get("Binds") or []:
        out.mounts.append(parse_bind(raw))
    for i, m in enumerate(host_config.get("Mounts") or []):
        out.mounts.append(parse_mount(m, i))
    for target, options in (host_config.get("Tmpfs") or {}).items():
        out.mounts.append(MountRequest(TMPFS, check_target(target), mode=options))
        out.mounts[-1].tmpfs_options = parse_tmpfs_options(options)
    seen: set[str] = set()
    for m in out.mounts:
        if m.target in seen:
            raise MountSpecError(f"Duplicate mount point: {m.target}")
        seen.add(m.target)
    out.volumes_from = [parse_volumes_from(v) for v in host_config.get("VolumesFrom") or []]
    out.volumes = [check_target(v) for v in config.get("Volumes") or {}]
    return out

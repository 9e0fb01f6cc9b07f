"""Container records: what the daemon knows about each container, persisted as JSON."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import errors
from common.jsonstate import FILE_MODE, CorruptRecord, read_record, set_aside, write_json_atomic
from common.ports import PortBinding, PortMapping, parse_port_bindings
from common.timefmt import ZERO_TIME
from engine.lifecycle.namesgen import random_name
from engine.volumes.mounts import MountPoint

# moby daemon/names: validContainerNamePattern. Checked with fullmatch: Python's ``$`` also
# matches before a trailing newline.
NAME_RE = re.compile(r"/?[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# moby daemon/names.go generateAndReserveName: six random candidates (a digit appended from the
# second on), then the container's short id.
NAME_TRIES = 6


class ContainerNotFound(errors.NotFound):
    def __init__(self, ref: str) -> None:
        super().__init__(f"No such container: {ref}")


class ContainerConflict(errors.Conflict):
    pass


@dataclass
class ContainerState:
    status: str = "created"  # created | running | exited | removing (Docker's words)
    pid: int = 0
    monitor_pid: int = 0
    exit_code: int = 0
    started_at: str = ZERO_TIME
    finished_at: str = ZERO_TIME
    error: str = ""
    restarting: bool = False  # waiting to run again by its restart policy
    restart_count: int = 0  # Docker's RestartCount: restarts by the policy
    manually_stopped: bool = False  # stopped or killed through the API: no restart
    # Docker's State.Health ({} without a healthcheck): Status, FailingStreak, Log.
    health: dict[str, Any] = field(default_factory=dict)
    oom_killed: bool = False  # the kernel's OOM killer ended its last run

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass
class NetworkRecord:
    ip: str = ""
    prefixlen: int = 0
    gateway: str = ""
    mac: str = ""
    netns_path: str = ""
    ports: list[PortMapping] = field(default_factory=list)


@dataclass
class NetworkAttachment:
    """A network the container is to be connected to when it starts (Docker's NetworkMode and
    EndpointsConfig, and later ``network connect``); the first one is its ``eth0``."""

    network_id: str
    name: str  # the network's name when it was attached (for messages; the id is the key)
    ip: str = ""  # the IPv4 address asked for (--ip); "" = the next free one
    aliases: list[str] = field(default_factory=list)  # --network-alias, for name resolution
    ip6: str = ""  # the IPv6 address asked for (--ip6) on an IPv6 network
    mac: str = ""  # the MAC asked for (--mac-address); "" = one made of its IPv4 address


@dataclass
class Container:
    id: str
    name: str
    created: str
    image: str  # the reference the user gave
    image_id: str
    config: dict[str, Any]  # Docker's container Config (Cmd, Env, Entrypoint, ExposedPorts, ...)
    host_config: dict[str, Any]  # Docker's HostConfig (PortBindings, AutoRemove, ...)
    # HostConfig.PortBindings as parsed at create; what start publishes.
    port_bindings: list[PortBinding] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # resolved argv (Entrypoint + Cmd)
    state: ContainerState = field(default_factory=ContainerState)
    network: NetworkRecord = field(default_factory=NetworkRecord)  # its first endpoint, running
    networks: list[NetworkAttachment] = field(default_factory=list)  # [] = the default network
    # Disconnected from every network (compose v1 does so before it reconnects with aliases):
    # [] then means none at all, and a start gives it loopback only, as Docker does.
    detached: bool = False
    mounts: list[MountPoint] = field(default_factory=list)  # volumes, binds, tmpfs

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Container:
        net = dict(data.get("network", {}))
        net["ports"] = [PortMapping.from_json(p) for p in net.get("ports", [])]
        if "port_bindings" in data:
            bindings = [PortBinding.from_json(b) for b in data["port_bindings"]]
        else:  # a record from before the bindings were kept parsed
            bindings = parse_port_bindings((data.get("host_config") or {}).get("PortBindings"))
        skip = ("state", "network", "networks", "port_bindings", "mounts")
        return cls(
            **{k: v for k, v in data.items() if k not in skip},
            port_bindings=bindings,
            state=ContainerState(**data.get("state", {})),
            network=NetworkRecord(**net),
            networks=[NetworkAttachment(**a) for a in data.get("networks", [])],
            mounts=[MountPoint(**m) for m in data.get("mounts", [])],
        )


class ContainerStore:
    """Containers under ``<root>/<id>/container.json``; lookup by id, id prefix or name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=STORE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(root, STORE_DIR_MODE)
        self._containers: dict[str, Container] = {}
        for entry in sorted(root.iterdir()):
            container = _load_record(entry)
            if container is not None:
                self._containers[container.id] = container

    def dir(self, container: Container) -> Path:
        return self.root / container.id

    def all(self) -> list[Container]:
        return sorted(self._containers.values(), key=lambda c: c.created, reverse=True)

    def new_id(self) -> str:
        return os.urandom(32).hex()

    def check_name(self, name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise ValueError(
                f"Invalid container name ({name!r}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )
        name = name.lstrip("/")
        for c in self._containers.values():
            if c.name == name:
                raise ContainerConflict(
                    f'Conflict. The container name "/{name}" is already in use by container '
                    f'"{c.id}". You have to remove (or rename) that container to be able to '
                    "reuse that name."
                )
        return name

    def generate_name(self, container_id: str = "") -> str:
        """Docker's generated name; never runs out: after the random tries, the short id."""
        taken = {c.name for c in self._containers.values()}
        for retry in range(NAME_TRIES):
            name = random_name(retry)
            if name not in taken:
                return name
        for _ in range(NAME_TRIES):
            name = container_id[:12] or os.urandom(6).hex()
            if name not in taken:
                return name
            container_id = ""
        raise ContainerConflict("could not generate a unique container name")

    def add(self, container: Container) -> None:
        self._containers[container.id] = container
        self.save(container)

    def save(self, container: Container) -> None:
        write_json_atomic(self.dir(container) / "container.json", asdict(container))

    def get(self, ref: str) -> Container:
        ref = ref.lstrip("/")
        if ref in self._containers:
            return self._containers[ref]
        for c in self._containers.values():
            if c.name == ref:
                return c
        matches = [c for c in self._containers.values() if ref and c.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ContainerConflict(f"Multiple IDs found with provided prefix: {ref}")
        raise ContainerNotFound(ref)

    def remove(self, container: Container) -> None:
        self._containers.pop(container.id, None)
        shutil.rmtree(self.dir(container), ignore_errors=True)


STORE_DIR_MODE = 0o710  # Docker's /var/lib/docker/containers


def _check_shape(obj: Any, where: str = "record") -> None:
    """Each field of a record's dataclasses holds the type it is declared with."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        origin = typing.get_origin(hint) or hint
        items = [value] if origin is not list else value
        if origin is list and not isinstance(value, list):
            raise CorruptRecord(f"{where}.{f.name}: want a list")
        item_type = typing.get_args(hint)[0] if origin is list else origin
        for item in items:
            if isinstance(item_type, type) and dataclasses.is_dataclass(item_type):
                if not isinstance(item, item_type):
                    raise CorruptRecord(f"{where}.{f.name}: want an object")
                _check_shape(item, f"{where}.{f.name}")
            elif isinstance(item_type, type) and not isinstance(item, item_type):
                raise CorruptRecord(f"{where}.{f.name}: want {item_type.__name__}")


def _load_record(entry: Path) -> Container | None:
    """The container recorded under ``entry``; a record that cannot be read or has the wrong
    shape is set aside (and logged) so that the daemon starts with the others."""
    path = entry / "container.json"
    if not entry.is_dir() or not os.path.lexists(path):
        return None
    try:
        data = read_record(path)
        if not isinstance(data, dict) or data.get("id") != entry.name:
            raise CorruptRecord(f"not the record of container {entry.name}")
        container = Container.from_json(data)
        _check_shape(container)
    except (CorruptRecord, TypeError, ValueError, KeyError, AttributeError) as e:
        set_aside(path, e)
        return None
    os.chmod(path, FILE_MODE)  # written 0644 by versions before this one; it holds the Env
    return container

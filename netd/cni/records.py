"""The plugin's record of its attachments, ``<dataDir>/attachments.json`` (atomic JSON, 0600).

An attachment is identified by (CNI_CONTAINERID, CNI_IFNAME), as the spec says; netd knows it
by :func:`attachment_key`, a hash of both, used as its container id (its host veth's name,
``pyecni<9 hex>``, is a hash of the key and the network name). The record keeps what netd's
state does not: the runtime's ids, its namespace path and the proxies started for the
attachment. It is written before netd is asked to do anything (the intent) and dropped last, so
a crash leaves a record that the next DEL or GC of the attachment finishes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.jsonstate import read_json, write_json_atomic

RECORD_FILE = "attachments.json"
RECORD_VERSION = 1


def attachment_key(container_id: str, ifname: str) -> str:
    return hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()


@dataclass
class ProxyRecord:
    pid: int
    proto: str
    host_ip: str
    host_port: int
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled pid apart


@dataclass
class AttachmentRecord:
    container_id: str
    ifname: str
    netns: str
    proxies: list[ProxyRecord] = field(default_factory=list)

    @property
    def key(self) -> str:
        return attachment_key(self.container_id, self.ifname)


@dataclass
class Records:
    path: Path
    attachments: dict[str, AttachmentRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path) -> Records:
        path = data_dir / RECORD_FILE
        data: Any = read_json(path, None) or {}
        records = cls(path)
        for key, raw in dict(data.get("attachments", {})).items():
            raw = dict(raw)
            proxies = [ProxyRecord(**p) for p in raw.pop("proxies", [])]
            records.attachments[key] = AttachmentRecord(**raw, proxies=proxies)
        return records

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "version": RECORD_VERSION,
                "attachments": {k: asdict(a) for k, a in self.attachments.items()},
            },
        )

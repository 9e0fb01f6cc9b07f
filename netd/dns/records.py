"""A network's name table: which addresses each container name and alias resolves to.

The daemon keeps one table per user-defined network and updates it as containers join and leave;
the responder reads it on every query. Updates replace a container's whole record under a lock,
so a reader sees a container's old record or its new one, never a mix, and sees it as soon as
``set``/``remove`` returns (nothing is cached between the table and the wire).

A container's responder does not read one table but a ``ScopedNames``: the tables of the
networks that container is on, merged, asked afresh on every query.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Protocol

from netd.errors import NetdError

# Container names and aliases as Docker accepts them (its restrictedNamePattern), compared
# case-insensitively like every DNS name (RFC 4343); one leading "/" (Docker's name form) and a
# trailing dot are dropped.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
MAX_NAME = 253  # RFC 1035 §2.3.4: 255 octets in wire form is 253 in dotted text
MAX_LABEL = 63


@dataclass(frozen=True)
class ContainerRecord:
    """What one container contributes to the table."""

    container_id: str
    names: tuple[str, ...]
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]


def normalize_name(name: str) -> str:
    """The table's key for ``name``: lowercased, without a leading "/" or a trailing dot."""
    return name.strip().removeprefix("/").rstrip(".").lower()


def _checked_name(name: str) -> str:
    key = normalize_name(name)
    if not key or len(key) > MAX_NAME or not _NAME.fullmatch(key):
        raise NetdError(f"invalid DNS name {name!r} for a container")
    if any(not label or len(label) > MAX_LABEL for label in key.split(".")):
        raise NetdError(f"invalid DNS name {name!r}: empty label or label over 63 characters")
    return key


def _checked_addresses(addresses: list[str], version: int) -> tuple[str, ...]:
    out: list[str] = []
    for text in addresses:
        try:
            address = ip_address(text)
        except ValueError:
            raise NetdError(f"invalid IPv{version} address {text!r}") from None
        if address.version != version:
            raise NetdError(f"{text} is not an IPv{version} address")
        if str(address) not in out:
            out.append(str(address))
    return tuple(out)


def reverse_pointer(address: str) -> str:
    """The PTR name of an address, lowercased, without the final dot (RFC 1035 §3.5,
    RFC 3596 §2.5)."""
    return ip_address(address).reverse_pointer.lower()


class NameTable:
    """Names and aliases -> addresses for one network. Safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, ContainerRecord] = {}
        self._by_name: dict[str, list[str]] = {}  # name -> container ids, in order of joining
        self._by_pointer: dict[str, list[str]] = {}  # reverse name -> container ids

    def set(self, container_id: str, names: list[str], ipv4: list[str], ipv6: list[str]) -> None:
        """Add or replace a container's record: its names/aliases and its addresses on this
        network. Raises NetdError (and changes nothing) on an invalid name or address."""
        if not container_id:
            raise NetdError("a container record needs a container id")
        keys: list[str] = []
        for name in names:
            key = _checked_name(name)
            if key not in keys:
                keys.append(key)
        record = ContainerRecord(
            container_id,
            tuple(keys),
            _checked_addresses(ipv4, 4),
            _checked_addresses(ipv6, 6),
        )
        with self._lock:
            self._unindex(container_id)
            self._records[container_id] = record
            for key in record.names:
                self._by_name.setdefault(key, []).append(container_id)
            for address in record.ipv4 + record.ipv6:
                self._by_pointer.setdefault(reverse_pointer(address), []).append(container_id)

    def remove(self, container_id: str) -> None:
        """Forget a container; a no-op when it has no record."""
        with self._lock:
            self._unindex(container_id)

    def _unindex(self, container_id: str) -> None:
        old = self._records.pop(container_id, None)
        if old is None:
            return
        for key in old.names:
            _discard(self._by_name, key, container_id)
        for address in old.ipv4 + old.ipv6:
            _discard(self._by_pointer, reverse_pointer(address), container_id)

    def lookup(self, qname: str, qtype: str) -> list[str] | None:
        """The answers for ``qname``: addresses for "A"/"AAAA" (every container with that name
        or alias, in the order they joined), both families for "ANY", container names for
        "PTR" of a container's address, and [] for any other type of a known name (NODATA).
        None when the name is not one of this network's: the caller decides between NXDOMAIN
        and forwarding."""
        key = normalize_name(qname)
        qtype = qtype.upper()
        with self._lock:
            if qtype == "PTR":
                ids = self._by_pointer.get(key)
                if not ids:
                    return None
                return [self._records[cid].names[0] for cid in ids if self._records[cid].names]
            ids = self._by_name.get(key)
            if not ids:
                return None
            records = [self._records[cid] for cid in ids]
        if qtype == "A":
            return _unique(a for r in records for a in r.ipv4)
        if qtype == "AAAA":
            return _unique(a for r in records for a in r.ipv6)
        if qtype == "ANY":
            return _unique(a for r in records for a in r.ipv4 + r.ipv6)
        return []

    def records(self) -> list[ContainerRecord]:
        """A snapshot of every container's record (for status output and tests)."""
        with self._lock:
            return list(self._records.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


class NameLookup(Protocol):
    """What a responder answers from: NameTable.lookup's contract."""

    def lookup(self, qname: str, qtype: str) -> list[str] | None: ...


class ScopedNames:
    """The names one container resolves: the union of the tables of the networks it is on.

    ``tables`` is called on every lookup and returns those tables in the order the container
    joined the networks, so joining or leaving a network changes the answers of the very next
    query. A name no table knows is None (NXDOMAIN or forwarded); a name one table knows without
    an address of the asked family is [] (NODATA), like NameTable.lookup.
    """

    def __init__(self, tables: Callable[[], Sequence[NameTable]]) -> None:
        self._tables = tables

    def lookup(self, qname: str, qtype: str) -> list[str] | None:
        merged: list[str] | None = None
        for table in self._tables():
            found = table.lookup(qname, qtype)
            if found is not None:
                merged = found if merged is None else merged + found
        return None if merged is None else _unique(merged)


def _discard(index: dict[str, list[str]], key: str, container_id: str) -> None:
    ids = index.get(key)
    if ids is None:
        return
    if container_id in ids:
        ids.remove(container_id)
    if not ids:
        del index[key]


def _unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))

"""resolv.conf(5) both ways: the host's resolvers the responder forwards to, and the resolv.conf
a container on a user-defined network gets (the embedded responder, the host's search domains and
options), as Docker does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved's list of the real upstreams, for hosts whose resolv.conf names its stub.
RESOLVED_RESOLV_CONF = Path("/run/systemd/resolve/resolv.conf")
RESOLVED_STUB = "127.0.0.53"
EMBEDDED_DNS = "127.0.0.11"
DNS_PORT = 53


def _directives(text: str, *keywords: str) -> list[list[str]]:
    """The argument lists of the lines starting with one of ``keywords``, in order; ``#`` and
    ``;`` start comments."""
    found: list[list[str]] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0][0] in "#;":
            continue
        if fields[0] in keywords:
            args: list[str] = []
            for item in fields[1:]:
                if item[0] in "#;":
                    break
                args.append(item)
            found.append(args)
    return found


def nameservers(text: str) -> list[str]:
    """The valid ``nameserver`` addresses of a resolv.conf, in order, without duplicates
    (an IPv6 address may carry a zone, ``fe80::1%eth0``)."""
    out: list[str] = []
    for args in _directives(text, "nameserver"):
        if not args:
            continue
        try:
            ip_address(args[0])
        except ValueError:
            continue
        if args[0] not in out:
            out.append(args[0])
    return out


def host_upstreams(
    resolv_conf_text: str, systemd_resolved_upstreams: str | None = None
) -> list[tuple[str, int]]:
    """The upstreams to forward to: the host's nameservers, or, when they name
    systemd-resolved's stub 127.0.0.53, the ones resolved itself uses (the text of
    /run/systemd/resolve/resolv.conf), as Docker does. May be empty: the responder then answers
    SERVFAIL for every name that is not the network's."""
    servers = nameservers(resolv_conf_text)
    if RESOLVED_STUB in servers and systemd_resolved_upstreams is not None:
        real = nameservers(systemd_resolved_upstreams)
        if real:
            servers = real
    return [(server, DNS_PORT) for server in servers]


def load_host_upstreams(
    resolv_conf: Path = HOST_RESOLV_CONF, resolved_conf: Path = RESOLVED_RESOLV_CONF
) -> list[tuple[str, int]]:
    """host_upstreams() of the files themselves; a missing file counts as empty."""
    try:
        text = resolv_conf.read_text()
    except FileNotFoundError:
        text = ""
    try:
        resolved: str | None = resolved_conf.read_text()
    except (FileNotFoundError, NotADirectoryError):
        resolved = None
    return host_upstreams(text, resolved)


@dataclass(frozen=True)
class DnsOverrides:
    """A container's own ``--dns``, ``--dns-search`` and ``--dns-option`` (HostConfig.Dns,
    DnsSearch, DnsOptions): each, when given, replaces the host's (or the daemon's) list."""

    servers: tuple[str, ...] = ()
    search: tuple[str, ...] | None = None  # None: not given; () given as "." (no search)
    options: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls,
        servers: Sequence[str] | None,
        search: Sequence[str] | None,
        options: Sequence[str] | None,
    ) -> DnsOverrides:
        """Checked: servers are IP addresses, no entry has blanks (it would add resolv.conf
        directives of its own). Raises ValueError."""
        checked = []
        for server in servers or ():
            try:
                checked.append(str(ip_address(server)))
            except ValueError:
                raise ValueError(f"IP address is not correctly formatted: {server}") from None
        for what, values in (("search domain", search), ("DNS option", options)):
            for value in values or ():
                if not value or any(ch.isspace() or not ch.isprintable() for ch in value):
                    raise ValueError(f"invalid {what}: {value!r}")
        # moby resolvconf OverrideSearch: "." stands for no search domains at all.
        chosen = tuple(s for s in search if s != ".") if search else None
        return cls(tuple(checked), chosen, tuple(options or ()))

    def upstreams(self) -> list[tuple[str, int]] | None:
        """The embedded DNS's upstreams for the container; None: the daemon's."""
        return [(s, DNS_PORT) for s in self.servers] if self.servers else None


def _search(host_text: str, overrides: DnsOverrides) -> list[str]:
    if overrides.search is not None:
        return list(overrides.search)
    found = _directives(host_text, "search", "domain")
    # resolv.conf(5): the last search/domain line wins.
    return found[-1] if found else []


def container_resolv_conf(
    host_text: str, nameserver: str = EMBEDDED_DNS, overrides: DnsOverrides | None = None
) -> str:
    """A container's resolv.conf on a user-defined network: the embedded responder as its only
    nameserver, its ``--dns-search``/``--dns-option`` or else the host's ``search`` and
    ``options``, and ``ndots:0`` added unless those set ndots (what Docker writes)."""
    overrides = overrides or DnsOverrides()
    lines = [f"nameserver {nameserver}"]
    search = _search(host_text, overrides)
    if search:
        lines.append("search " + " ".join(search))
    options = list(overrides.options) or [
        opt for args in _directives(host_text, "options") for opt in args
    ]
    if not any(opt.startswith("ndots:") for opt in options):
        options.append("ndots:0")
    lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def host_mode_resolv_conf(host_text: str, overrides: DnsOverrides) -> str:
    """A host-network container's resolv.conf: the host's own, or with any of ``--dns``,
    ``--dns-search``, ``--dns-option`` given, those replacing the host's lists. Loopback
    nameservers stay: the container shares the host's loopback (libnetwork setupDNS only
    filters them for a namespace of its own)."""
    if not (overrides.servers or overrides.search is not None or overrides.options):
        return host_text
    return _replaced(host_text, list(overrides.servers or nameservers(host_text)), overrides)


def _replaced(host_text: str, servers: list[str], overrides: DnsOverrides) -> str:
    """``servers``, then the overrides' search domains and options, each else the host's."""
    lines = [f"nameserver {s}" for s in servers]
    search = _search(host_text, overrides)
    if search:
        lines.append("search " + " ".join(search))
    options = list(overrides.options) or [
        opt for args in _directives(host_text, "options") for opt in args
    ]
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


# Docker's fallback when the host only lists loopback resolvers (unreachable from a netns).
FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")


def _is_loopback(address: str) -> bool:
    try:
        return ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def bridge_resolv_conf(
    host_text: str, dns_servers: Sequence[str] = (), overrides: DnsOverrides | None = None
) -> str:
    """A container's resolv.conf on the default bridge (no embedded responder).

    With nothing given: the host's without its loopback nameservers, with Docker's public
    fallback when none is left. With ``dns_servers`` (the container's ``--dns``, else the
    daemon's) or ``overrides``: those servers (else the host's, filtered as above), search
    domains and options, each replacing the host's, as Docker's setupDNS does."""
    overrides = overrides or DnsOverrides()
    chosen = list(overrides.servers or dns_servers)
    if chosen or overrides.search is not None or overrides.options:
        if not chosen:
            chosen = [s for s in nameservers(host_text) if not _is_loopback(s)]
            chosen = chosen or list(FALLBACK_NAMESERVERS)
        return _replaced(host_text, chosen, overrides)
    lines = []
    servers = 0
    for line in host_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "nameserver" and len(fields) > 1:
            if _is_loopback(fields[1]):
                continue
            servers += 1
        lines.append(line)
    if servers == 0:
        lines.extend(f"nameserver {ns}" for ns in FALLBACK_NAMESERVERS)
    return "\n".join(lines) + "\n"

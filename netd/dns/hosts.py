"""A container's /etc/hosts and its ``--add-host`` entries, as Docker writes them (moby
libnetwork etchosts and sandbox_dns_unix.go): the fixed localhost/IPv6 lines, then the extra
hosts in the order given, then one line per address of the container naming its hostname (its
FQDN first when it has one, then the bare name).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address

HOST_GATEWAY = "host-gateway"
"""The ``--add-host`` address Docker replaces with the daemon's ``--host-gateway-ip``."""

HOSTS_HEADER = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)

# sethostname(2)/setdomainname(2): at most __NEW_UTS_LEN (64) bytes.
UTS_NAME_MAX = 64


@dataclass(frozen=True)
class ExtraHost:
    """One ``--add-host name:ip`` entry; ``ip`` may be HOST_GATEWAY."""

    name: str
    ip: str

    @classmethod
    def parse(cls, entry: str) -> ExtraHost:
        """Docker's ``name:ip`` (split on the first colon, so IPv6 addresses need nothing
        special; ``[v6]`` brackets are allowed). Raises ValueError with Docker's messages."""
        name, sep, ip = entry.partition(":")
        if len(ip) > 1 and ip[0] == "[" and ip[-1] == "]":
            ip = ip[1:-1]
        # A name with blanks would add names (or lines) the user did not ask for: Docker takes
        # it as it is; refusing it is stricter, never looser.
        if not sep or not name or _has_blank(name):
            raise ValueError(f"bad format for add-host: {entry!r}")
        if ip != HOST_GATEWAY:
            try:
                ip = str(ip_address(ip))
            except ValueError:
                raise ValueError(f"invalid IP address in add-host: {ip!r}") from None
        return cls(name, ip)


def _has_blank(text: str) -> bool:
    return any(ch.isspace() or not ch.isprintable() for ch in text)


def check_uts_name(value: str, what: str) -> None:
    """A hostname or domainname the kernel accepts and that fits on one hosts line."""
    if len(value.encode()) > UTS_NAME_MAX or _has_blank(value) or "#" in value:
        raise ValueError(f"invalid {what} format: {value!r}")


def own_names(hostname: str, domainname: str) -> str:
    """The names of the container's own hosts line: the FQDN (hostname, plus ``.domainname``
    when set), then the bare hostname when the FQDN has a dot."""
    fqdn = f"{hostname}.{domainname}" if domainname else hostname
    bare, dot, _ = fqdn.partition(".")
    return f"{fqdn} {bare}" if dot else fqdn


def hosts_file(
    hostname: str,
    domainname: str,
    addresses: Sequence[str],
    extra: Sequence[ExtraHost] = (),
) -> str:
    """The container's /etc/hosts; ``extra`` has its host-gateway entries resolved already."""
    lines = [f"{h.ip}\t{h.name}\n" for h in extra]
    names = own_names(hostname, domainname)
    lines += [f"{ip}\t{names}\n" for ip in addresses if ip]
    return HOSTS_HEADER + "".join(lines)

"""Command line of pyengine-proxy: docker-proxy's flags, parsed the way Go's ``flag`` package does.

Go flag syntax: ``-name value``, ``-name=value``, and ``--name`` works like ``-name``. A boolean
flag takes no separate value (``-use-listen-fd`` or ``-use-listen-fd=false``). Parsing stops at
``--`` or at the first argument that is not a flag.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from proxy.transparent import Prefix

DEFAULT_UDP_IDLE_TIMEOUT = 90.0

USAGE = (
    "usage: pyengine-proxy -proto tcp|udp -host-ip IP -host-port N "
    "-container-ip IP -container-port N [-use-listen-fd] [-udp-idle-timeout SECONDS] "
    "[-proxy-protocol v1|v2] [-host-ip2 IP -container-ip2 IP] "
    "[-transparent [-transparent-skip CIDR,...]] [-v]"
)

_BOOL_FLAGS = frozenset({"use-listen-fd", "transparent", "v", "h", "help"})
_VALUE_FLAGS = frozenset(
    {
        "proto",
        "host-ip",
        "host-port",
        "container-ip",
        "container-port",
        "udp-idle-timeout",
        "proxy-protocol",
        "host-ip2",
        "container-ip2",
        "transparent-skip",
    }
)
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
_PROXY_PROTOCOL_OFF = ("", "off", "none")
_TRUE_WORDS = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_FALSE_WORDS = frozenset({"0", "f", "F", "false", "FALSE", "False"})


class UsageError(Exception):
    """The command line is not valid; the message says why in one line."""


@dataclass(frozen=True)
class ProxyOptions:
    proto: str
    host_ip: str
    host_port: int
    container_ip: str
    container_port: int
    use_listen_fd: bool
    udp_idle_timeout: float
    proxy_protocol: str | None = None
    """"v1" or "v2": send the container a PROXY protocol header first (TCP only)."""
    host_ip2: str | None = None
    """A second listener, fd 5, on this address and the same port (pyengine's own flags
    -host-ip2 and -container-ip2, with -use-listen-fd): one proxy for both families."""
    container_ip2: str | None = None
    transparent: bool = False
    """Connect to the container from the client's address (pyengine's own -transparent;
    proxy/transparent.py)."""
    transparent_skip: tuple[str, ...] = ()
    """Clients in these networks (the container's own subnets) get the gateway behaviour."""

    def listeners(self) -> list[tuple[str, str]]:
        """(host address, container address) of each listener, in fd order (4, then 5)."""
        first = (self.host_ip, self.container_ip)
        if self.host_ip2 is None or self.container_ip2 is None:
            return [first]
        return [first, (self.host_ip2, self.container_ip2)]

    def describe(self) -> str:
        """``tcp 0.0.0.0:8080 -> 172.17.0.2:80``, used as the prefix of every log line."""
        return f"{self.proto} " + ", ".join(
            f"{_join_host_port(host, self.host_port)} -> "
            f"{_join_host_port(container, self.container_port)}"
            for host, container in self.listeners()
        )


@dataclass(frozen=True)
class ParsedCommandLine:
    """What the command line asks for: the proxy options, or only the version, or only help."""

    options: ProxyOptions | None
    show_version: bool = False
    show_help: bool = False


def parse_command_line(args: list[str]) -> ParsedCommandLine:
    """Parse ``args`` (without the program name); raise UsageError when they are not valid."""
    values = _parse_go_flags(args)
    if _flag_is_true(values, "h") or _flag_is_true(values, "help"):
        return ParsedCommandLine(options=None, show_help=True)
    if _flag_is_true(values, "v"):
        return ParsedCommandLine(options=None, show_version=True)
    return ParsedCommandLine(options=_build_options(values))


def _parse_go_flags(args: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            if i + 1 < len(args):
                raise UsageError(f"unexpected argument {args[i + 1]!r}")
            break
        if not arg.startswith("-") or arg == "-":
            raise UsageError(f"unexpected argument {arg!r}")
        name = arg[2:] if arg.startswith("--") else arg[1:]
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        if not name or name.startswith("-"):
            raise UsageError(f"bad flag syntax: {arg}")
        if name in _BOOL_FLAGS:
            if value is None:
                value = "true"
            elif value not in _TRUE_WORDS | _FALSE_WORDS:
                raise UsageError(f"invalid boolean value {value!r} for flag -{name}")
        elif name in _VALUE_FLAGS:
            if value is None:
                if i + 1 >= len(args):
                    raise UsageError(f"flag needs an argument: -{name}")
                i += 1
                value = args[i]
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        values[name] = value
        i += 1
    return values


def _flag_is_true(values: dict[str, str], name: str) -> bool:
    return values.get(name, "false") in _TRUE_WORDS


def _build_options(values: dict[str, str]) -> ProxyOptions:
    proto = values.get("proto", "tcp")
    if proto not in ("tcp", "udp"):
        raise UsageError(f"unsupported protocol {proto!r} (want tcp or udp)")
    use_listen_fd = _flag_is_true(values, "use-listen-fd")
    if "host-ip" not in values and not use_listen_fd:
        raise UsageError("flag -host-ip is required")
    host_ip = _parse_ip(values.get("host-ip", "0.0.0.0"), "host-ip")
    host_port = _parse_port(values.get("host-port", "0"), "host-port", allow_zero=use_listen_fd)
    if "container-ip" not in values:
        raise UsageError("flag -container-ip is required")
    container_ip = _parse_ip(values["container-ip"], "container-ip")
    if "container-port" not in values:
        raise UsageError("flag -container-port is required")
    container_port = _parse_port(values["container-port"], "container-port", allow_zero=False)
    udp_idle_timeout = _parse_seconds(
        values.get("udp-idle-timeout", str(DEFAULT_UDP_IDLE_TIMEOUT)), "udp-idle-timeout"
    )
    proxy_protocol = _parse_proxy_protocol(values.get("proxy-protocol", ""), proto)
    host_ip2 = container_ip2 = None
    if "host-ip2" in values or "container-ip2" in values:
        if "host-ip2" not in values or "container-ip2" not in values:
            raise UsageError("flags -host-ip2 and -container-ip2 go together")
        if not use_listen_fd:
            raise UsageError("flag -host-ip2 needs -use-listen-fd (the listener is fd 5)")
        host_ip2 = _parse_ip(values["host-ip2"], "host-ip2")
        container_ip2 = _parse_ip(values["container-ip2"], "container-ip2")
    transparent = _flag_is_true(values, "transparent")
    transparent_skip = _parse_networks(values.get("transparent-skip", ""), "transparent-skip")
    if transparent_skip and not transparent:
        raise UsageError("flag -transparent-skip needs -transparent")
    return ProxyOptions(
        proto=proto,
        host_ip=host_ip,
        host_port=host_port,
        container_ip=container_ip,
        container_port=container_port,
        use_listen_fd=use_listen_fd,
        udp_idle_timeout=udp_idle_timeout,
        proxy_protocol=proxy_protocol,
        host_ip2=host_ip2,
        container_ip2=container_ip2,
        transparent=transparent,
        transparent_skip=transparent_skip,
    )


def _parse_networks(text: str, flag: str) -> tuple[str, ...]:
    """A comma-separated list of networks (``10.0.0.0/24,fd00::/64``), canonical."""
    networks = []
    for item in filter(None, text.split(",")):
        try:
            networks.append(str(Prefix.parse(item)))
        except (OSError, ValueError):
            raise UsageError(f"invalid network {item!r} for flag -{flag}") from None
    return tuple(networks)


def _parse_proxy_protocol(text: str, proto: str) -> str | None:
    version = text.lower()
    if version in _PROXY_PROTOCOL_OFF:
        return None
    if version not in PROXY_PROTOCOL_VERSIONS:
        raise UsageError(f"invalid value {text!r} for flag -proxy-protocol (want v1 or v2)")
    if proto != "tcp":
        raise UsageError("flag -proxy-protocol is only for -proto tcp")
    return version


def _parse_ip(text: str, flag: str) -> str:
    """The address in canonical form (inet_pton(3) then inet_ntop(3)), zone kept. The
    ``ipaddress`` module would do, but costs a forked proxy a few hundred kB of pages."""
    address, _, zone = text.partition("%")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        packed = socket.inet_pton(family, address)
    except OSError:
        raise UsageError(f"invalid IP address {text!r} for flag -{flag}") from None
    if zone and family != socket.AF_INET6:
        raise UsageError(f"invalid IP address {text!r} for flag -{flag}")
    canonical = socket.inet_ntop(family, packed)
    return f"{canonical}%{zone}" if zone else canonical


def _parse_port(text: str, flag: str, *, allow_zero: bool) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise UsageError(f"invalid port {text!r} for flag -{flag}") from None
    lowest = 0 if allow_zero else 1
    if not lowest <= port <= 65535:
        raise UsageError(f"port {port} out of range for flag -{flag}")
    return port


def _parse_seconds(text: str, flag: str) -> float:
    # Accept a Go duration written in seconds ("90s") as well as a bare number.
    number = text[:-1] if text.endswith("s") else text
    try:
        seconds = float(number)
    except ValueError:
        raise UsageError(f"invalid duration {text!r} for flag -{flag}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"duration for flag -{flag} must be a positive number of seconds")
    return seconds


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

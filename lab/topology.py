"""The lab's kernel objects outside the daemons: the checks that its subnets, names and ports
are free, and the client namespace with the veth pair that joins it to the engine host."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import socket
from collections.abc import Callable
from pathlib import Path

from lab.commands import check, run, say
from lab.plan import ClientLink, LabError


def _host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """Every IPv4 route and address of the host, with where it comes from."""
    found: list[tuple[ipaddress.IPv4Network, str]] = []
    for route in json.loads(check(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                net = ipaddress.IPv4Network(dst, strict=False)
                found.append((net, f"route {dst} dev {route.get('dev', '?')}"))
    for link in json.loads(check(["ip", "-j", "-4", "addr"]) or "[]"):
        for addr in link.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
            found.append((net, f"address {addr['local']} on {link.get('ifname', '?')}"))
    return found


def check_free_subnets(subnets: dict[str, ipaddress.IPv4Network]) -> None:
    names = list(subnets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if subnets[a].overlaps(subnets[b]):
                raise LabError(f"{a} {subnets[a]} overlaps {b} {subnets[b]}")
    for what, net in subnets.items():
        for used, where in _host_networks():
            if net.overlaps(used):
                raise LabError(f"{what} {net} overlaps the host's {where}; choose another")


def check_free_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As netd reserves ports: connections in TIME_WAIT on the port do not block it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LabError(f"host port {port} is in use; choose another") from None
            raise LabError(f"cannot bind host port {port}: {exc.strerror}") from None


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def create_client(link: ClientLink, routes: list[str], echo: Callable[[str], None]) -> None:
    say(echo, ["ip", "netns", "add", link.netns])
    say(
        echo,
        ["ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ifname]
        + ["netns", link.netns],
    )
    say(echo, ["ip", "addr", "add", f"{link.host_ip}/{link.prefixlen}", "dev", link.host_if])
    say(echo, ["ip", "link", "set", link.host_if, "up"])
    inside = ["ip", "-n", link.netns]
    say(echo, [*inside, "link", "set", "lo", "up"])
    say(echo, [*inside, "addr", "add", f"{link.client_ip}/{link.prefixlen}", "dev", link.ifname])
    say(echo, [*inside, "link", "set", link.ifname, "up"])
    # As a LAN host whose router is the engine host: the bridges are reachable, nothing else.
    for subnet in routes:
        say(echo, [*inside, "route", "add", subnet, "via", link.host_ip])


def delete_client(link: ClientLink) -> None:
    if link_exists(link.host_if):
        run(["ip", "link", "del", link.host_if])
    if netns_exists(link.netns):
        run(["ip", "netns", "del", link.netns])

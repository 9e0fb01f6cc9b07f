"""The return path of transparent proxying: the policy routing half.

A proxy in transparent mode connects to a container from the client's address
(proxy/transparent.py). The container answers that address through its gateway, this host,
which would forward the answer to the client. The firewall backends mark the packets that come
in from a bridge and belong to a transparent socket (``socket transparent 1`` in nftables,
``-m socket --transparent`` in iptables, reply direction only so that a container's own
connections never pay the socket lookup); this module routes marked packets to the local stack:

    ip rule add fwmark MARK/MARK lookup TABLE priority PRIORITY      (IPv4 and IPv6)
    ip route add local default dev lo table TABLE                      (IPv4 and IPv6)

(the kernel's Documentation/networking/tproxy.rst, "Making non-local sockets work"). Local
delivery then finds the proxy's socket by its address and ports.

It is installed while any published port is in transparent mode (the controller syncs it with
the firewall) and removed when the last one goes and on teardown. It is recognised by its mark,
table and priority (``NetdConfig.transparent_*``, one set per daemon): a rule or route that
differs in any of them is not ours and is never touched.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netd.errors import NetdError

log = logging.getLogger(__name__)

_FAMILIES = ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0"))
_RTN_LOCAL = 2  # rtnetlink(7): route type "local"
_RT_SCOPE_HOST = 254


@dataclass(frozen=True)
class ReturnPath:
    mark: int  # the firewall sets these bits (and matches them with an equal mask)
    table: int
    priority: int

    def __post_init__(self) -> None:
        if not 0 < self.mark < 2**32:
            raise NetdError(f"invalid transparent proxy mark {self.mark:#x}")
        if not 0 < self.table < 2**32 or self.table in (253, 254, 255):
            raise NetdError(f"invalid transparent proxy routing table {self.table}")
        if not 0 < self.priority < 32766:
            raise NetdError(
                f"invalid transparent proxy rule priority {self.priority} (want 1-32765)"
            )

    def install(self) -> None:
        """Add the rule and the route in both families (those present already are kept)."""
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for family, default in _FAMILIES:
                try:
                    if not self._rules(ipr, family):
                        ipr.rule(
                            "add",
                            family=family,
                            table=self.table,
                            priority=self.priority,
                            fwmark=self.mark,
                            fwmask=self.mark,
                        )
                    if not self._routes(ipr, family):
                        ipr.route(
                            "add",
                            family=family,
                            dst=default,
                            type="local",
                            scope=_RT_SCOPE_HOST,  # what a local route must have (IPv4)
                            oif=lo,
                            table=self.table,
                        )
                except NetlinkError as exc:
                    if family == socket.AF_INET6 and exc.code == errno.EAFNOSUPPORT:
                        continue  # IPv6 is off in this kernel
                    raise NetdError(f"cannot install the transparent proxy route: {exc}") from exc

    def remove(self) -> None:
        """Delete our rules and routes; others' are left alone."""
        with IPRoute() as ipr:
            for family, _default in _FAMILIES:
                try:
                    for _rule in self._rules(ipr, family):
                        ipr.rule(
                            "del",
                            family=family,
                            table=self.table,
                            priority=self.priority,
                            fwmark=self.mark,
                            fwmask=self.mark,
                        )
                    for route in self._routes(ipr, family):
                        ipr.route("del", family=family, **_route_key(route, self.table))
                except NetlinkError as exc:
                    if exc.code in (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT):
                        continue
                    log.warning("cannot remove the transparent proxy route: %s", exc)

    def installed(self) -> list[str]:
        """Our rules and routes as they are now, one line each (for tests and status)."""
        found = []
        with IPRoute() as ipr:
            for family, default in _FAMILIES:
                v = 6 if family == socket.AF_INET6 else 4
                found += [f"ipv{v} rule fwmark {self.mark:#x}" for _ in self._rules(ipr, family)]
                found += [
                    f"ipv{v} local {default} table {self.table}" for _ in self._routes(ipr, family)
                ]
        return found

    def _rules(self, ipr: IPRoute, family: int) -> list[object]:
        out = []
        for rule in ipr.get_rules(family=family):
            if (
                rule.get_attr("FRA_PRIORITY") == self.priority
                and rule.get_attr("FRA_FWMARK") == self.mark
                and rule.get_attr("FRA_FWMASK") == self.mark
                and (rule.get_attr("FRA_TABLE") or rule["table"]) == self.table
            ):
                out.append(rule)
        return out

    def _routes(self, ipr: IPRoute, family: int) -> list[object]:
        try:
            routes = ipr.get_routes(family=family, table=self.table)
        except NetlinkError:
            return []
        return [
            r
            for r in routes
            if r["type"] == _RTN_LOCAL
            and r["dst_len"] == 0
            and (r.get_attr("RTA_TABLE") or r["table"]) == self.table
        ]


def _route_key(route: object, table: int) -> dict[str, object]:
    oif = route.get_attr("RTA_OIF")  # type: ignore[attr-defined]
    default = "::/0" if route["family"] == socket.AF_INET6 else "0.0.0.0/0"  # type: ignore[index]
    scope = route["scope"]  # type: ignore[index]
    return {"dst": default, "type": "local", "scope": scope, "oif": oif, "table": table}

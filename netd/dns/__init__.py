"""The embedded DNS responder of user-defined networks: container names and aliases answered
from a per-network NameTable, the rest forwarded to the host's resolvers."""

from netd.dns.records import NameTable
from netd.dns.resolvconf import container_resolv_conf, host_upstreams, load_host_upstreams
from netd.dns.server import DnsResponder

__all__ = [
    "DnsResponder",
    "NameTable",
    "container_resolv_conf",
    "host_upstreams",
    "load_host_upstreams",
]

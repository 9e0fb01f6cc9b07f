"""The facade the daemon uses: bridge networks (the default one and user-defined ones),
container endpoints on them, and published ports.

A container has one sandbox (a network namespace, made by its first ``connect``) and one
endpoint per network it is connected to: ``eth0`` on the first, ``eth1``... on the next ones.
Its default route goes through the gateway of its first endpoint on a non-internal network.
Ports are published for one endpoint and DNATed to that endpoint's address (Docker publishes on
the network the container was created with: the engine passes the container's first
endpoint); disconnecting that endpoint unpublishes them.

Order of operations when publishing follows Docker 28 (port reservation before NAT rules): bind
every host port first, then add every NAT mapping in one firewall transaction, so a failure at
either step leaves no rule and no socket behind, and no connection is accepted before its DNAT
rule exists.

Crash safety: every change is recorded in the state file (netd/state.py) before the kernel is
touched, with a lifecycle mark, and the firewall is always rebuilt from the state by
``setup()``; so the next ``setup()`` after a crash rolls back what was being created, finishes
what was being removed, and recreates what live endpoints need (see ``setup``).

The pyroute2 calls are synchronous and start their own helper processes: from asyncio code,
call the controller in a worker thread (``asyncio.to_thread``). Methods are serialised by a lock.
"""

from __future__ import annotations

from netd.control.base import (
    ENDPOINTS_FILE,
    IPAM_FILE,
    NETWORK_FILE,
    STATE_DIR,
    NetdConfig,
)
from netd.control.recovery import Recovery
from netd.errors import Conflict, Forbidden, NetdError, NotFound
from netd.network import Network
from netd.state import Endpoint, PublishedPort, Sandbox

__all__ = [
    "ENDPOINTS_FILE",
    "IPAM_FILE",
    "NETWORK_FILE",
    "STATE_DIR",
    "Conflict",
    "Endpoint",
    "Forbidden",
    "NetdConfig",
    "NetdError",
    "Network",
    "NetworkController",
    "NotFound",
    "PublishedPort",
    "Sandbox",
]


class NetworkController(Recovery):
    """netd's one entry point: networks (netd/control/networks.py), published ports (ports.py),
    endpoints (endpoints.py) and setup/teardown (recovery.py) over one state and one lock."""

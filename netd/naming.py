"""Names and addresses netd derives from a container id or an IP, so they can be recomputed
after a crash to find leftovers."""

from __future__ import annotations

import hashlib
import re
from ipaddress import IPv4Address

# Every pyengine bridge, whichever daemon made it, is in this interface group (ip-link(8)
# "group"), so a daemon's forward drop (netd/forwarding.py) can let the bridges of other pyengine
# daemons on the host through by "meta iifgroup"/"oifgroup" without knowing their names.
BRIDGE_GROUP = 4747

IFNAMSIZ = 16  # including the trailing NUL (<linux/if.h>)
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_HEX = re.compile(r"^[0-9a-f]+$")


def valid_ifname(name: str) -> bool:
    return bool(_IFNAME.fullmatch(name))


def netns_name(prefix: str, container_id: str) -> str:
    """``pyengine-<first 12 of id>``: the file /run/netns/<name> holds the namespace."""
    return f"{prefix}{container_id[:12]}"


def host_veth_name(container_id: str, index: int = 0) -> str:
    """The host end of the container's ``eth<index>``: ``pye<10 hex>``.

    For ``eth0`` the hex digits are the id's first 10 (a hash of the id when it is not hex), as
    ``ip link`` users know them from Docker's ``veth<7 hex>``; for ``eth1``... a hash of the id
    and the index, so every name can be recomputed from the container id alone.
    """
    digits = container_id[:10].lower()
    if index == 0:
        if len(digits) < 10 or not _HEX.fullmatch(digits):
            digits = hashlib.sha256(container_id.encode()).hexdigest()[:10]
    else:
        digits = hashlib.sha256(f"{container_id}/eth{index}".encode()).hexdigest()[:10]
    return f"pye{digits}"


def container_ifname(index: int) -> str:
    return f"eth{index}"


def bridge_name_for(network_id: str) -> str:
    """``pyebr-<first 9 of the id>``: Docker's ``br-<12>`` with our prefix, which makes leaks
    visible; 9 digits because a name holds at most 15 characters (IFNAMSIZ)."""
    return f"pyebr-{network_id[:9]}"


def mac_for_ip(addr: IPv4Address) -> str:
    """A locally administered unicast MAC (02:...) carrying the IPv4 address, as Docker does,
    so an address always maps to the same MAC and neighbours' ARP caches stay right."""
    return "02:42:" + ":".join(f"{b:02x}" for b in addr.packed)

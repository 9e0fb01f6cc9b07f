"""MAC addresses a client asks for (``--mac-address``): checked and written one way."""

from __future__ import annotations

import re

_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2}){4}$")


def parse_mac(text: str) -> str:
    """``text`` as lower-case ``aa:bb:cc:dd:ee:ff``; ValueError unless it is a well-formed
    48-bit unicast address (a group address, the least significant bit of the first octet
    set, cannot be an interface's: IEEE 802-2014 8.2.2) other than all zeros."""
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        raise ValueError(f"{text} is not a valid mac address")
    octets = [int(part, 16) for part in re.split("[:-]", text)]
    if octets[0] & 1:
        raise ValueError(f"{text} is not a unicast mac address")
    if not any(octets):
        raise ValueError(f"{text} is not a valid mac address (all zeros)")
    return ":".join(f"{o:02x}" for o in octets)

"""Whether pyengined made the host a router, and so drops the forwarded traffic that is not its
own.

Containers need ``net.ipv4.ip_forward=1``, which makes the host route between all of its
interfaces, not only to and from the bridges. Docker therefore sets the filter FORWARD policy
to DROP when it turns forwarding on itself (moby#14041, libnetwork#1526; opt-out
``--ip-forward-no-drop`` since Docker 28) and leaves the policy alone when forwarding was on
already: then someone else decided that the host routes. pyengine does the same; the firewall
backends implement the drop (netd/firewall/__init__.py, ``forward_drop``).

ip_forward stays on when pyengined stops, as with Docker (another user of forwarding may have
appeared meanwhile), so the fact that pyengine turned it on is kept in
``<data_root>/network/forwarding.json``, which outlives the daemon: the next start finds
forwarding on and still drops. The record is written before the sysctl, so a crash between the
two errs on the side of dropping.
"""

from __future__ import annotations

from pathlib import Path

from common.jsonstate import read_json, write_json_atomic
from netd import sysctl

FORWARDING_FILE = "forwarding.json"


def setup(state_dir: Path, ip_forward: bool, no_drop: bool) -> bool:
    """Turn IPv4 forwarding on unless ``ip_forward`` is False (Docker's ``--ip-forward=false``:
    leave it as it is). True when the forwarded traffic that is not pyengine's must be
    dropped: pyengine turned forwarding on, now or before, and ``no_drop`` is False."""
    if not ip_forward:
        return False
    path = state_dir / FORWARDING_FILE
    try:
        record = read_json(path, None)
    except (OSError, ValueError):
        record = {"enabled_by_pyengine": True}  # unreadable: err on the side of dropping
    ours = isinstance(record, dict) and record.get("enabled_by_pyengine") is True
    if not sysctl.ip_forward_enabled():
        if not ours:
            write_json_atomic(path, {"enabled_by_pyengine": True})
            ours = True
        sysctl.enable_ip_forward()
    return ours and not no_drop

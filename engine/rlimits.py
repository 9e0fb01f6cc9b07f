"""The daemon's own resource limits."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

log = logging.getLogger(__name__)

# Docker's systemd unit gives dockerd LimitNOFILE=infinity, which systemd caps at fs.nr_open
# (1,048,576 by default); a pyengined started from a shell inherits the shell's hard limit,
# often far lower (here 20,000), which 10,000 ports in proxy mode pass: per port, netd's
# reservation and the supervisor's copy of each family's socket, and the proxy's pidfd.
NOFILE_TARGET = 1048576
_NR_OPEN = Path("/proc/sys/fs/nr_open")


def nofile_target() -> int:
    try:
        return min(NOFILE_TARGET, int(_NR_OPEN.read_text()))
    except (OSError, ValueError):
        return NOFILE_TARGET


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE, and the hard one when this process may
    (CAP_SYS_RESOURCE, setrlimit(2)), to dockerd's 1,048,576 (at most fs.nr_open); else the
    soft limit to the hard one, as dockerd and containerd do at start. Returns the new soft
    limit; a limit that cannot be raised is logged and left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = nofile_target()
    if hard == resource.RLIM_INFINITY or (soft == hard and hard >= target):
        return soft
    if hard < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (OSError, ValueError):
            pass  # not privileged: the hard limit stays, and so does the operator's choice
    if soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard

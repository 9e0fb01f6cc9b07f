"""The daemon's own resource limits."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as dockerd and containerd do at start
    (getrlimit(2)): the soft limit of a login shell (often 1,024) is far below what the proxies'
    sockets, the embedded DNS and the API's connections need together. Returns the new soft
    limit; a limit that cannot be raised is logged and left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard

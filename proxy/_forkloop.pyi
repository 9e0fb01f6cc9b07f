# The C extension proxy/_forkloop.c.
HEADER_MAGIC: int
MAX_FDS: int
FLAG_OUTLIVE_PARENT: int
FLAG_IDLE_HERE: int
FLAG_UDP: int
FLAG_SECOND_LISTENER: int

def serve(control_fd: int, /) -> tuple[bytes, bool] | None:
    """None in the server (the supervisor has gone), (payload, ready) in a forked proxy."""

LIFELINE_FD: int

def serve_host(listen_fd: int, idle_seconds: int, /) -> tuple[bytes, bool] | None:
    """None in the host server once idle, (payload, ready) in a forked proxy."""

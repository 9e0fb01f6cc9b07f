# The C extension proxy/_forkloop.c.
HEADER_MAGIC: int
MAX_FDS: int
FLAG_OUTLIVE_PARENT: int
FLAG_IDLE_HERE: int
FLAG_UDP: int
FLAG_SECOND_LISTENER: int

def serve(control_fd: int, /) -> tuple[bytes, bool] | None:
    """None in the server (the supervisor has gone), (payload, ready) in a forked proxy."""

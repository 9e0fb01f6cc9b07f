"""The client: the ``pyengine`` command. It speaks HTTP to the daemon's socket and imports nothing
of the daemon's (engine, netd, proxy); the shared base (common) is all it shares."""

"""common: the base engine, netd and proxy share. No kernel code: atomic JSON state and times."""

"""The runtime: the OCI bundle and rootfs, one monitor process per container around runc, the
json-file log."""

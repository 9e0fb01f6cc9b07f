"""Volumes: the local driver's store, mount requests and copy-up."""

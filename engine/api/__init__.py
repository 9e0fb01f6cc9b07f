"""The Docker Engine API: one module per resource, one error mapping (common.py)."""

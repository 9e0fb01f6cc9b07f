"""Moved to common.jsonstate; these names stay here until the last importer is switched."""

from common.jsonstate import (
    DIR_MODE,
    FILE_MODE,
    CorruptRecord,
    read_json,
    read_record,
    set_aside,
    write_json_atomic,
)

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "CorruptRecord",
    "read_json",
    "read_record",
    "set_aside",
    "write_json_atomic",
]

"""``pyengine-cni``: the entry point a runtime executes (CNI SPEC.md, "Protocol parameters").

It imports only the standard library and the plugin's parsing until the command needs netd
(VERSION and a bad configuration answer without it): it runs once per ADD and DEL.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, BinaryIO, TextIO

from netd.cni.config import (
    MAX_CONFIG_BYTES,
    Invocation,
    parse_config,
    parse_environment,
    read_config,
)
from netd.cni.errors import INTERNAL, OPERATION_FAILED, CniError
from netd.cni.versions import PRIMARY_VERSION, SUPPORTED_VERSIONS


def _reply_version(raw: dict[str, Any] | None) -> str:
    """The version to answer in: the configuration's when it is one we speak."""
    version = (raw or {}).get("cniVersion")
    return (
        version if isinstance(version, str) and version in SUPPORTED_VERSIONS else PRIMARY_VERSION
    )


def _write(out: TextIO, data: dict[str, Any]) -> None:
    out.write(json.dumps(data))
    out.write("\n")
    out.flush()


def execute(env: dict[str, str], stdin: BinaryIO, out: TextIO) -> int:
    """One invocation; the exit status."""
    raw: dict[str, Any] | None = None
    try:
        inv: Invocation = parse_environment(env)
        data = stdin.read(MAX_CONFIG_BYTES + 1)
        if inv.command == "VERSION":
            if data.strip():
                raw = read_config(data)
            _write(
                out,
                {"cniVersion": _reply_version(raw), "supportedVersions": list(SUPPORTED_VERSIONS)},
            )
            return 0
        raw = read_config(data)
        conf = parse_config(raw)
        from netd.cni.commands import run  # netd: pyroute2, nftables

        result = run(inv, conf)
    except CniError as err:
        _write(out, err.to_json(_reply_version(raw)))
        return 1
    except Exception as exc:  # anything else is still answered in the spec's shape
        from netd.errors import NetdError

        code = OPERATION_FAILED if isinstance(exc, NetdError) else INTERNAL
        failure = CniError(code, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _write(out, failure.to_json(_reply_version(raw)))
        return 1
    if result is not None:
        _write(out, result)
    return 0


def main() -> None:
    sys.exit(execute(dict(os.environ), sys.stdin.buffer, sys.stdout))


if __name__ == "__main__":
    main()

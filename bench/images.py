"""Server images for the benchmark, built offline the way engine.images.build builds nginx.

    python -m bench.images iperf3 --out /var/cache/pyengine/images/iperf3-oci.tar

The rootfs comes from Debian's own packages through mmdebstrap (``--variant=essential`` plus
iperf3); the OCI archive is written by ``engine.images.build.write_oci_archive``, so builds are
reproducible in the same way (SOURCE_DATE_EPOCH, fixed gzip header, sorted members).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.reference import normalize
from engine.images.build import (
    DEFAULT_PATH_ENV,
    DEFAULT_SUITE,
    ImageBuildError,
    build_debian_image,
)

IPERF3_PORT = 5201
IPERF3_CONFIG: dict[str, Any] = {
    "Cmd": ["iperf3", "-s", "-p", str(IPERF3_PORT)],
    "Env": [DEFAULT_PATH_ENV],
    "ExposedPorts": {f"{IPERF3_PORT}/tcp": {}, f"{IPERF3_PORT}/udp": {}},
    "WorkingDir": "/",
}
BUILD_TIMEOUT_SECONDS = 900


def build_iperf3_image(
    out: Path,
    ref: str = "iperf3:latest",
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    verbose: bool = False,
) -> None:
    """Write the iperf3 image archive to ``out`` (mirror None: the host's apt sources)."""
    build_debian_image(
        out,
        ["iperf3"],
        IPERF3_CONFIG,
        ref,
        suite,
        mirror,
        verbose=verbose,
        timeout=BUILD_TIMEOUT_SECONDS,
    )


BUILDERS = {"iperf3": build_iperf3_image}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.images", description="Build a benchmark server image offline."
    )
    parser.add_argument("image", choices=sorted(BUILDERS))
    parser.add_argument("--out", type=Path, required=True, help="the OCI archive to write")
    parser.add_argument("--tag", help="reference to record (default: IMAGE:latest)")
    parser.add_argument("--suite", default=DEFAULT_SUITE, help="Debian suite")
    parser.add_argument("--mirror", help="mmdebstrap mirror or sources file")
    parser.add_argument("--verbose", action="store_true", help="show mmdebstrap's output")
    args = parser.parse_args(argv)
    ref = args.tag or f"{args.image}:latest"
    try:
        BUILDERS[args.image](args.out, ref, args.suite, args.mirror, args.verbose)
    except (ImageBuildError, ValueError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bench.images: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {normalize(ref)} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

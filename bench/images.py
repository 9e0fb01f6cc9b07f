"""Server images for the benchmark, built offline the way engine.imagebuild builds nginx.

    python -m bench.images iperf3 --out /var/cache/pyengine/images/iperf3-oci.tar

The rootfs comes from Debian's own packages through mmdebstrap (``--variant=essential`` plus
iperf3); the OCI archive is written by ``engine.imagebuild.write_oci_archive``, so builds are
reproducible in the same way (SOURCE_DATE_EPOCH, fixed gzip header, sorted members).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.imagebuild import (
    DEFAULT_PATH_ENV,
    DEFAULT_SUITE,
    MERGED_USR_HOOKS,
    ImageBuildError,
    default_mirror,
    rfc3339,
    source_date_epoch,
    write_oci_archive,
)
from engine.reference import normalize

IPERF3_PORT = 5201
IPERF3_CONFIG: dict[str, Any] = {
    "Cmd": ["iperf3", "-s", "-p", str(IPERF3_PORT)],
    "Env": [DEFAULT_PATH_ENV],
    "ExposedPorts": {f"{IPERF3_PORT}/tcp": {}, f"{IPERF3_PORT}/udp": {}},
    "WorkingDir": "/",
}
BUILD_TIMEOUT_SECONDS = 900


def iperf3_mmdebstrap_command(out_tar: Path, suite: str, mirror: str | None) -> list[str]:
    """A slim Debian rootfs holding iperf3 and what it links against."""
    command = [
        "mmdebstrap",
        "--variant=essential",
        "--include=iperf3",
        f"--hook-dir={MERGED_USR_HOOKS}",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--skip=output/dev",
        suite,
        str(out_tar),
    ]
    if mirror:
        command.append(mirror)
    return command


def write_iperf3_rootfs(
    out_tar: Path, suite: str, mirror: str | None, epoch: int, verbose: bool = False
) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    if not MERGED_USR_HOOKS.is_dir():
        raise ImageBuildError(f"{MERGED_USR_HOOKS} is missing (mmdebstrap too old?)")
    result = subprocess.run(
        iperf3_mmdebstrap_command(out_tar, suite, mirror),
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
        stdin=subprocess.DEVNULL,
        stdout=None if verbose else subprocess.PIPE,
        stderr=None if verbose else subprocess.STDOUT,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    if result.returncode != 0:
        tail = (result.stdout or "").strip().splitlines()[-1:] or ["see its output"]
        raise ImageBuildError(f"mmdebstrap failed with status {result.returncode}: {tail[0]}")


def build_iperf3_image(
    out: Path,
    ref: str = "iperf3:latest",
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    verbose: bool = False,
) -> None:
    """Write the iperf3 image archive to ``out`` (mirror None: the host's apt sources)."""
    epoch = source_date_epoch()
    mirror = mirror or default_mirror()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pyengine-rootfs-", dir=out.parent) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        write_iperf3_rootfs(rootfs, suite, mirror, epoch, verbose)
        write_oci_archive(
            rootfs,
            IPERF3_CONFIG,
            ref,
            out,
            rfc3339(epoch),
            f"mmdebstrap --variant=essential --include=iperf3 {suite}",
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

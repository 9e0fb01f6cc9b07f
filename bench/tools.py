"""The external programs the benchmark drives, their versions, and the machine's description."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

APT_INSTALL = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"]
# docker-proxy lives in /usr/sbin, which a non-login root shell may not have on PATH.
EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")


@dataclass(frozen=True)
class Tool:
    name: str
    apt_package: str
    purpose: str


TOOLS = (
    Tool("iperf3", "iperf3", "TCP/UDP throughput client"),
    Tool("wrk", "wrk", "HTTP load generator"),
    Tool("docker-proxy", "docker.io", "Docker's userland proxy, the anchor"),
    Tool("socat", "socat", "the naive proxy"),
    Tool("runc", "runc", "runs the server containers"),
    Tool("nft", "nftables", "reads pyengined's table"),
    Tool("ip", "iproute2", "namespaces and veths"),
)
# Only needed when an image archive has to be built first.
IMAGE_BUILD_TOOLS = (Tool("mmdebstrap", "mmdebstrap", "builds the nginx and iperf3 images"),)


class MissingTool(Exception):
    """A program the benchmark needs is not installed; the message says how to get it."""


def which(name: str, search_path: str | None = None) -> str | None:
    path = search_path if search_path is not None else os.environ.get("PATH", "")
    return shutil.which(name, path=os.pathsep.join([path, *EXTRA_PATH]) if path else None)


def find_tools(
    tools: tuple[Tool, ...] = TOOLS, install: bool = False, search_path: str | None = None
) -> dict[str, str]:
    """Path of every tool; with ``install`` missing Debian packages are installed first.

    Raises MissingTool naming each missing program and its package.
    """
    missing = [t for t in tools if which(t.name, search_path) is None]
    if missing and install:
        packages = sorted({t.apt_package for t in missing})
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(
            [*APT_INSTALL, *packages], env=env, capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MissingTool(f"apt-get install {' '.join(packages)} failed: {tail[0]}")
        missing = [t for t in tools if which(t.name, search_path) is None]
    if missing:
        names = ", ".join(
            f"{t.name} ({t.purpose}; Debian package {t.apt_package})" for t in missing
        )
        to_install = " ".join(sorted({t.apt_package for t in missing}))
        raise MissingTool(
            f"missing: {names}. Install with: apt-get install {to_install} "
            "(or run pyengine-bench with --install-missing)"
        )
    found: dict[str, str] = {}
    for t in tools:
        path = which(t.name, search_path)
        assert path is not None
        found[t.name] = path
    return found


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingTool(
            "missing: the Python package matplotlib (plots). Install with: "
            f"{sys.executable} -m pip install matplotlib  (pyengine's 'bench' extra)"
        ) from None


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _debian_version(package: str) -> str:
    out = _first_line(["dpkg-query", "-W", "-f=${Version}", package])
    return out if out and "no packages" not in out else "unknown"


def tool_versions(paths: dict[str, str]) -> dict[str, str]:
    versions = {
        "iperf3": _first_line([paths["iperf3"], "--version"]),
        "wrk": re.sub(r"\s+Copyright.*", "", _first_line([paths["wrk"], "--version"])),
        "docker-proxy": f"docker.io {_debian_version('docker.io')} (Debian package)",
        "socat": _debian_version("socat"),
        "runc": _first_line([paths["runc"], "--version"]),
        "nft": _first_line([paths["nft"], "--version"]),
        "python": platform.python_version(),
    }
    for dist in ("pyengine", "uvloop", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _cgroup_layout() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    if Path("/sys/fs/cgroup/unified").is_dir():
        return "v1 hybrid"
    return "v1"


def machine_description() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count() or 0,
        "memory_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "os": _os_release(),
        "cgroup": _cgroup_layout(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }

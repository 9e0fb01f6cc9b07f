"""``/_ping``, ``/version`` and ``/info``: what clients ask before anything else.

Clients negotiate the API version through ``/_ping``'s ``Api-Version`` header (the docker CLI 28
negotiates down to 1.47 that way; docker 29's CLI needs at least 1.44); docker-py reads
``ApiVersion`` from ``/version``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from common.timefmt import local_rfc3339
from engine.api.common import json_response
from engine.api.version import API_VERSION, MIN_API_VERSION, V1_42, V1_44, api_version
from engine.lifecycle.engine import Engine
from engine.runtime.resources import swap_accounting

ENGINE_VERSION = "0.1.0"
INSECURE_REGISTRY_CIDRS = ["127.0.0.0/8"]


def machine_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _os_release() -> dict[str, str]:
    out = {}
    for line in _read("/etc/os-release").splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out[key] = value.strip().strip('"')
    return out


def _mem_total() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


class SystemApi:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._runc_version: str | None = None

    async def runc_version(self) -> str:
        """``runc --version``'s first line's last word, asked once."""
        if self._runc_version is None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.engine.cfg.runc,
                    "--version",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                out, _ = await asyncio.wait_for(proc.communicate(), 10)
                first = out.decode(errors="replace").splitlines()
                self._runc_version = first[0].split()[-1] if first and first[0] else ""
            except (OSError, TimeoutError):
                self._runc_version = ""
        return self._runc_version

    async def ping(self, request: web.Request) -> web.Response:
        headers = {
            "Api-Version": str(API_VERSION),
            "Docker-Experimental": "false",
            "Swarm": "inactive",  # unversioned since 1.42
            "Ostype": "linux",
            "Cache-Control": "no-cache, no-store, must-revalidate",
            "Pragma": "no-cache",
        }
        body = "" if request.method == "HEAD" else "OK"
        return web.Response(text=body, headers=headers, content_type="text/plain")

    async def version(self, request: web.Request) -> web.Response:
        details = {
            "ApiVersion": str(API_VERSION),
            "Arch": machine_arch(),
            "BuildTime": "",
            "Experimental": "false",
            "GitCommit": "",
            "GoVersion": f"python{platform.python_version()}",
            "KernelVersion": platform.release(),
            "MinAPIVersion": str(MIN_API_VERSION),
            "Os": "linux",
        }
        components: list[dict[str, Any]] = [
            {"Name": "Engine", "Version": ENGINE_VERSION, "Details": details}
        ]
        runc = await self.runc_version()
        if runc:
            components.append({"Name": "runc", "Version": runc, "Details": {"GitCommit": ""}})
        return json_response(
            {
                "Platform": {"Name": "pyengine"},
                "Components": components,
                "Version": ENGINE_VERSION,
                "ApiVersion": str(API_VERSION),
                "MinAPIVersion": str(MIN_API_VERSION),
                "GitCommit": "",
                "GoVersion": details["GoVersion"],
                "Os": "linux",
                "Arch": machine_arch(),
                "KernelVersion": platform.release(),
                "BuildTime": "",
            }
        )

    async def info(self, request: web.Request) -> web.Response:
        containers = self.engine.containers.all()
        images = await asyncio.to_thread(self.engine.images.list)
        running = sum(1 for c in containers if c.state.running)
        os_release = _os_release()
        data_root = str(self.engine.cfg.data_root)
        daemon_id = hashlib.sha256(f"pyengined {data_root}".encode()).hexdigest()[:48].upper()
        cgroup_v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        version = api_version(request)
        info: dict[str, Any] = {
            "ID": ":".join(daemon_id[i : i + 4] for i in range(0, 48, 4)),
            "Containers": len(containers),
            "ContainersRunning": running,
            "ContainersPaused": 0,
            "ContainersStopped": len(containers) - running,
            "Images": len(images),
            "Driver": "overlay2",
            "DriverStatus": [],
            "Plugins": {
                "Volume": [],
                "Network": ["bridge"],
                "Authorization": None,
                "Log": ["json-file"],
            },
            # The limits pyengined enforces (engine/runtime/resources.py).
            "MemoryLimit": True,
            "SwapLimit": swap_accounting(),
            "KernelMemory": False,
            "KernelMemoryTCP": False,
            "CpuCfsPeriod": True,
            "CpuCfsQuota": True,
            "CPUShares": True,
            "CPUSet": True,
            "PidsLimit": True,
            "OomKillDisable": not cgroup_v2,
            "IPv4Forwarding": _read("/proc/sys/net/ipv4/ip_forward") == "1",
            "BridgeNfIptables": _read("/proc/sys/net/bridge/bridge-nf-call-iptables") == "1",
            "BridgeNfIp6tables": _read("/proc/sys/net/bridge/bridge-nf-call-ip6tables") == "1",
            "Debug": False,
            "NFd": len(os.listdir("/proc/self/fd")),
            "NGoroutines": len(asyncio.all_tasks()),
            "SystemTime": local_rfc3339(),
            "LoggingDriver": "json-file",
            "CgroupDriver": "cgroupfs",
            "CgroupVersion": "2" if cgroup_v2 else "1",
            "NEventsListener": 0,
            "KernelVersion": platform.release(),
            "OperatingSystem": os_release.get("PRETTY_NAME", "Linux"),
            "OSVersion": os_release.get("VERSION_ID", ""),
            "OSType": "linux",
            "Architecture": platform.machine(),
            "IndexServerAddress": "https://index.docker.io/v1/",
            "RegistryConfig": {
                "AllowNondistributableArtifactsCIDRs": [],
                "AllowNondistributableArtifactsHostnames": [],
                "InsecureRegistryCIDRs": INSECURE_REGISTRY_CIDRS,
                "IndexConfigs": {
                    "docker.io": {
                        "Name": "docker.io",
                        "Mirrors": [],
                        "Secure": True,
                        "Official": True,
                    }
                },
                "Mirrors": [],
            },
            "NCPU": os.cpu_count() or 1,
            "MemTotal": _mem_total(),
            "GenericResources": None,
            "DockerRootDir": data_root,
            "HttpProxy": os.environ.get("HTTP_PROXY", ""),
            "HttpsProxy": os.environ.get("HTTPS_PROXY", ""),
            "NoProxy": os.environ.get("NO_PROXY", ""),
            "Name": socket.gethostname(),
            "Labels": [],
            "ExperimentalBuild": False,
            "ServerVersion": ENGINE_VERSION,
            "Runtimes": {"runc": {"path": self.engine.cfg.runc}},
            "DefaultRuntime": "runc",
            "Swarm": {
                "NodeID": "",
                "NodeAddr": "",
                "LocalNodeState": "inactive",
                "ControlAvailable": False,
                "Error": "",
                "RemoteManagers": None,
            },
            "LiveRestoreEnabled": False,
            "Isolation": "",
            "InitBinary": "",
            "ContainerdCommit": {"ID": "", "Expected": ""},
            "RuncCommit": {"ID": "", "Expected": ""},
            "InitCommit": {"ID": "", "Expected": ""},
            "SecurityOptions": ["name=seccomp,profile=builtin"],
            "Warnings": [],
        }
        if version.at_least(V1_42):
            # Omitted from 1.42 when unsupported, as here.
            del info["KernelMemory"], info["KernelMemoryTCP"]
        if version.at_least(V1_44):
            info["CDISpecDirs"] = []
        return json_response(info)

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", "/_ping", self.ping),
            ("HEAD", "/_ping", self.ping),
            ("GET", "/version", self.version),
            ("GET", "/info", self.info),
        ]

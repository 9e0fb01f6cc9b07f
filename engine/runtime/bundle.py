"""OCI bundle pieces: the runtime-spec config.json, the process from an image config and the
/etc/hosts, /etc/hostname, /etc/resolv.conf a container sees (users: ``engine.runtime.userdb``).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

from engine.runtime.seccomp import SecurityOptions, linux_seccomp

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOFILE_LIMIT = 1048576
_CAP_SYS_RESOURCE = 24

# Docker's default (non-privileged) capability set, moby oci/caps/defaults.go.
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

# Docker's masked and read-only paths, moby oci/defaults.go.
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


def _write_file_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def write_network_files(
    container_dir: Path,
    hostname: str,
    hosts: str,
    resolv_conf: str,
) -> dict[str, Path]:
    """Write hosts, hostname and resolv.conf (netd's answer for the container: its
    ContainerFiles) into ``container_dir``. Returns in-container path → file, for bind
    mounts."""
    container_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "/etc/hosts": (container_dir / "hosts", hosts),
        "/etc/hostname": (container_dir / "hostname", f"{hostname}\n"),
        "/etc/resolv.conf": (container_dir / "resolv.conf", resolv_conf),
    }
    for path, text in files.values():
        _write_file_atomic(path, text)
    return {dest: path for dest, (path, _) in files.items()}


def rewrite_hosts(container_dir: Path, hosts: str) -> None:
    """A running container's /etc/hosts after a network connect or disconnect. Written in
    place, as Docker does: the file is bind-mounted by inode, so a renamed new file would
    never reach the container."""
    with open(container_dir / "hosts", "r+", encoding="utf-8") as f:
        f.write(hosts)
        f.truncate()


def _default_mounts() -> list[dict[str, Any]]:
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def runtime_spec(
    *,
    rootfs: Path,
    args: list[str],
    env: list[str],
    cwd: str,
    user: tuple[int, int, list[int]],
    hostname: str,
    netns_path: str | None,
    bind_files: dict[str, Path],
    cgroups_path: str,
    security: SecurityOptions | None = None,
    domainname: str = "",
    host_network: bool = False,
    terminal: bool = False,
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An OCI runtime-spec config with Docker's default security profile: its capabilities,
    masked paths and seccomp filter (unless ``security`` says otherwise).

    The network namespace: ``netns_path`` joins an existing one; None makes a new one (runc
    brings its ``lo`` up); ``host_network`` leaves the namespace out: the host's.
    ``resources``: the memory/cpu/pids entries of ``linux.resources``
    (engine.runtime.resources)."""
    if not args:
        raise ValueError("no command specified")
    security = security or SecurityOptions()
    uid, gid, additional_gids = user
    nofile = nofile_limit()
    if not any(e.startswith("HOSTNAME=") for e in env):
        env = [f"HOSTNAME={hostname}", *env]
    mounts = _default_mounts()
    for destination, source in sorted(bind_files.items()):
        mounts.append(
            {
                "destination": destination,
                "type": "bind",
                "source": str(source),
                "options": ["rbind", "rprivate"],
            }
        )
    network: dict[str, str] = {"type": "network"}
    if netns_path is not None:
        network["path"] = netns_path
    process_user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        process_user["additionalGids"] = list(additional_gids)
    linux_security: dict[str, Any] = {}
    seccomp = linux_seccomp(security, DEFAULT_CAPABILITIES)
    if seccomp is not None:
        linux_security["seccomp"] = seccomp
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal,
            "user": process_user,
            "args": list(args),
            "env": list(env),
            "cwd": cwd,
            "capabilities": {
                "bounding": list(DEFAULT_CAPABILITIES),
                "effective": list(DEFAULT_CAPABILITIES),
                "permitted": list(DEFAULT_CAPABILITIES),
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": security.no_new_privileges,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        # runtime-spec 1.1 "domainname" (setdomainname(2) in the uts namespace); only when set,
        # so specs without one stay valid for older runtimes.
        **({"domainname": domainname} if domainname else {}),
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            # Deny every device; runc appends its default allow list (null, zero, full, tty,
            # random, urandom, ptmx...) and creates those nodes in /dev.
            "resources": {"devices": [{"allow": False, "access": "rwm"}], **(resources or {})},
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                *([] if host_network else [network]),
            ],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            **linux_security,
        },
    }


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def nofile_limit() -> int:
    """RLIMIT_NOFILE for containers: Docker's 1048576 when runc (which inherits our
    capabilities) may raise a hard limit, which takes CAP_SYS_RESOURCE (setrlimit(2)), and
    never above fs.nr_open; without the capability, our own hard limit."""
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        nr_open = NOFILE_LIMIT
    if _has_capability(_CAP_SYS_RESOURCE):
        return min(NOFILE_LIMIT, nr_open)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return min(NOFILE_LIMIT, nr_open) if hard == resource.RLIM_INFINITY else min(hard, nr_open)


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """``base`` with each ``KEY=value`` of ``overrides`` replacing or appended by key; a bare
    ``KEY`` (no ``=``) removes the variable, as Docker's ReplaceOrAppendEnvValues does."""
    result = list(base)
    for entry in overrides:
        key = _env_key(entry)
        positions = [i for i, e in enumerate(result) if _env_key(e) == key]
        if "=" not in entry:
            result = [e for e in result if _env_key(e) != key]
        elif positions:
            result[positions[0]] = entry
        else:
            result.append(entry)
    return result


def image_process(
    image_config: dict[str, Any],
    cmd_override: list[str] | None,
    entrypoint_override: list[str] | None,
    extra_env: list[str],
) -> tuple[list[str], list[str], str, str]:
    """(args, env, cwd, user) for a container of an image, with Docker's override rules.

    A non-empty entrypoint override drops the image's Cmd; an empty one (``--entrypoint ""``)
    drops the image's Entrypoint but keeps its Cmd. PATH gets Docker's default when unset.
    """
    image_entrypoint = list(image_config.get("Entrypoint") or [])
    image_cmd = list(image_config.get("Cmd") or [])
    if entrypoint_override:
        entrypoint = list(entrypoint_override)
        cmd = list(cmd_override or [])
    else:
        entrypoint = image_entrypoint if entrypoint_override is None else []
        cmd = list(cmd_override) if cmd_override else image_cmd
    args = entrypoint + cmd
    if not args:
        raise ValueError("no command specified")
    env = merge_env(list(image_config.get("Env") or []), extra_env)
    if not any(_env_key(e) == "PATH" for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    cwd = image_config.get("WorkingDir") or "/"
    user = image_config.get("User") or ""
    return args, env, cwd, user

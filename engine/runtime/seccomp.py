"""Security options of a container: ``--security-opt`` parsing and seccomp profiles.

A profile is kept in moby's shape (github.com/moby/profiles, seccomp/seccomp.go): the OCI
``linux.seccomp`` fields plus ``archMap`` and, on each rule, ``includes``/``excludes``
conditions on the architecture, the container's capabilities and the kernel version. Those
conditions are resolved here, when the bundle is written, into the plain OCI form runc reads
(runtime-spec config-linux.md, "Seccomp"); the rules are then enforced by runc with libseccomp.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROFILE_PATH = Path(__file__).with_name("seccomp_default.json")
BUILTIN = "builtin"  # Docker's name for its default profile (seccomp=builtin)
UNCONFINED = "unconfined"
MAX_PROFILE_BYTES = 1 << 20

# uname -m → the architecture names of moby's profiles (libseccomp's, from Go's GOARCH).
_NATIVE_ARCH = {
    "x86_64": "amd64",
    "i386": "x86",
    "i686": "x86",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "loongarch64": "loong64",
}
_SECCOMP_ARCH = {
    "amd64": "SCMP_ARCH_X86_64",
    "x86": "SCMP_ARCH_X86",
    "arm64": "SCMP_ARCH_AARCH64",
    "arm": "SCMP_ARCH_ARM",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
    "loong64": "SCMP_ARCH_LOONGARCH64",
}
# What runc 1.1 accepts (libcontainer/seccomp/config.go). SCMP_ACT_NOTIFY needs a listener
# socket, which pyengined does not offer.
ACTIONS = {
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
}
OPERATORS = {
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
}
# runtime-spec config-linux.md, "Seccomp": the architectures libseccomp knows.
ARCHES = {
    f"SCMP_ARCH_{a}"
    for a in (
        "X86 X86_64 X32 ARM AARCH64 MIPS MIPS64 MIPS64N32 MIPSEL MIPSEL64 MIPSEL64N32 PPC PPC64 "
        "PPC64LE S390 S390X PARISC PARISC64 RISCV64 LOONGARCH64"
    ).split()
}
_KERNEL_RE = re.compile(r"^(\d+)\.(\d+)")
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class SecurityOptions:
    """A container's ``HostConfig.SecurityOpt``, parsed as moby's parseSecurityOpt does."""

    seccomp: str = BUILTIN  # BUILTIN, UNCONFINED or a profile's JSON text
    no_new_privileges: bool = False


def _parse_bool(text: str) -> bool | None:
    # Go's strconv.ParseBool, which Docker uses for no-new-privileges=<value>.
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    return None


def parse_security_opts(opts: Any) -> SecurityOptions:
    """Parse ``SecurityOpt``; ValueError with a one-line message for anything not understood.
    A JSON profile is checked in full here, so that a bad one fails the create, not the start."""
    if opts is None:
        return SecurityOptions()
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise ValueError("invalid SecurityOpt: want a list of strings")
    seccomp, nnp = BUILTIN, False
    for opt in opts:
        if opt == "no-new-privileges":
            nnp = True
            continue
        key, sep, value = opt.partition("=")
        if not sep:  # moby still takes the old KEY:VALUE form
            key, sep, value = opt.partition(":")
        if not sep:
            raise ValueError(f"invalid --security-opt: {_shorten(opt)!r} (want KEY=VALUE)")
        if key == "no-new-privileges":
            parsed = _parse_bool(value)
            if parsed is None:
                raise ValueError(f"invalid --security-opt: {_shorten(opt)!r} (want true or false)")
            nnp = parsed
        elif key == "seccomp":
            if value not in (BUILTIN, UNCONFINED):
                load_profile(value)
            seccomp = value
        else:
            raise ValueError(
                f"invalid --security-opt: {_shorten(opt)!r} (pyengined knows seccomp=... and "
                "no-new-privileges)"
            )
    return SecurityOptions(seccomp=seccomp, no_new_privileges=nnp)


def _shorten(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_profile(text: str) -> dict[str, Any]:
    """A profile's JSON text, decoded and checked for shape; ValueError otherwise."""
    if len(text) > MAX_PROFILE_BYTES:
        raise ValueError(f"seccomp profile larger than {MAX_PROFILE_BYTES} bytes")
    try:
        profile = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"decoding seccomp profile failed: {_shorten(str(e))}") from None
    if not isinstance(profile, dict):
        raise ValueError("decoding seccomp profile failed: want a JSON object")
    _check_profile(profile)
    return profile


@functools.cache
def _default_profile_text() -> str:
    return DEFAULT_PROFILE_PATH.read_text(encoding="utf-8")


def default_profile() -> dict[str, Any]:
    return load_profile(_default_profile_text())


def _want(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"invalid seccomp profile: {what}")


def _one_of(value: Any, choices: set[str]) -> bool:
    return isinstance(value, str) and value in choices


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_uint(value: Any, top: int = _U64) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


def _check_filter(raw: Any, where: str) -> None:
    if raw is None:
        return
    _want(isinstance(raw, dict), f"{where} must be an object")
    _want(_is_str_list(raw.get("caps") or []), f"{where}.caps must be a list of strings")
    _want(_is_str_list(raw.get("arches") or []), f"{where}.arches must be a list of strings")
    kernel = raw.get("minKernel")
    _want(
        kernel is None or (isinstance(kernel, str) and _KERNEL_RE.match(kernel) is not None),
        f'{where}.minKernel must be a version such as "4.8"',
    )


def _check_profile(p: dict[str, Any]) -> None:
    action = p.get("defaultAction", "")
    _want(action == "" or _one_of(action, ACTIONS), f"unknown defaultAction {_shorten(action)!r}")
    _want(action != "" or not p.get("syscalls"), "syscalls are listed but no defaultAction")
    _want(p.get("defaultErrnoRet") is None or _is_uint(p["defaultErrnoRet"], 4095), "bad errno")
    _want(
        not (p.get("architectures") and p.get("archMap")),
        "both 'architectures' and 'archMap' are specified, use either",
    )
    arches = p.get("architectures") or []
    _want(_is_str_list(arches) and set(arches) <= ARCHES, "unknown architectures")
    arch_map = p.get("archMap") or []
    _want(isinstance(arch_map, list), "archMap must be a list")
    for entry in arch_map:
        _want(isinstance(entry, dict), "archMap entries must be objects")
        _want(isinstance(entry.get("subArchitectures") or [], list), "archMap: want lists")
        names = [entry.get("architecture"), *(entry.get("subArchitectures") or [])]
        _want(_is_str_list(names) and set(names) <= ARCHES, "archMap: unknown architectures")
    # runc 1.1 refuses any ("seccomp flags are not yet supported by runc").
    for key in ("flags", "listenerPath", "listenerMetadata"):
        _want(not p.get(key), f"{key} is not supported by pyengined")
    syscalls = p.get("syscalls") or []
    _want(isinstance(syscalls, list), "syscalls must be a list")
    for i, call in enumerate(syscalls):
        where = f"syscalls[{i}]"
        _want(isinstance(call, dict), f"{where} must be an object")
        _want(not (call.get("name") and call.get("names")), f"{where}: both name and names")
        names = call.get("names") or ([call["name"]] if call.get("name") else [])
        _want(_is_str_list(names) and bool(names), f"{where}.names must name syscalls")
        _want(_one_of(call.get("action"), ACTIONS), f"{where}: unknown action")
        _want(call.get("errnoRet") is None or _is_uint(call["errnoRet"], 4095), f"{where}: errno")
        args = call.get("args") or []
        _want(isinstance(args, list) and len(args) <= 6, f"{where}.args must be a list (max 6)")
        for arg in args:
            _want(
                isinstance(arg, dict)
                and _is_uint(arg.get("index"), 5)
                and _is_uint(arg.get("value", 0))
                and _is_uint(arg.get("valueTwo", 0))
                and _one_of(arg.get("op"), OPERATORS),
                f"{where}.args: want index 0-5, unsigned value(s) and an SCMP_CMP_ op",
            )
        _check_filter(call.get("includes"), f"{where}.includes")
        _check_filter(call.get("excludes"), f"{where}.excludes")


def native_arch() -> str:
    machine = platform.machine()
    return _NATIVE_ARCH.get(machine, machine)


def kernel_version() -> tuple[int, int]:
    match = _KERNEL_RE.match(os.uname().release)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _version(text: str) -> tuple[int, int]:
    match = _KERNEL_RE.match(text)
    assert match is not None  # checked by _check_filter
    return int(match[1]), int(match[2])


def _applies(call: dict[str, Any], caps: list[str], arch: str, kernel: tuple[int, int]) -> bool:
    """moby's setupSeccomp: an ``excludes`` condition that holds, or an ``includes`` one that
    does not, drops the rule."""
    excludes = call.get("excludes") or {}
    if arch in (excludes.get("arches") or []):
        return False
    if any(c in caps for c in excludes.get("caps") or []):
        return False
    if excludes.get("minKernel") and kernel >= _version(excludes["minKernel"]):
        return False
    includes = call.get("includes") or {}
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if not all(c in caps for c in includes.get("caps") or []):
        return False
    if includes.get("minKernel") and kernel < _version(includes["minKernel"]):
        return False
    return True


def to_oci(
    profile: dict[str, Any],
    capabilities: list[str],
    arch: str | None = None,
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any] | None:
    """The OCI ``linux.seccomp`` of a checked profile for a container with ``capabilities``
    (its bounding set), or None when the profile filters nothing (moby: no default action and
    no rules)."""
    if not profile.get("defaultAction") and not profile.get("syscalls"):
        return None
    arch = arch or native_arch()
    kernel = kernel or kernel_version()
    out: dict[str, Any] = {"defaultAction": profile.get("defaultAction") or "SCMP_ACT_ALLOW"}
    if profile.get("defaultErrnoRet") is not None:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    architectures = list(profile.get("architectures") or [])
    native = _SECCOMP_ARCH.get(arch)
    for entry in profile.get("archMap") or []:
        if entry["architecture"] == native:
            architectures += [entry["architecture"], *(entry.get("subArchitectures") or [])]
            break
    if architectures:
        out["architectures"] = architectures
    syscalls = []
    for call in profile.get("syscalls") or []:
        if not _applies(call, capabilities, arch, kernel):
            continue
        rule: dict[str, Any] = {
            "names": list(call.get("names") or [call["name"]]),
            "action": call["action"],
        }
        if call.get("errnoRet") is not None:
            rule["errnoRet"] = call["errnoRet"]
        if call.get("args"):
            rule["args"] = [
                {
                    "index": a["index"],
                    "value": a.get("value", 0),
                    "valueTwo": a.get("valueTwo", 0),
                    "op": a["op"],
                }
                for a in call["args"]
            ]
        syscalls.append(rule)
    out["syscalls"] = syscalls
    return out


def linux_seccomp(options: SecurityOptions, capabilities: list[str]) -> dict[str, Any] | None:
    """The ``linux.seccomp`` section for a container, None for ``seccomp=unconfined``."""
    if options.seccomp == UNCONFINED:
        return None
    if options.seccomp == BUILTIN:
        return to_oci(default_profile(), capabilities)
    return to_oci(load_profile(options.seccomp), capabilities)

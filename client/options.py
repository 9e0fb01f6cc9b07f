"""The options ``run`` and ``create`` share, and how option values become the fields of
Docker's request bodies (also for ``network create`` and ``network connect``)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from client.command import fail
from client.limits import LIMIT_OPTIONS, limits_host_config
from client.local_files import read_seccomp_profile
from client.mountopts import mount_fields
from common.ports import parse_publish, to_docker_port_bindings


def key_values(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"pyengine: invalid {what} {pair!r}: want KEY=VALUE", 125)
        out[key] = value
    return out


def port_bindings(specs: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    bindings = []
    for spec in specs:
        try:
            bindings.extend(parse_publish(spec))
        except ValueError as e:
            fail(f"pyengine: {e}", 125)
    return to_docker_port_bindings(bindings)


def container_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``run`` and ``create`` share (Docker's spelling)."""
    for option in reversed(
        [
            click.option(
                "-p",
                "--publish",
                multiple=True,
                help="Publish a port: [ip:][hostport:]port[/proto]",
            ),
            click.option("-P", "--publish-all", is_flag=True, help="Publish every exposed port."),
            click.option("--name", default=None),
            click.option("--rm", "auto_remove", is_flag=True, help="Remove it when it exits."),
            click.option("-e", "--env", multiple=True, help="KEY=VALUE"),
            click.option("--entrypoint", default=None),
            click.option(
                "--log-opt",
                "log_opts",
                multiple=True,
                help="json-file log option: max-size=SIZE (e.g. 10m), max-file=N.",
            ),
            click.option("-l", "--label", "labels", multiple=True, help="KEY=VALUE"),
            click.option(
                "--network",
                default=None,
                help="Connect it to this network, or none, host or container:<name|id>.",
            ),
            click.option("--ip", default=None, help="IPv4 address on that network."),
            click.option("--ip6", default=None, help="IPv6 address on that network."),
            click.option(
                "--network-alias", "aliases", multiple=True, help="A name on that network."
            ),
            click.option(
                "--mac-address", default=None, help="MAC address on that network (aa:bb:...)."
            ),
            click.option(
                "--security-opt",
                "security_opts",
                multiple=True,
                help="seccomp=unconfined|PROFILE.json, no-new-privileges[=true|false].",
            ),
            click.option("--dns", "dns", multiple=True, help="A DNS server (IP address)."),
            click.option("--dns-search", "dns_search", multiple=True, help="A search domain."),
            click.option(
                "--dns-option", "dns_options", multiple=True, help="A resolv.conf option."
            ),
            click.option(
                "--add-host",
                "add_hosts",
                multiple=True,
                help="NAME:IP (or NAME=IP; IP may be host-gateway) in /etc/hosts.",
            ),
            click.option("-h", "--hostname", default=None, help="The container's hostname."),
            click.option("--domainname", default=None, help="The container's NIS domain name."),
            click.option("-w", "--workdir", default=None, help="Working directory inside."),
            click.option("-u", "--user", default=None, help="USER[:GROUP] (name or id)."),
            click.option(
                "--env-file",
                "env_files",
                multiple=True,
                help="A file of KEY=VALUE lines (# comments; a bare KEY takes its value here).",
            ),
            click.option(
                "-v",
                "--volume",
                "volumes",
                multiple=True,
                help="[NAME|/HOST/PATH:]/CONTAINER/PATH[:ro|rw|nocopy|...]",
            ),
            click.option("--mount", "mounts", multiple=True, help="type=bind|volume|tmpfs,..."),
            click.option("--tmpfs", multiple=True, help="/CONTAINER/PATH[:size=64k,mode=1777]"),
            click.option("--volumes-from", multiple=True, help="CONTAINER[:ro|rw]"),
            *LIMIT_OPTIONS,
        ]
    ):
        fn = option(fn)
    return fn


@dataclass(frozen=True)
class ContainerOptions:
    """What ``container_options`` collects, for ``run`` and ``create`` alike."""

    publish: tuple[str, ...]
    publish_all: bool
    name: str | None
    auto_remove: bool
    env: tuple[str, ...]
    entrypoint: str | None
    log_opts: tuple[str, ...]
    labels: tuple[str, ...]
    network: str | None
    ip: str | None
    ip6: str | None
    aliases: tuple[str, ...]
    security_opts: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    dns_options: tuple[str, ...] = ()
    add_hosts: tuple[str, ...] = ()
    hostname: str | None = None
    domainname: str | None = None
    workdir: str | None = None
    user: str | None = None
    env_files: tuple[str, ...] = ()
    mac_address: str | None = None
    volumes: tuple[str, ...] = ()
    mounts: tuple[str, ...] = ()
    tmpfs: tuple[str, ...] = ()
    volumes_from: tuple[str, ...] = ()
    # Resource limits (client.limits), as typed.
    memory: str | None = None
    memory_swap: str | None = None
    memory_reservation: str | None = None
    cpus: str | None = None
    cpu_shares: int | None = None
    cpu_period: int | None = None
    cpu_quota: int | None = None
    cpuset_cpus: str | None = None
    pids_limit: int | None = None


def container_config(
    image: str, command: tuple[str, ...], opts: ContainerOptions, auto_remove: bool
) -> dict[str, Any]:
    """Docker's create body; ``auto_remove`` is the daemon's part of ``--rm``."""
    bindings = port_bindings(opts.publish)
    log_config: dict[str, str] = {}
    for opt in opts.log_opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            fail(f"pyengine: invalid log opt {opt!r}: want KEY=VALUE", 125)
        log_config[key] = value
    env_list = [e for path in opts.env_files for e in read_env_file(path)]
    env_list += [e if "=" in e else f"{e}={os.environ.get(e, '')}" for e in opts.env]
    mount_config, mount_host_config = mount_fields(
        opts.volumes, opts.mounts, opts.tmpfs, opts.volumes_from
    )
    return {
        **mount_config,
        "Image": image,
        # The client speaks API 1.41: the MAC is the container-wide field, which the daemon
        # puts on the NetworkMode network's endpoint (and checks).
        "MacAddress": opts.mac_address or "",
        "Cmd": list(command) or None,
        "Entrypoint": [opts.entrypoint] if opts.entrypoint is not None else None,
        "Env": env_list,
        "ExposedPorts": {k: {} for k in bindings},
        "Labels": key_values(opts.labels, "label"),
        "Hostname": opts.hostname or "",
        "Domainname": opts.domainname or "",
        "WorkingDir": opts.workdir or "",
        "User": opts.user or "",
        "HostConfig": {
            "PortBindings": bindings,
            "PublishAllPorts": opts.publish_all,
            "AutoRemove": auto_remove,
            "LogConfig": {"Type": "json-file", "Config": log_config},
            "NetworkMode": opts.network or "default",
            "SecurityOpt": security_opts(opts.security_opts),
            "Dns": list(opts.dns),
            "DnsSearch": list(opts.dns_search),
            "DnsOptions": list(opts.dns_options),
            "ExtraHosts": [extra_host(h) for h in opts.add_hosts],
            **mount_host_config,
            **limits_host_config(dataclasses.asdict(opts)),
        },
        "NetworkingConfig": networking_config(opts.network, opts.ip, opts.aliases, opts.ip6),
    }


def extra_host(entry: str) -> str:
    """``--add-host``: the docker CLI's ``NAME=IP`` spelling is sent as Docker's ``NAME:IP``;
    the daemon checks the entry."""
    name, sep, ip = entry.partition("=")
    return f"{name}:{ip}" if sep else entry


def read_env_file(path: str) -> list[str]:
    """``--env-file`` as the docker CLI reads it: one ``KEY=VALUE`` a line (the value as it
    is, blanks included), blank lines and ``#`` lines skipped, leading blanks dropped; a bare
    ``KEY`` takes this environment's value, and is left out when it has none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"pyengine: cannot read env file {path!r}: {e}", 125)
    out = []
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not key or any(ch.isspace() for ch in key):
            fail(f"pyengine: env file {path!r} line {number}: invalid variable {key!r}", 125)
        if sep:
            out.append(f"{key}={value}")
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def security_opts(opts: tuple[str, ...]) -> list[str]:
    """As the docker CLI: ``seccomp=<file>`` is sent as ``seccomp=<the file's JSON>``."""
    out = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        if key == "seccomp" and sep and value not in ("unconfined", "builtin"):
            try:
                profile = read_seccomp_profile(value)
            except (OSError, ValueError, RecursionError) as e:
                fail(f"pyengine: invalid seccomp profile {value!r}: {e}", 125)
            opt = "seccomp=" + json.dumps(profile, separators=(",", ":"))
        out.append(opt)
    return out


def ipam_config(ip: str | None, ip6: str | None) -> dict[str, str]:
    """Docker's EndpointIPAMConfig for ``--ip`` / ``--ip6``."""
    return {k: v for k, v in (("IPv4Address", ip), ("IPv6Address", ip6)) if v}


def networking_config(
    network: str | None, ip: str | None, aliases: tuple[str, ...], ip6: str | None = None
) -> dict[str, Any]:
    """Docker's EndpointsConfig for the network the container is created on."""
    if not (ip or ip6 or aliases):
        return {}
    endpoint: dict[str, Any] = {"Aliases": list(aliases)}
    if ip or ip6:
        endpoint["IPAMConfig"] = ipam_config(ip, ip6)
    return {"EndpointsConfig": {network or "default": endpoint}}

"""``pyengine-bench cni`` (or ``python -m bench.cni``): pyengine-cni against the reference
``bridge`` + ``portmap`` plugins (Debian's containernetworking-plugins), in one run.

Variants, each a chain of plugins run as libcni runs them (ADD in order with ``prevResult``,
DEL in reverse):

* ``reference``: ``bridge`` (host-local IPAM, ipMasq) then ``portmap`` (iptables, one chain per
  container, a rule per port);
* ``pyengine-nft`` / ``pyengine-ipt``: ``pyengine`` alone (netd's bridge, IPAM and masquerade;
  ports as elements of one nftables map, or iptables rules);
* ``chained``: ``bridge`` then ``pyengine`` in place of ``portmap``.

Measured, alternating the variants sample by sample (A B C D, then D C B A): ADD and DEL of a
container without ports (median of ``--repeat``), then ADD and DEL with ``--ports`` port
mappings (median of ``--repeat-ports``). Each network keeps one resident container throughout,
as a node keeps pods, so a sample measures an attachment, not a network's first set-up or last
tear-down. Ratios are the reference's time over each variant's.

Everything is named ``pyecni``: bridges pyecni5/pyecni6, namespaces pyecni-b*, subnets in
10.197.40.0/22, tables pyecni_b*; host ports from 47000. The reference plugins' top-level chains
(``CNI-HOSTPORT-*``) are removed at the end only when this run created them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.tools import machine_description
from common.jsonstate import write_json_atomic

REFERENCE_DIR = Path("/usr/lib/cni")
PLUGIN = Path(sys.executable).parent / "pyengine-cni"
CNI_VERSION = "1.0.0"
FIRST_PORT = 47000
TIMEOUT_S = 120.0
EXIT_FAILED = 1
HOSTPORT_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ")


class CniBenchError(RuntimeError):
    """A plugin failed; the message says which and why."""


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    plugins: tuple[tuple[Path, dict[str, Any]], ...]


@dataclass
class Timing:
    add: list[float] = field(default_factory=list)
    delete: list[float] = field(default_factory=list)


def variants(tmp: Path) -> list[Variant]:
    def bridge(name: str, br: str, subnet: str) -> tuple[Path, dict[str, Any]]:
        return (
            REFERENCE_DIR / "bridge",
            {
                "type": "bridge", "bridge": br, "isGateway": True, "ipMasq": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                         "dataDir": str(tmp / name / "host-local")},
            },
        )  # fmt: skip

    def pyengine(name: str, table: str, backend: str, **extra: Any) -> tuple[Path, dict[str, Any]]:
        conf = {"type": "pyengine", "table": table, "firewallBackend": backend,
                "dataDir": str(tmp / name / "pyengine"), **extra}  # fmt: skip
        return PLUGIN, conf

    portmap = (REFERENCE_DIR / "portmap", {"type": "portmap", "snat": True,
                                           "capabilities": {"portMappings": True}})  # fmt: skip
    return [
        Variant("reference", "bridge + portmap",
                (bridge("reference", "pyecni5", "10.197.40.0/24"), portmap)),
        Variant("pyengine-nft", "pyengine-cni (nftables)", (pyengine(
            "pyengine-nft", "pyecni_bnft", "nftables", bridge="pyecni6",
            ipam={"ranges": [[{"subnet": "10.197.41.0/24"}]]}),)),
        Variant("pyengine-ipt", "pyengine-cni (iptables)", (pyengine(
            "pyengine-ipt", "pyecni_bipt", "iptables", bridge="pyecni7",
            ipam={"ranges": [[{"subnet": "10.197.42.0/24"}]]}),)),
        Variant("chained", "bridge + pyengine-cni (nftables)", (
            bridge("chained", "pyecni8", "10.197.43.0/24"),
            pyengine("chained", "pyecni_bchn", "nftables"))),
    ]  # fmt: skip


def invoke(
    plugin: Path, conf: dict[str, Any], command: str, cid: str, netns: str
) -> dict[str, Any]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0", "CNI_PATH": f"{PLUGIN.parent}:{REFERENCE_DIR}",
    }  # fmt: skip
    result = subprocess.run(
        [str(plugin)], input=json.dumps(conf).encode(), env=env, capture_output=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    out = result.stdout.decode().strip()
    if result.returncode != 0:
        raise CniBenchError(f"{plugin.name} {command} {cid}: {out or result.stderr.decode()}")
    return json.loads(out) if out else {}


def run_chain(v: Variant, command: str, cid: str, netns: str, ports: list[dict[str, Any]]) -> float:
    """One ADD or DEL of ``v``'s chain; its wall-clock time in seconds."""
    prev: dict[str, Any] | None = None
    order = v.plugins if command == "ADD" else tuple(reversed(v.plugins))
    started = time.perf_counter()
    for plugin, plugin_conf in order:
        conf = {"cniVersion": CNI_VERSION, "name": f"pyecni-bench-{v.name}", **plugin_conf}
        if ports and plugin_conf.get("type") in ("portmap", "pyengine"):
            conf["runtimeConfig"] = {"portMappings": ports}
        if prev is not None:
            conf["prevResult"] = prev
        reply = invoke(plugin, conf, command, cid, netns)
        if command == "ADD":
            prev = reply
    return time.perf_counter() - started


@contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def port_list(count: int) -> list[dict[str, Any]]:
    return [
        {"hostPort": FIRST_PORT + i, "containerPort": 80, "protocol": "tcp"} for i in range(count)
    ]


def measure(vs: list[Variant], repeat: int, ports: list[dict[str, Any]]) -> dict[str, Timing]:
    timings = {v.name: Timing() for v in vs}
    for i in range(repeat):
        order = vs if i % 2 == 0 else list(reversed(vs))
        for v in order:
            with netns(f"pyecni-b{i % 2}") as path:
                cid = f"bench-{v.name}-{i}"
                try:
                    timings[v.name].add.append(run_chain(v, "ADD", cid, path, ports))
                finally:
                    # DEL is idempotent: after a failed ADD it removes what the ADD left.
                    timings[v.name].delete.append(run_chain(v, "DEL", cid, path, ports))
    return timings


def existing_chains() -> set[str]:
    out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                         timeout=30).stdout  # fmt: skip
    return {line[1:].split()[0] for line in out.splitlines() if line.startswith(":")}


def remove_hostport_chains(before: set[str]) -> None:
    ours = [c for c in HOSTPORT_CHAINS if c in existing_chains() and c not in before]
    if not ours:
        return
    save = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                          timeout=30).stdout  # fmt: skip
    for line in save.splitlines():
        parts = shlex.split(line)
        if line.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in ours:
            if parts[1] not in ours:
                subprocess.run(["iptables", "-t", "nat", "-D", *parts[1:]], timeout=30)
    for chain in ours:
        subprocess.run(["iptables", "-t", "nat", "-F", chain], timeout=30)
    for chain in ours:
        subprocess.run(["iptables", "-t", "nat", "-X", chain], timeout=30)


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"| variant | ADD ms | DEL ms | ADD {doc['ports']} ports ms | "
        f"DEL {doc['ports']} ports ms | ADD ratio | ADD {doc['ports']} ports ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ref = doc["results"]["reference"]
    for r in doc["results"].values():
        ratio = ref["add_ms"] / r["add_ms"]
        ratio_ports = ref["add_ports_ms"] / r["add_ports_ms"]
        lines.append(
            f"| {r['title']} | {r['add_ms']:.0f} | {r['del_ms']:.0f} | {r['add_ports_ms']:.0f} | "
            f"{r['del_ports_ms']:.0f} | {ratio:.2f}x | {ratio_ports:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"Medians of {doc['repeat']} (no ports) and {doc['repeat_ports']} ({doc['ports']} ports) "
        "samples; a ratio above 1 means faster than bridge + portmap."
    )
    return "\n".join(lines) + "\n"


def run_study(repeat: int, repeat_ports: int, count: int) -> dict[str, Any]:
    for tool in ("ip", "iptables-save"):
        if shutil.which(tool) is None:
            raise CniBenchError(f"needs {tool} on PATH")
    for plugin in ("bridge", "portmap", "host-local"):
        if not (REFERENCE_DIR / plugin).exists():
            raise CniBenchError(f"needs {REFERENCE_DIR / plugin} (containernetworking-plugins)")
    before = existing_chains()
    tmp = Path(tempfile.mkdtemp(prefix="pyecni-bench-"))
    vs = variants(tmp)
    try:
        with contextlib.ExitStack() as stack:
            # One resident container per network (in a namespace each), for the whole run.
            residents = {
                v.name: stack.enter_context(netns(f"pyecni-br{i}")) for i, v in enumerate(vs)
            }
            try:
                for v in vs:
                    run_chain(v, "ADD", "bench-resident", residents[v.name], [])
                plain = measure(vs, repeat, [])
                mapped = measure(vs, repeat_ports, port_list(count))
            finally:
                for v in vs:
                    run_chain(v, "DEL", "bench-resident", residents[v.name], [])
    finally:
        for br in ("pyecni5", "pyecni8"):  # the reference bridge plugin leaves its bridges
            subprocess.run(["ip", "link", "del", br], capture_output=True, timeout=30)
        remove_hostport_chains(before)
        shutil.rmtree(tmp, ignore_errors=True)
    results = {}
    for v in vs:
        results[v.name] = {
            "title": v.title,
            "add_ms": statistics.median(plain[v.name].add) * 1e3,
            "del_ms": statistics.median(plain[v.name].delete) * 1e3,
            "add_ports_ms": statistics.median(mapped[v.name].add) * 1e3,
            "del_ports_ms": statistics.median(mapped[v.name].delete) * 1e3,
            "samples": {
                "add": plain[v.name].add, "delete": plain[v.name].delete,
                "add_ports": mapped[v.name].add, "delete_ports": mapped[v.name].delete,
            },
        }  # fmt: skip
    return {
        "schema": "pyengine-bench-cni/1",
        "machine": machine_description(),
        "repeat": repeat,
        "repeat_ports": repeat_ports,
        "ports": count,
        "results": results,
    }


def main(argv: list[str] | None = None, prog: str = "python -m bench.cni") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="samples without ports")
    parser.add_argument("--repeat-ports", type=int, default=5, help="samples with ports")
    parser.add_argument("--ports", type=int, default=1000, help="port mappings (1-1000)")
    parser.add_argument("--json", type=Path, help="write the samples and medians here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.repeat < 1 or args.repeat_ports < 1 or not 1 <= args.ports <= 1000:
        print(f"{prog}: --repeat and --repeat-ports >= 1, --ports 1-1000", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"{prog}: needs root (namespaces, bridges, firewall)", file=sys.stderr)
        return EXIT_FAILED
    try:
        doc = run_study(args.repeat, args.repeat_ports, args.ports)
    except (CniBenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json is not None:
        write_json_atomic(args.json, doc)
    print(render(doc), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

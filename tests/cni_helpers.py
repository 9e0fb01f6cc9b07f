"""Driving pyengine-cni as a runtime does (cnitool, libcni): CNI_* environment, the network
configuration on stdin, the result or error JSON on stdout. Everything the tests make is named
``pyecni...`` (links, namespaces, nftables tables, iptables chains) and is swept by
:func:`sweep`, which the tests also use to assert that nothing was left."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import BIN
from tests.netns_helpers import (
    links_with_prefix,
    netns_with_prefix,
    remove_firewall,
    remove_link,
    remove_netns,
    run,
)

PLUGIN = BIN / "pyengine-cni"
PREFIX = "pyecni"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
TIMEOUT = 60  # seconds for one plugin run


@dataclass
class Reply:
    rc: int
    out: dict[str, Any]
    stderr: str


def invoke(
    command: str,
    conf: dict[str, Any],
    container_id: str = "",
    netns: str = "",
    ifname: str = "eth0",
    plugin: Path = PLUGIN,
) -> Reply:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": f"{BIN}:{REFERENCE_PLUGINS}",
    }
    result = subprocess.run(
        [str(plugin)],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=TIMEOUT,
    )
    text = result.stdout.decode().strip()
    return Reply(result.returncode, json.loads(text) if text else {}, result.stderr.decode())


def ok(reply: Reply) -> dict[str, Any]:
    assert reply.rc == 0, f"plugin failed: {reply.out} {reply.stderr}"
    return reply.out


def pyecni_tables() -> list[str]:
    out = run("nft", "list", "tables")
    return sorted(
        line.split()[-1] for line in out.splitlines() if line.split()[-1].startswith(PREFIX)
    )


def pyecni_iptables_lines() -> list[str]:
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        found += [line for line in run(tool).splitlines() if "PYECNI" in line]
    return found


def proxies_of(data_dir: Path) -> list[int]:
    """Pids of live pyengine-proxy processes started for ``data_dir``'s network."""
    record = data_dir / "attachments.json"
    if not record.exists():
        return []
    pids = []
    for att in json.loads(record.read_text()).get("attachments", {}).values():
        pids += [p["pid"] for p in att.get("proxies", []) if Path(f"/proc/{p['pid']}").exists()]
    return pids


def leftovers() -> list[str]:
    """Everything named pyecni that exists now (empty: the tests left nothing)."""
    return (
        [f"link {n}" for n in links_with_prefix(PREFIX)]
        + [f"netns {n}" for n in netns_with_prefix(PREFIX)]
        + [f"nft table {t}" for t in pyecni_tables()]
        + [f"iptables {line}" for line in pyecni_iptables_lines()]
    )


def sweep() -> None:
    """Remove whatever a failed test left: links, namespaces, tables, chains."""
    for table in pyecni_tables():
        remove_firewall("nftables", table)
    chains = {line[1:].split()[0] for line in pyecni_iptables_lines() if line.startswith(":")}
    for table in {c.split("-")[0].lower() for c in chains}:
        remove_firewall("iptables", table)
    for name in links_with_prefix(PREFIX):
        remove_link(name)
    for name in netns_with_prefix(PREFIX):
        remove_netns(name)


def allocations(data_dir: Path) -> dict[str, str]:
    """The addresses (both families) netd's state holds for the network (address -> owner)."""
    state = data_dir / "network" / "endpoints.json"
    if not state.exists():
        return {}
    found: dict[str, str] = {}
    for net in json.loads(state.read_text()).get("networks", {}).values():
        for family in ("ipam", "ipam6"):
            found.update(net.get(family, {}).get("allocations", {}))
    return found

"""Chained mode: the network and the container's addresses come from the interface plugin
before this one (the reference ``bridge``), through ``prevResult``; a DEL or GC without
``prevResult`` finds them in netd's record of an earlier ADD."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface, ip_network
from pathlib import Path

from common.jsonstate import read_json
from netd.cni.config import NetConf
from netd.controller import NETWORK_FILE, STATE_DIR
from netd.errors import NetdError


@dataclass(frozen=True)
class ChainedNetwork:
    """What a chained network is, from ``prevResult`` or from the state of an earlier ADD."""

    bridge: str
    interface: IPv4Interface  # the gateway address with the subnet's prefix
    subnet6: str = ""


def state_record(data_dir: Path) -> dict[str, object]:
    """netd's record of the firewall and bridge (netd/control/base.py), {} when none."""
    try:
        record = read_json(data_dir / STATE_DIR / NETWORK_FILE, None)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def chained_network(
    conf: NetConf, prev: dict[str, object] | None, ifname: str
) -> tuple[ChainedNetwork, IPv4Interface, IPv6Interface | None] | None:
    """The network and the container's addresses of a chained ADD, from ``prevResult``: the
    addresses of the interface named ``ifname`` in the namespace (or of every interface when
    none is), the bridge from ``bridge`` or the result's first host interface."""
    if not isinstance(prev, dict):
        return None
    interfaces = prev.get("interfaces") or []
    ips = prev.get("ips") or []
    if not isinstance(interfaces, list) or not isinstance(ips, list):
        raise NetdError("prevResult: interfaces and ips are lists")
    container_index = {
        i for i, itf in enumerate(interfaces)
        if isinstance(itf, dict) and itf.get("sandbox") and itf.get("name") == ifname
    }  # fmt: skip
    v4: tuple[IPv4Interface, str] | None = None
    v6: IPv6Interface | None = None
    for ip in ips:
        if not isinstance(ip, dict):
            continue
        if container_index and ip.get("interface") not in container_index:
            continue
        text = str(ip.get("address"))
        try:
            version = ip_network(text, strict=False).version
        except ValueError:
            raise NetdError(f'prevResult: invalid address "{text}"') from None
        if version == 4 and v4 is None:
            v4 = (IPv4Interface(text), str(ip.get("gateway") or ""))
        elif version == 6 and v6 is None:
            v6 = IPv6Interface(text)
    if v4 is None:
        raise NetdError("prevResult has no IPv4 address for the container")
    bridge_name = conf.bridge
    if not bridge_name:
        hosts = [i for i in interfaces if isinstance(i, dict) and not i.get("sandbox")]
        if not hosts or not isinstance(hosts[0].get("name"), str):
            raise NetdError('prevResult names no bridge; set "bridge" in the configuration')
        bridge_name = str(hosts[0]["name"])
    address, gateway = v4
    subnet = address.network
    if not isinstance(address, IPv4Interface):  # for the type checker: v4 holds IPv4 only
        raise NetdError(f"prevResult: {address} is not IPv4")
    gw = gateway or str(subnet.network_address + 1)
    net = ChainedNetwork(bridge_name, IPv4Interface(f"{gw}/{subnet.prefixlen}"),
                         str(v6.network) if v6 is not None else "")  # fmt: skip
    return net, address, v6


def recorded_chained_network(conf: NetConf) -> ChainedNetwork | None:
    """A chained network as an earlier ADD left it in the state (a DEL without prevResult)."""
    record = state_record(conf.data_dir)
    bridge_name, subnet, gateway = record.get("bridge"), record.get("subnet"), record.get("gateway")
    if not all(isinstance(v, str) and v for v in (bridge_name, subnet, gateway)):
        return None
    prefix = str(subnet).split("/")[-1]
    return ChainedNetwork(str(bridge_name), IPv4Interface(f"{gateway}/{prefix}"))

"""The firewall half of transparent proxying's return path, for both backends (the routing
half, and why, is netd/returnpath.py).

A packet that comes in from one of our bridges, in the reply direction of its connection, and
belongs to a socket with ``IP_TRANSPARENT`` set gets the mark bits (OR-ed in, so marks other
software sets survive). Matching the reply direction first keeps the socket lookup off the
containers' own connections; the lookup itself finds the proxy's backend socket by the
packet's addresses and ports even though its address is not the host's (nft(8) "SOCKET
EXPRESSION" ``socket transparent``; iptables-extensions(8) ``socket --transparent``). Internal
networks publish nothing and get no rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from netd.firewall import BridgeNetwork
from netd.firewall.iptables_specs import TableState

NFT_CHAIN = "mangle_prerouting"


def nft_chain(networks: Sequence[BridgeNetwork], mark: int | None) -> str:
    """The nftables chain (empty when ``mark`` is None: no transparent port)."""
    if mark is None:
        return ""
    rules = [
        f'iifname "{net.bridge}" ct direction reply socket transparent 1 '
        f"meta mark set meta mark | {mark:#x}"
        for net in networks
        if not net.internal
    ]
    body = "".join(f"\n    {line}" for line in rules)
    return (
        f"  chain {NFT_CHAIN} {{\n"
        f"    type filter hook prerouting priority mangle; policy accept;{body}\n  }}\n"
    )


def iptables_state(
    networks: Sequence[BridgeNetwork], mark: int | None, chain: str, tag: str
) -> TableState:
    """What the iptables backend owns in the mangle table, exactly as ip(6)tables-save prints
    it (nothing when ``mark`` is None): ``chain`` and its tagged jump from PREROUTING."""
    if mark is None:
        return TableState()
    rules = [
        f"-i {net.bridge} -m conntrack --ctdir REPLY -m socket --transparent "
        f"-j MARK --set-xmark {mark:#x}/{mark:#x}"
        for net in networks
        if not net.internal
    ]
    return TableState({chain: rules}, [("PREROUTING", f"-m comment --comment {tag} -j {chain}")])

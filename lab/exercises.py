"""The exercises of docs/lab.md, in its order: ``python -m lab exercise NAME`` runs one."""

from __future__ import annotations

from collections.abc import Callable

from lab.plan import ROLES
from lab.runner import Capture, Command, Exercise, Section, Step

_WAIT_FOR_WEB = Command(
    "for i in $(seq 300); do "
    "curl -fsS -o /dev/null --max-time 2 http://127.0.0.1:{d.port}/ && break; sleep 0.1; done",
    quiet=True,
)
_SYN_FILTER = "'tcp[tcpflags] & tcp-syn != 0 and (tcp port {d.port} or net {d.subnet})'"


def _per_mode(
    title: str, steps: Callable[[str], tuple[Step, ...]], needs_client: bool = False
) -> tuple[Section, ...]:
    return tuple(
        Section(title, steps(role), role=role, needs_client=needs_client) for role in ROLES
    )


def _publish_steps(role: str) -> tuple[Step, ...]:
    return (
        Command("{d.pyengine} rm -f web", quiet=True, may_fail=True),
        Command("{d.pyengine} run -d --name web -p {d.port}:80 nginx"),
        _WAIT_FOR_WEB,
        Command("{d.pyengine} ps"),
        Command("{d.pyengine} port web"),
        Command("{d.pyengine} inspect web | grep -m1 '\"IPAddress\"'"),
    )


def _reach_steps(role: str) -> tuple[Step, ...]:
    fmt = "'%{{http_code}} from %{{remote_ip}}:%{{remote_port}}\\n'"
    return (
        Command(
            f"ip netns exec {{c.netns}} curl -sS -o /dev/null -w {fmt} "
            "http://{c.host_ip}:{d.port}/"
        ),
        Command(f"curl -sS -o /dev/null -w {fmt} http://127.0.0.1:{{d.port}}/"),
    )


PUBLISH = Exercise(
    "publish",
    "publish nginx's port 80 in each proxy mode",
    _per_mode("{d.mode} (pyengined {d.flag}): publish", _publish_steps)
    + _per_mode("{d.mode}: reach it from the client and from the host", _reach_steps, True),
)

_CURL_CLIENT = Command("ip netns exec {c.netns} curl -sS -o /dev/null http://{c.host_ip}:{d.port}/")
_CURL_LOOPBACK = Command("curl -sS -o /dev/null http://127.0.0.1:{d.port}/")

PACKETS = Exercise(
    "packets",
    "watch the SYN and SYN-ACK of one connection on every interface",
    (
        Section(
            "{d.mode}: the client connects to {c.host_ip}:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 6 {_SYN_FILTER}", (_CURL_CLIENT,)),),
            role="dnat",
            needs_client=True,
        ),
        Section(
            "{d.mode}: the client connects to {c.host_ip}:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 6 {_SYN_FILTER}", (_CURL_CLIENT,)),),
            role="proxy",
            needs_client=True,
        ),
        Section(
            "{d.mode}: the host connects to 127.0.0.1:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 6 {_SYN_FILTER}", (_CURL_LOOPBACK,)),),
            role="proxy",
        ),
        Section(
            "{d.mode}: the host connects to 127.0.0.1:{d.port}",
            (Capture(f"tcpdump -i any -l -tnn -c 4 {_SYN_FILTER}", (_CURL_LOOPBACK,)),),
            role="dnat",
        ),
    ),
    tools=("curl", "tcpdump"),
)


def _tracked(flow: str, traffic: Command, *also: str) -> tuple[Step, ...]:
    """Forget the earlier entries of ``flow`` (conntrack(8) filters), make one connection,
    then list its entry and those of the ``also`` filters."""
    return (
        Command(f"conntrack -D -p tcp {flow} 2>&1 >/dev/null | tail -n 1"),
        *(Command(f"conntrack -D -p tcp {more} 2>&1 >/dev/null | tail -n 1") for more in also),
        traffic,
        Command(f"conntrack -L -p tcp {flow} 2>/dev/null"),
        *(Command(f"conntrack -L -p tcp {more} 2>/dev/null") for more in also),
    )


CONNTRACK = Exercise(
    "conntrack",
    "the connection tracking entries behind each path",
    (
        Section(
            "{d.mode}: the client's connection, DNATed",
            _tracked("--orig-src {c.client_ip} --dport {d.port}", _CURL_CLIENT),
            role="dnat",
            needs_client=True,
        ),
        Section(
            "{d.mode}: a loopback connection, DNATed and masqueraded",
            _tracked("--orig-src 127.0.0.1 --dport {d.port}", _CURL_LOOPBACK),
            role="dnat",
        ),
        Section(
            "{d.mode}: a loopback connection is two connections, with no NAT",
            _tracked(
                "--orig-src 127.0.0.1 --dport {d.port}",
                _CURL_LOOPBACK,
                "--orig-dst {d.web_ip} --dport 80",
            ),
            role="proxy",
        ),
    ),
    tools=("curl", "conntrack"),
)


_NETD_STATUS = Command("python -m netd status --data-root {d.data_root}")
_FIREWALL_COUNTERS = (
    Command("nft list chain inet {d.table} raw_prerouting", backend="nftables"),
    Command("iptables -t raw -L {d.iptables_prefix}-PREROUTING -v -n", backend="iptables"),
    Command("iptables -t nat -L {d.iptables_prefix}-DNAT -v -n", backend="iptables"),
)

COUNTERS = Exercise(
    "counters",
    "the firewall netd installed, and its counters",
    (
        Section("{d.mode}: what netd installed, live from the kernel", (_NETD_STATUS,), "dnat"),
        Section(
            "{d.mode}: the client routes straight to the container: dropped, and counted",
            (
                _CURL_CLIENT,
                Command(
                    "ip netns exec {c.netns} curl -sS --max-time 2 -o /dev/null http://{d.web_ip}/",
                    may_fail=True,
                ),
                *_FIREWALL_COUNTERS,
            ),
            role="dnat",
            needs_client=True,
        ),
        Section("{d.mode}: what netd installed, live from the kernel", (_NETD_STATUS,), "proxy"),
    ),
    tools=("curl",),
)

_HOLD_CONNECTION = (
    "exec 3<>/dev/tcp/127.0.0.1/{d.port}\n"
    "printf 'GET / HTTP/1.1\\r\\nHost: lab\\r\\n\\r\\n' >&3\n"
    'read -r status <&3; echo "$status"\n'
    "ss -tnp state established "
    "'( sport = :{d.port} or dport = :{d.port} or dst {d.web_ip} )' 3<&-\n"
    "exec 3<&-"
)

PROXY = Exercise(
    "proxy",
    "who holds the published port, and the proxy's connections",
    _per_mode(
        "{d.mode}: listening sockets, then one kept-alive HTTP connection over 127.0.0.1",
        lambda role: (
            Command("ss -tlnp '( sport = :{d.port} )'"),
            Command(_HOLD_CONNECTION),
        ),
    ),
    tools=("ss",),
)


def _address_steps(role: str) -> tuple[Step, ...]:
    return (
        Command(
            "ip netns exec {c.netns} curl -sS -o /dev/null -A lab-client-netns "
            "http://{c.host_ip}:{d.port}/"
        ),
        Command("curl -sS -o /dev/null -A lab-host-loopback http://127.0.0.1:{d.port}/"),
        Command("curl -sS -o /dev/null -A lab-host-veth http://{c.host_ip}:{d.port}/"),
        Command(
            "{d.pyengine} run --rm busybox wget -q -O /dev/null -U lab-container "
            "http://{c.host_ip}:{d.port}/"
        ),
        Command("{d.pyengine} logs web 2>/dev/null | grep ' \"lab-' | tail -n 4"),
    )


CLIENT_ADDRESS = Exercise(
    "client-address",
    "the client address nginx logs, per client and per mode",
    _per_mode("{d.mode}: four clients, then nginx's access log", _address_steps, True),
)


def _bench_steps(role: str) -> tuple[Step, ...]:
    ab = "ab -q -t 2 -n 1000000 -c 4 {url} 2>&1 | grep -E '^(Complete|Failed|Requests per)'"
    return (
        Command(ab.format(url="http://127.0.0.1:{d.port}/")),
        Command("ip netns exec {c.netns} " + ab.format(url="http://{c.host_ip}:{d.port}/")),
    )


BENCH = Exercise(
    "bench",
    "a short load on each path (ab, 2 s each)",
    _per_mode("{d.mode}: from the host's loopback, then from the client", _bench_steps, True),
    tools=("ab",),
)

EXERCISES: dict[str, Exercise] = {
    e.name: e for e in (PUBLISH, PACKETS, CONNTRACK, COUNTERS, PROXY, CLIENT_ADDRESS, BENCH)
}

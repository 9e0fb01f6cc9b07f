"""Is a page's captured listing still what its recipe produces? Both sides are normalised
first: what differs from run to run by nature (ids, pids, fds, times, counters, sizes,
ephemeral ports, TCP sequence numbers, load results) becomes a placeholder, so what is left is
what the page claims: commands, rule sets, chains, hooks, priorities, addresses the lab
fixes, messages. Listening sockets are compared as a set (their order in ss(8) follows
kernel hash order, and how many proxy processes hold them is not what a page teaches), and a
run of identical lines counts as one (one proxy process per address or one for both shows the
same tree)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass

MARKER = re.compile(
    r"(?P<open><!-- capture: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(?P<close><!-- /capture -->)",
    re.S,
)

# (pattern, replacement), applied in order to every line.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        # times: ISO 8601 stamps, ps/docker ages, durations, clock times
        (r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?( UTC)?", "TIME"),
        (r"(?<![:\w])\d\d:\d\d(:\d\d(\.\d+)?)?(?![:\w])", "TIME"),
        (r"\[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", "[DATE]"),  # nginx
        (r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} TIME GMT", "DATE"),  # HTTP Date
        (r"\b[A-Z][a-z]{2} +\d{1,2} TIME\b", "DATE"),  # ls -l
        (r"after \d+ milliseconds", "after DURATION"),
        (
            r"(About an?|Less than a|\d+) (second|minute|hour)s?( ago)?",
            "AGE",
        ),
        (r"\b\d+(\.\d+)? ?(ms|us|µs|ns|s)\b", "DURATION"),
        # ids: container/image ids and digests, the names netd derives from them
        (r"sha256:[0-9a-f]{64}", "sha256:ID"),
        (r"\b[0-9a-f]{12,64}\b", "ID"),
        (r"\bpye[0-9a-f]{10}\b", "pyeID"),
        (r"\bpyengine-[0-9a-f]{12}\b", "pyengine-ID"),
        # processes and descriptors
        (r"\b(pid|fd|ino|sk|id|use|mark)=\d+", r"\1=N"),
        (r"\bpid \d+", "pid N"),
        (r"-p \d+(,\d+)+", "-p PIDS"),  # ps's list, not a published port
        (r'"\d+"', '"N"'),  # the process table of GET /containers/ID/top
        # ps -o pid,ppid,sid / pid,comm: right-aligned, so the width follows the pids
        (r"^\s*\d+\s+\d+\s+\d+(?=\s)", "PID  PPID  SID"),
        (r"^([a-z][\w-]*\s+)\d+(\s+)\d+(\s+)\d+(?=\s)", r"\1PID\2PPID\3C"),  # docker top
        (r"^ID(\s+)\d+(?=\s)", r"ID\1PID"),  # runc list
        (r"^\s*\d+\s+(?=[a-z])", "PID  "),
        # counters: nft, iptables-save, iptables -v
        (r"packets \d+ bytes \d+", "packets N bytes N"),
        (r"\[\d+:\d+\]", "[N:N]"),
        (r"^(\s*)\d+[KMG]?(\s+)\d+[KMG]?(\s+)(?=[A-Z]|all|tcp|udp|\w+\s)", r"\1N\2N\3"),
        # interface indexes
        (r"^\d+: ", "N: "),
        (r"@if\d+", "@ifN"),
        # conntrack: entries deleted, the entry's timeout
        (r"\d+ flow entries", "N flow entries"),
        (r"^(tcp|udp)(\s+)(\d+)(\s+)\d+(\s+)", r"\1\2\3\4TIMEOUT\5"),
        # ephemeral ports (Linux's default range starts at 32768)
        (r"(?<=[:.= ])(3[2-9]\d{3}|[4-6]\d{4})\b", "EPHEMERAL"),
        (r"(sport=)\d+", r"\1EPHEMERAL"),
        # tcpdump: sequence numbers, windows, timestamps, lengths
        (r"\b(seq|ack|win|val|ecr|length) \d+(:\d+)?", r"\1 N"),
        # sizes and loads
        (r"\b\d+(\.\d+)? ?([kKMG]i?B|B|kb|bytes)\b", "SIZE"),
        (r"(Content-Length: )\d+", r"\1N"),  # a body that holds pids
        (r"(Requests per second:\s+)[\d.]+.*", r"\1N"),
        (r"(Complete requests:\s+)\d+", r"\1N"),
        (r"(Failed requests:\s+)\d+", r"\1N"),
        (r"\b\d+(\.\d+)?%", "N%"),
        (r"(?<=[ (])\d+ ?[/x] ?\d+\b(?= )", "N/N"),
        # the machine: kernel, Python and aiohttp versions
        (r'"(KernelVersion|GoVersion)": "[^"]*"', r'"\1": "VERSION"'),
        (r"aiohttp/[\d.]+", "aiohttp/VERSION"),
        # column widths follow the widest cell
        (r"(?<=\S)\s{2,}", "  "),
    )
)

# A socket line of ss(8): [state] Recv-Q Send-Q local peer [process]
_SOCKET = re.compile(r"^((?:LISTEN|UNCONN|ESTAB)\s+)?\d+\s+\d+\s+(?=\S+:\S+\s+\S+:\S+)")


def normalise(text: str) -> list[str]:
    lines: list[str] = []
    for raw in text.rstrip("\n").splitlines():
        line = raw.rstrip()
        for pattern, replacement in _RULES:
            line = pattern.sub(replacement, line)
        if lines and lines[-1] == line:
            continue  # a run of identical lines counts as one
        lines.append(line)
    return _sorted_sockets(lines)


def _sorted_sockets(lines: list[str]) -> list[str]:
    """Each block of consecutive ss(8) socket lines, as a sorted set."""
    out: list[str] = []
    block: list[str] = []
    for line in [*lines, ""]:
        if _SOCKET.match(line):
            block.append(_SOCKET.sub(r"\1Q  Q  ", line))  # queue lengths vary
            continue
        out += sorted(set(block))
        block = []
        out.append(line)
    return out[:-1]


@dataclass(frozen=True)
class Drift:
    page: str
    name: str
    diff: str


def listings(text: str) -> Iterator[tuple[str, str]]:
    """(recipe name, listing) of each marked block of a page."""
    for m in MARKER.finditer(text):
        yield m["name"], m["body"]


def drift(page: str, text: str, results: dict[str, str]) -> list[Drift]:
    """The listings of ``text`` (the page ``page``) that differ from this run's ``results``
    once normalised, each with a unified diff of the normalised listings."""
    found = []
    for name, body in listings(text):
        if name not in results:
            continue
        want, got = normalise(body), normalise(results[name])
        if want != got:
            diff = "\n".join(
                difflib.unified_diff(
                    want, got, f"{page} [{name}] (page)", f"{page} [{name}] (this run)", lineterm=""
                )
            )
            found.append(Drift(page, name, diff))
    return found

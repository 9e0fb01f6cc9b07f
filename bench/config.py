"""What a run measures and how long: the default (reference) profile and ``--quick``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/cache/pyengine/images"))

# The variants, in the order they alternate (A B C ... A B C ...).
VARIANTS: dict[str, str] = {
    "direct": "host -> container address, no NAT (the ceiling)",
    "dnat-ext": "external client netns -> host veth address:port, kernel DNAT "
    "(pyengined --userland-proxy=false)",
    "dnat-lo": "host -> 127.0.0.1:port, kernel DNAT in OUTPUT with route_localnet "
    "(pyengined --userland-proxy=false)",
    "pyengine-proxy": "host -> 127.0.0.1:port -> pyengine-proxy (pyengined --userland-proxy=true)",
    "pyengine-proxy-transparent": "external client netns -> host veth address:port -> "
    "pyengine-proxy from the client's address (label pyengine.proxy-mode=transparent)",
    "docker-proxy": "host -> 127.0.0.1:port -> Docker's docker-proxy, started by hand",
    "socat": "host -> 127.0.0.1:port -> socat fork, started by hand",
}
PROXY_VARIANTS = ("pyengine-proxy", "pyengine-proxy-transparent", "docker-proxy", "socat")
REFERENCES = ("dnat-lo", "docker-proxy")  # the headline ratios divide by these
# The studies, in the order they run; "publish" includes the DNAT connection rate.
STUDIES = ("memory", "datapath", "first-response", "publish")
DOCKERD_ROWS = ("dnat", "docker-proxy", "pyengine-proxy")


@dataclass
class BenchConfig:
    out: Path
    quick: bool = False
    repeat: int = 5  # data-path repetitions, alternated across variants
    duration_s: int = 3  # per iperf3 / wrk sample
    udp_rate: str = "500M"  # iperf3 -b
    udp_length: int = 1400  # iperf3 -l
    wrk_threads: int = 2
    wrk_connections: int = 50
    publish_counts: tuple[int, ...] = (0, 1, 100, 1000, 10000)
    publish_repeat: int = 2
    # One pyengine-proxy process per port (both families): 10,000 of them fit on this kind of
    # machine; docker-proxy's (two per port) stop at docker_publish_max.
    proxy_publish_max: int = 10000
    connrate_duration_s: int = 3
    connect_probe_s: float = 2.0  # connect() latency, one at a time, before each wrk run
    # The publishing study also against Debian's dockerd (when it is installed and the host's
    # iptables hold no Docker chains), up to docker_publish_max ports.
    docker: bool = True
    docker_publish_max: int = 1000
    # Which dockerd rows: "dnat"; "docker-proxy" and "pyengine-proxy" (proxy mode, its own
    # docker-proxy or --userland-proxy-path to pyengine's launcher).
    dockerd_rows: tuple[str, ...] = DOCKERD_ROWS
    studies: tuple[str, ...] = STUDIES
    first_response_repeat: int = 5
    variants: tuple[str, ...] = tuple(VARIANTS)
    metrics: tuple[str, ...] = ()  # empty: every data-path metric
    backends: tuple[str, ...] = ()  # empty: every backend pyengined offers
    # A sample during which other processes used more than this many CPUs on average is
    # "disturbed" and measured again, up to redo_disturbed more times.
    disturbed_cpus: float = 0.25
    redo_disturbed: int = 1
    redo_budget: float = 0.15  # at most this share of the data-path samples is measured again
    install_missing: bool = False
    image_cache: Path = field(default_factory=lambda: IMAGE_CACHE)

    @classmethod
    def quick_profile(cls, out: Path) -> BenchConfig:
        """Every variant once, at small sizes: about a minute."""
        return cls(
            out=out,
            quick=True,
            repeat=1,
            duration_s=1,
            publish_counts=(0, 1, 10),
            publish_repeat=1,
            proxy_publish_max=10,
            docker_publish_max=10,
            connrate_duration_s=1,
            connect_probe_s=0.5,
            first_response_repeat=1,
            redo_disturbed=0,
        )

    def validate(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(
                f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})"
            )
        unknown = [s for s in self.studies if s not in STUDIES]
        if unknown or not self.studies:
            raise ValueError(
                f"unknown or no studies {', '.join(unknown)} (known: {', '.join(STUDIES)})"
            )
        unknown = [r for r in self.dockerd_rows if r not in DOCKERD_ROWS]
        if unknown:
            raise ValueError(
                f"unknown dockerd row(s) {', '.join(unknown)} (known: {', '.join(DOCKERD_ROWS)})"
            )
        if self.repeat < 1 or self.duration_s < 1:
            raise ValueError("--repeat and --duration must be at least 1")
        if any(n < 0 for n in self.publish_counts):
            raise ValueError("--publish-counts must be >= 0")
        if max(self.publish_counts, default=0) > 15000:
            raise ValueError("--publish-counts: at most 15000 ports (free ports below 32000)")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["image_cache"] = str(self.image_cache)
        return doc

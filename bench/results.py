"""Raw samples, their summaries, and the JSON document a run writes.

A *sample* is one measurement: one study, one metric, one variant, one repetition, with the
numbers it produced (``values``) and how busy the machine was meanwhile. Everything a report or
a plot shows is computed from the samples, so ``results.json`` alone can regenerate both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.jsonstate import read_json, write_json_atomic

SCHEMA = "pyengine-bench/1"
STUDIES = ("datapath", "memory", "first-response", "publish", "connrate")


@dataclass
class Sample:
    study: str  # one of STUDIES
    metric: str  # e.g. "tcp-1", "http-close", "idle-fresh", "run"
    variant: str  # e.g. "dnat-lo", "docker-proxy", "dnat/nftables"
    rep: int  # 0-based repetition
    values: dict[str, float | None] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"ports": 1000}
    error: str | None = None
    started: float = 0.0  # unix time
    wall_s: float = 0.0
    # CPU seconds over the sample: the whole machine, what this benchmark's processes used,
    # and the difference (unrelated load on a shared machine).
    load: dict[str, float] = field(default_factory=dict)
    disturbed: bool = False
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float
    count: int


def summarize(values: Iterable[float | None]) -> Stat | None:
    """Median, min and max of the finite values; None when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return Stat(statistics.median(finite), min(finite), max(finite), len(finite))


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


@dataclass
class Results:
    command: str
    run_id: str
    started: str  # RFC 3339
    quick: bool
    config: dict[str, Any]
    machine: dict[str, Any]
    tools: dict[str, str]
    # Lists, not objects: the order is the run's order, and JSON objects are written sorted.
    variants: list[dict[str, str]]  # {"name": ..., "path": the path it measures}
    metrics: list[dict[str, str]]  # {"id": ..., "title": ...}
    samples: list[Sample] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"what": ..., "why": ...}
    notes: list[str] = field(default_factory=list)
    finished: str = ""
    completed: bool = False
    aborted: str = ""  # why the run stopped early, if it did
    plots: list[str] = field(default_factory=list)  # file names under plots/
    environment: dict[str, Any] = field(default_factory=dict)  # names, addresses, pids used
    schema: str = SCHEMA

    @property
    def variant_names(self) -> list[str]:
        return [v["name"] for v in self.variants]

    @property
    def metric_ids(self) -> list[str]:
        return [m["id"] for m in self.metrics]

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def select(
        self, study: str, metric: str | None = None, variant: str | None = None, **params: Any
    ) -> list[Sample]:
        """Successful samples matching the filters (``params`` compare with ``Sample.params``)."""
        return [
            s
            for s in self.samples
            if s.ok
            and s.study == study
            and (metric is None or s.metric == metric)
            and (variant is None or s.variant == variant)
            and all(s.params.get(k) == v for k, v in params.items())
        ]

    def stat(self, study: str, metric: str, variant: str, key: str, **params: Any) -> Stat | None:
        return summarize(s.values.get(key) for s in self.select(study, metric, variant, **params))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Results:
        fields = dict(doc)
        fields["samples"] = [Sample(**s) for s in doc.get("samples", [])]
        return cls(**fields)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> Results:
        doc = read_json(path)
        if doc is None:
            raise FileNotFoundError(f"{path} does not exist")
        return cls.from_json(doc)


def check_document(doc: dict[str, Any]) -> list[str]:
    """Problems that make ``doc`` not a well-formed results document (empty list: fine)."""
    problems: list[str] = []
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema is {doc.get('schema')!r}, want {SCHEMA!r}")
    for key in (
        "command",
        "run_id",
        "started",
        "finished",
        "machine",
        "tools",
        "variants",
        "metrics",
    ):
        if not doc.get(key):
            problems.append(f"{key} is missing or empty")
    samples = doc.get("samples")
    if not isinstance(samples, list) or not samples:
        return [*problems, "no samples"]
    for i, s in enumerate(samples):
        where = f"sample {i} ({s.get('study')}/{s.get('metric')}/{s.get('variant')})"
        if s.get("study") not in STUDIES:
            problems.append(f"{where}: unknown study")
        if not isinstance(s.get("rep"), int) or s["rep"] < 0:
            problems.append(f"{where}: bad rep")
        values = s.get("values")
        if not isinstance(values, dict):
            problems.append(f"{where}: values is not an object")
            continue
        for key, value in values.items():
            if value is None:
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                problems.append(f"{where}: {key} = {value!r} is not a finite number >= 0")
        if s.get("error") is None and not any(v is not None for v in values.values()):
            problems.append(f"{where}: succeeded but holds no value")
    return problems

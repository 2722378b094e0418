"""Results: ``Result`` (with the exit code it means) and ``summarize``, which merges the
per-process reports and their per-second histograms into totals and a timeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtest.config import LoadConfig, Plan
from loadtest.errors import ERROR_KINDS, MAX_EXAMPLES
from loadtest.events import Event
from loadtest.histograms import new_histogram
from loadtest.targets import Target

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


@dataclass
class Result:
    """The merged outcome of a run. Latencies in microseconds."""

    config: LoadConfig
    target: Target
    started_at: float  # UNIX time of the common start
    duration: float  # seconds from the start to the last completion (or the end of duration)
    requests: int  # completed: successes + errors
    ok: int
    errors: dict[str, int]  # by kind, every kind present
    error_examples: dict[str, list[str]]
    percentiles: dict[str, int]  # p50 p90 p99 p99.9 max (us), plus mean
    timeline: list[dict[str, Any]]  # one entry per second
    events: list[Event] = field(default_factory=list)
    # When each error happened (UNIX time, kind), the first MAX_ERROR_TIMES per process: what
    # scripts/soak.py holds against the times of its faults.
    error_times: list[tuple[float, str]] = field(default_factory=list)
    histogram: HdrHistogram | None = field(default=None, repr=False)
    interrupted: bool = False
    bad_event_lines: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    def passed(self, max_errors: int | None = None) -> bool:
        limit = self.config.max_errors if max_errors is None else max_errors
        return self.error_count <= limit

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if self.passed() else EXIT_ERRORS


def percentiles_of(hist: HdrHistogram) -> dict[str, int]:
    """The summary's percentiles (us); zeros when nothing succeeded."""
    if hist.get_total_count() == 0:
        return {name: 0 for name, _ in PERCENTILES} | {"max": 0, "mean": 0}
    values = {name: int(hist.get_value_at_percentile(p)) for name, p in PERCENTILES}
    values["max"] = int(hist.get_max_value())
    values["mean"] = int(round(hist.get_mean_value()))
    return values


def merge_timeline(
    reports: Sequence[dict[str, Any]], duration: float
) -> tuple[list[dict[str, Any]], HdrHistogram]:
    """Per-second entries of every process added up, plus the whole run's histogram."""
    seconds: dict[int, dict[str, Any]] = {}
    total = new_histogram()
    for report in reports:
        for entry in report["seconds"]:
            slot = seconds.setdefault(
                entry["second"],
                {"requests": 0, "errors": dict.fromkeys(ERROR_KINDS, 0), "hist": new_histogram()},
            )
            slot["requests"] += entry["requests"]
            for kind, count in entry["errors"].items():
                slot["errors"][kind] += count
            if entry["hist"]:
                slot["hist"].decode_and_add(entry["hist"])
    last = max(seconds, default=-1)
    timeline = []
    for second in range(last + 1):  # seconds with no completion at all show as zeros
        slot = seconds.get(second)
        hist = slot["hist"] if slot else new_histogram()
        errors = slot["errors"] if slot else dict.fromkeys(ERROR_KINDS, 0)
        requests = slot["requests"] if slot else 0
        span = min(1.0, duration - second) if second == last else 1.0
        span = max(span, 1e-3)
        total.add(hist)
        timeline.append(
            {
                "second": second,
                "span": round(span, 6),
                "requests": requests,
                "errors": sum(errors.values()),
                "errors_by_kind": {k: v for k, v in errors.items() if v},
                "throughput": requests / span,
                "p50_us": int(hist.get_value_at_percentile(50)) if hist.total_count else None,
                "p99_us": int(hist.get_value_at_percentile(99)) if hist.total_count else None,
            }
        )
    return timeline, total


def summarize(
    plan: Plan, reports: Sequence[dict[str, Any]], started_at: float, events: Sequence[Event] = ()
) -> Result:
    """Merge the per-process reports into one result (no I/O)."""
    config = plan.config
    requests = sum(r["requests"] for r in reports)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    examples: dict[str, list[str]] = {kind: [] for kind in ERROR_KINDS}
    for report in reports:
        for kind, count in report["errors"].items():
            errors[kind] += count
        for kind, messages in report["examples"].items():
            for message in messages:
                if len(examples[kind]) < MAX_EXAMPLES and message not in examples[kind]:
                    examples[kind].append(message)
    error_times = sorted((started_at + t, kind) for r in reports
                         for t, kind in r.get("error_times", ()))  # fmt: skip
    last = max((r["last_completion"] for r in reports), default=0.0)
    aborted = any(r.get("aborted") for r in reports)
    if (
        config.duration is not None
        and not aborted
        and (config.requests is None or requests < config.requests)
    ):
        last = max(last, config.duration)  # a duration-bound run lasted its duration
    duration = max(last, 1e-6)
    timeline, total = merge_timeline(reports, duration)
    for entry in timeline:
        entry["time"] = round(started_at + entry["second"], 6)
    return Result(
        config=config,
        target=plan.target,
        started_at=started_at,
        duration=duration,
        requests=requests,
        ok=requests - sum(errors.values()),
        errors=errors,
        error_examples={k: v for k, v in examples.items() if v},
        percentiles=percentiles_of(total),
        timeline=timeline,
        events=sorted(events),
        error_times=error_times,
        histogram=total,
    )

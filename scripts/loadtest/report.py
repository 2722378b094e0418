"""Reporting a ``Result``: the text summary for the terminal, JSON (``--json``) and the plot
(``--plot``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from loadtest.config import LoadConfig
from loadtest.results import Result
from loadtest.targets import Target


def format_latency(micros: float) -> str:
    """Human units: 310 us, 2.10 ms, 1.23 s."""
    if micros < 1000:
        return f"{micros:.0f} us"
    if micros < 1_000_000:
        return f"{micros / 1000:.2f} ms"
    return f"{micros / 1_000_000:.2f} s"


def describe_mode(config: LoadConfig, target: Target) -> str:
    """One phrase for how the load was applied."""
    parts = []
    if target.stream:
        parts.append(config.connect)
    noun = "connection" if target.stream else "socket"
    parts.append(f"{config.concurrency} {noun}{'s' if config.concurrency != 1 else ''}")
    parts.append(f"{config.processes} process{'es' if config.processes != 1 else ''}")
    parts.append(f"open loop at {config.rate:g} req/s" if config.rate else "closed loop")
    if target.kind != "http":
        parts.append(f"{config.payload} B payload")
    return ", ".join(parts)


def format_summary(result: Result) -> str:
    """The end-of-run report, one fact per line."""
    config = result.config
    lines = [
        f"target      {result.target.uri}  ({describe_mode(config, result.target)})",
        f"requests    {result.requests} in {result.duration:.2f} s = "
        f"{result.throughput:.0f} req/s" + ("  (interrupted)" if result.interrupted else ""),
        f"successes   {result.ok}",
    ]
    kinds = ", ".join(f"{k} {n}" for k, n in result.errors.items() if n)
    lines.append(f"errors      {result.error_count}" + (f"  ({kinds})" if kinds else ""))
    for kind, messages in result.error_examples.items():
        for message in messages:
            lines.append(f"  {kind}: {message}")
    p = result.percentiles
    lines.append(
        "latency     "
        + "  ".join(f"{name} {format_latency(p[name])}" for name in ("p50", "p90", "p99", "p99.9"))
        + f"  max {format_latency(p['max'])}"
    )
    if config.rate:
        lines.append(
            f"rate        target {config.rate:g} req/s, achieved {result.throughput:.0f} req/s"
        )
    for event in result.events:
        lines.append(f"event       +{event.time - result.started_at:7.3f} s  {event.label}")
    for bad in result.bad_event_lines:
        lines.append(f"event       ignored unreadable line {bad!r}")
    verdict = "PASS" if result.passed() else "FAIL"
    lines.append(f"verdict     {verdict} ({result.error_count} errors, max {config.max_errors})")
    return "\n".join(lines)


def result_to_json(result: Result) -> dict[str, Any]:
    """The whole result as plain JSON data (``--json``)."""
    config = asdict(result.config)
    config["allow_remote"] = list(result.config.allow_remote)
    return {
        "tool": "loadtest",
        "config": config,
        "target": asdict(result.target),
        "started_at": result.started_at,
        "duration_s": result.duration,
        "interrupted": result.interrupted,
        "totals": {
            "requests": result.requests,
            "ok": result.ok,
            "errors": result.error_count,
            "throughput_rps": result.throughput,
            "passed": result.passed(),
        },
        "errors": result.errors,
        "error_examples": result.error_examples,
        "error_times": [[round(when, 6), kind] for when, kind in result.error_times],
        "latency_us": result.percentiles,
        "timeline": result.timeline,
        "events": [
            {"time": e.time, "t": e.time - result.started_at, "label": e.label}
            for e in result.events
        ],
    }


def write_json(result: Result, path: str) -> None:
    """``--json``: the full result, for scripts and later comparison."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result_to_json(result), fh, indent=2)
        fh.write("\n")


def plot(result: Result, path: str) -> None:
    """Throughput and latency (p50, p99) per second, with each event as a labelled line.

    Steps rather than lines: each value is a count over its whole second, and a dip must not
    look like it started before the second it belongs to."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    timeline = result.timeline
    edges = [entry["second"] for entry in timeline] + [
        timeline[-1]["second"] + timeline[-1]["span"] if timeline else 0.0
    ]
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6))
    top.set_title(f"{result.target.uri}: {describe_mode(result.config, result.target)}", fontsize=9)
    if timeline:
        top.stairs([e["throughput"] for e in timeline], edges, color="tab:blue", label="req/s")
        errors = [e["errors"] / e["span"] for e in timeline]
        if any(errors):
            top.stairs(errors, edges, color="tab:red", label="errors/s")
        for name, color in (("p50_us", "tab:green"), ("p99_us", "tab:orange")):
            values = [e[name] / 1000 if e[name] else math.nan for e in timeline]
            bottom.stairs(values, edges, color=color, label=name[:3])
        top.legend(loc="lower right", fontsize=8)
        bottom.legend(loc="upper right", fontsize=8)
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since start")
    if any(e["p99_us"] for e in timeline):
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        bottom.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(ticker.NullFormatter())
    for event in result.events:
        at = event.time - result.started_at
        for axis in (top, bottom):
            axis.axvline(at, color="tab:purple", linestyle="--", linewidth=1)
        top.annotate(
            event.label, xy=(at, 0.98), xycoords=("data", "axes fraction"), rotation=90,
            va="top", ha="right", fontsize=8, color="tab:purple",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )  # fmt: skip
    top.set_xlim(left=0, right=max(result.duration, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)

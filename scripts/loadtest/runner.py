"""Orchestration: ``run`` forks the client processes, starts them together, relays progress,
gathers their reports and ends them by pid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtest.clients import _client_main
from loadtest.config import LoadConfig, Plan, make_plan
from loadtest.errors import ClientCrash
from loadtest.events import Events, read_events
from loadtest.results import Result, summarize

START_MARGIN = 0.02  # seconds between "all clients ready" and the common start time


@dataclass
class Progress:
    """What the live progress line shows, once a second."""

    elapsed: float
    requests: int
    errors: int
    rate: float  # requests per second over the last interval


@dataclass
class Shared:
    """Shared-memory state between the parent and its client processes."""

    go: Any  # Event: the start time is set
    start: Any  # RawValue('d'): the common monotonic start time
    stop: Any  # RawValue('b'): stop now (Ctrl-C, watchdog)
    counters: Any  # RawArray('q'): requests and errors per process, for progress


def _spawn(plan: Plan) -> tuple[list[Any], list[Any], Shared]:
    """Fork the client processes; each gets the write end of its own result pipe."""
    import multiprocess

    ctx = multiprocess.get_context("fork")
    shared = Shared(
        go=ctx.Event(),
        start=ctx.RawValue("d", 0.0),
        stop=ctx.RawValue("b", 0),
        counters=ctx.RawArray("q", 2 * plan.processes),
    )
    procs, readers = [], []
    for index in range(plan.processes):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_client_main,
            args=(plan, index, shared, writer),
            name=f"loadtest-client-{index}",
            daemon=True,
        )
        proc.start()
        writer.close()  # the child owns the write end; EOF on ours means it is gone
        procs.append(proc)
        readers.append(reader)
    return procs, readers, shared


def _end_clients(procs: list[Any], readers: list[Any]) -> None:
    """Join every client process by pid; kill the ones that do not end in time."""
    for reader in readers:
        reader.close()
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.01))
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)


def _collect(
    plan: Plan,
    procs: list[Any],
    readers: list[Any],
    shared: Shared,
    progress: Callable[[Progress], None] | None,
) -> tuple[list[dict[str, Any]], float, float, bool]:
    """Start the clients together, relay progress, gather their reports."""
    from multiprocess.connection import wait

    ready = 0
    deadline = time.monotonic() + 30
    while ready < len(readers):
        if not wait(readers, timeout=max(deadline - time.monotonic(), 0)):
            raise ClientCrash("client processes did not start within 30 s")
        for reader in readers:
            if reader.poll():
                tag, payload = _recv(reader)
                if tag != "ready":
                    raise ClientCrash(f"client process failed at start:\n{payload}")
                ready += 1
    t0 = time.monotonic() + START_MARGIN
    started_at = time.time() + START_MARGIN
    shared.start.value = t0
    shared.go.set()

    reports: list[dict[str, Any]] = []
    pending = list(readers)
    watchdog = t0 + plan.run_seconds + plan.config.timeout + 5
    interrupted = False
    last = (t0, 0)
    next_tick = t0 + 1
    while pending:
        try:
            now = time.monotonic()
            if now > watchdog + 10:
                raise ClientCrash("client processes did not stop: killed")
            if now > watchdog:
                shared.stop.value = 1
            for reader in wait(pending, timeout=max(min(next_tick, watchdog) - now, 0)):
                pending.remove(reader)
                tag, payload = _recv(reader)
                if tag != "result":
                    raise ClientCrash(f"client process failed:\n{payload}")
                reports.append(payload)
            now = time.monotonic()
            if now >= next_tick:
                counts = shared.counters[:]
                requests, errors = sum(counts[0::2]), sum(counts[1::2])
                rate = (requests - last[1]) / max(now - last[0], 1e-9)
                last = (now, requests)
                next_tick += 1
                if progress is not None:
                    progress(Progress(now - t0, requests, errors, rate))
        except KeyboardInterrupt:
            interrupted = True
            shared.stop.value = 1  # clients abandon what is in flight and report
    return reports, t0, started_at, interrupted


def _recv(reader: Any) -> tuple[str, Any]:
    """A client's message; a client that died before sending counts as a crash."""
    try:
        return reader.recv()
    except EOFError:
        return ("crash", "the process exited without a report")


def run(
    config: LoadConfig,
    events: Events | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> Result:
    """Run the load test and return the merged result. Raises ``UsageError`` for a bad config
    before any process starts, ``ClientCrash`` if a client process fails."""
    plan = make_plan(config)
    procs, readers, shared = _spawn(plan)
    try:
        reports, _, started_at, interrupted = _collect(plan, procs, readers, shared, progress)
    finally:
        shared.stop.value = 1
        shared.go.set()  # a client still waiting for the start must not wait 60 s
        _end_clients(procs, readers)
    recorded = events.snapshot() if events is not None else []
    bad_lines: list[str] = []
    if config.events_file:
        from_file, bad_lines = read_events(config.events_file)
        recorded += from_file
    result = summarize(plan, reports, started_at, recorded)
    result.interrupted = interrupted
    result.bad_event_lines = bad_lines
    return result

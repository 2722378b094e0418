"""The watchdog: which workers are hung, read from the scoreboard.

A part of the master: it answers ``next_deadline()`` (a scan is due at least every quarter of
the interval it watches with) and ``scan`` names the workers to put down, for one of three
reasons:

- a request that has made no progress for ``--timeout`` (``hung_request``; modes that put
  down their own overdue requests, fork mode's children, are left to themselves);
- a worker that serves nothing and has not beaten its heartbeat for the watchdog interval
  (``--timeout``, or ``HEARTBEAT_DEFAULT`` when that is 0), nor served a request meanwhile:
  stopped (SIGSTOP) or wedged while idle (``silent``);
- a worker that did not become ready within ``--timeout`` of its fork.

It also finds connections idle between requests past ``--keep-alive``; their workers are
told to cut them (``workers.runtime.client``).

The decisions for one slot are pure functions; putting a worker down is the shared
``workers.runtime.escalation`` sequence, which the master runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cluster import procfs
from cluster.generation import Worker
from workers.runtime.escalation import overdue, stalled_for
from workers.runtime.scoreboard import LaneView, SlotView
from workers.runtime.spec import PARENT_CHECK_INTERVAL

SCANS_PER_INTERVAL = 4
HEARTBEAT_DEFAULT = 30.0  # seconds: the heartbeat watchdog's interval when --timeout is 0


def hung_request(view: SlotView, now: float, timeout: float) -> LaneView | None:
    """A request of the slot that has made no progress for ``timeout`` (waiting for its
    client's bytes is not hung), else None."""
    for lane in view.lanes:
        if overdue(lane.started, now, timeout, lane.io):
            return lane
    return None


def idle_too_long(view: SlotView, now: float, keep_alive: float) -> bool:
    """Whether a connection of the slot has waited for its next request past ``keep_alive``."""
    return keep_alive > 0 and any(lane.idle and now - lane.idle > keep_alive
                                  for lane in view.lanes if lane.started)  # fmt: skip


def silent(view: SlotView, now: float, interval: float, quiet_since: float) -> bool:
    """A worker with no request in progress whose heartbeat is older than ``interval`` and
    whose request count has not moved since ``quiet_since`` for as long. (A sync worker
    under load goes from request to request without the loop's idle wait that beats, so a
    moving count is a heartbeat too: it costs the request path nothing.)"""
    if view.state not in ("idle", "draining"):
        return False
    return now - view.heartbeat > interval and now - quiet_since > interval


def watch_interval(timeout: float) -> float:
    return timeout or HEARTBEAT_DEFAULT


def beat_period(timeout: float) -> float:
    """How often an idle worker beats its heartbeat: ``SCANS_PER_INTERVAL`` times per watchdog
    interval at least (a late beat is never a missed one), and at most once a second."""
    return min(PARENT_CHECK_INTERVAL, watch_interval(timeout) / SCANS_PER_INTERVAL)


@dataclass(frozen=True)
class Hung:
    """A worker to put down, and why (for the log)."""

    worker: Worker
    why: str


class Watchdog:
    def __init__(self) -> None:
        self.due = 0.0
        self.counts: dict[int, tuple[int, float]] = {}  # pid -> (requests seen, since when)
        self.stopped: dict[int, float] = {}  # pid -> since when we saw it stopped (SIGSTOP)

    def next_deadline(self) -> float:
        return self.due

    def forget(self, pid: int) -> None:
        self.counts.pop(pid, None)
        self.stopped.pop(pid, None)

    def stopped_for(self, pid: int, now: float) -> float:
        """How long ``pid`` has been seen stopped (state T: SIGSTOP, not a debugger's
        trace stop), 0 while it runs."""
        if procfs.state(pid) != "T":
            self.stopped.pop(pid, None)
            return 0.0
        return now - self.stopped.setdefault(pid, now)

    def scan(self, workers: Iterable[Worker], now: float) -> list[Hung]:
        """The workers to put down; ``idle`` is left holding those with a connection idle
        between requests past ``--keep-alive`` (told to cut it, not put down)."""
        found: list[Hung] = []
        self.idle: list[Worker] = []
        period = float("inf")
        for worker in workers:
            generation = worker.generation
            timeout = generation.config.timeout
            interval = watch_interval(timeout)
            period = min(period, interval / SCANS_PER_INTERVAL)
            if not worker.ready:
                if timeout and now - worker.spawned_at > timeout:
                    found.append(Hung(worker, f"not ready {now - worker.spawned_at:.1f}s after "
                                              f"its start, past --timeout {timeout:g}s"))  # fmt: skip
                continue
            view = worker.slot_view()
            if timeout and not generation.mode.kills_own_overdue:
                lane = hung_request(view, now, timeout)
                if lane is not None:
                    stalled = stalled_for(lane.started, lane.io, now)
                    found.append(Hung(worker, f"request from {lane.client} has made no "
                                              f"progress for {stalled:.1f}s, past --timeout "
                                              f"{timeout:g}s"))  # fmt: skip
                    continue
            # A worker stopped inside a request whose read waits for its client looks like
            # it waits, not hangs, and a stopped one never beats: ask the kernel.
            if view.state == "busy" and (stopped := self.stopped_for(worker.pid, now)) > interval:
                found.append(Hung(worker, f"stopped (SIGSTOP) for {stopped:.1f}s in the middle "
                                          f"of a request (watchdog interval {interval:g}s)"))  # fmt: skip
                continue
            keep_alive = generation.config.keep_alive
            if keep_alive:
                period = min(period, keep_alive / SCANS_PER_INTERVAL)
                if idle_too_long(view, now, keep_alive):
                    self.idle.append(worker)
            seen, since = self.counts.get(worker.pid, (-1, now))
            if view.requests != seen:
                self.counts[worker.pid] = (view.requests, now)
            elif silent(view, now, interval, since):
                found.append(Hung(worker, f"no heartbeat for {now - view.heartbeat:.1f}s while "
                                          f"idle (watchdog interval {interval:g}s)"))  # fmt: skip
        self.due = now + period
        return found

"""The watchdog: which workers are hung, read from the scoreboard.

A part of the master: it answers ``next_deadline()`` (a scan is due at least every quarter of
``--timeout``, so a request past it is seen within 1.25 timeouts) and ``scan`` names the
workers to put down. The decision for one slot is the pure ``hung_request``; putting a worker
down is the shared ``workers.runtime.escalation`` sequence, which the master runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cluster.generation import Worker
from workers.runtime.escalation import overdue
from workers.runtime.scoreboard import LaneView, SlotView

SCANS_PER_TIMEOUT = 4


def hung_request(view: SlotView, now: float, timeout: float) -> LaneView | None:
    """The oldest request of a slot if it has run past ``timeout``, else None."""
    lane = view.oldest_request()
    return lane if lane is not None and overdue(lane.started, now, timeout) else None


@dataclass(frozen=True)
class Hung:
    """A worker to put down, and why (for the log)."""

    worker: Worker
    why: str


class Watchdog:
    def __init__(self) -> None:
        self.due = 0.0

    def next_deadline(self) -> float:
        return self.due

    def scan(self, workers: Iterable[Worker], now: float) -> list[Hung]:
        """The workers whose request ran past their generation's ``--timeout``. Modes that
        put down their own overdue requests (fork mode's children) are left to themselves."""
        found: list[Hung] = []
        period = float("inf")
        for worker in workers:
            generation = worker.generation
            timeout = generation.config.timeout
            if not timeout or generation.mode.kills_own_overdue:
                continue
            period = min(period, timeout / SCANS_PER_TIMEOUT)
            lane = hung_request(worker.slot_view(), now, timeout)
            if lane is not None:
                found.append(Hung(worker, f"request from {lane.client} has run "
                                          f"{now - lane.started:.1f}s, past --timeout {timeout:g}s"))  # fmt: skip
        self.due = now + period
        return found

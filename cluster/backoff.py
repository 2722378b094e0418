"""Backoff: how long to wait before forking again, kept per scoreboard slot.

A worker that failed on its own (died before ready, or exited soon after start) backs off the
next fork *into its slot*: 0 s the first time, then 0.1 s doubling to 5 s, jittered. Other
slots fork on, so one bad slot never holds the pool below target, and workers killed from
outside (``exits.KILLED``) never back off at all. A fork that the kernel refuses (no process
or fd left) backs off every slot: that shortage is the machine's, not a slot's.

A part of the master: each generation has one. It answers ``next_deadline()`` (the loop sleeps
until then at most) and ``allows(slot, now)``. The delays are the pure ``delay`` below.
"""

from __future__ import annotations

from dataclasses import dataclass

CRASH_WINDOW = 10.0  # a worker that lived shorter than this and failed "crashed"
BASE, CAP = 0.1, 5.0  # seconds: the second respawn waits BASE, doubling up to CAP


def delay(crashes: int, rand: float) -> float:
    """Seconds to wait before forking again after ``crashes`` failures in a row.

    The first respawn is immediate; then 0.1 s doubling up to 5 s, each scaled by a jitter of
    0.5..1.5 (``rand`` in [0, 1)) so that many failing workers do not fork in lock-step.
    """
    if crashes <= 1:
        return 0.0
    return min(CAP, BASE * 2 ** (crashes - 2)) * (0.5 + rand)


def count(crashes: int, lived: float) -> int:
    """The failure count after a worker failed having lived ``lived`` seconds: a long life
    starts the count afresh."""
    return crashes + 1 if lived < CRASH_WINDOW else 1


@dataclass
class Hold:
    failures: int = 0
    until: float = 0.0


class Backoff:
    """Per-slot failure counts and not-before times, and one for the whole pool."""

    def __init__(self) -> None:
        self.slots: dict[int, Hold] = {}
        self.pool = Hold()  # forks the kernel refused

    def failed(self, slot: int, lived: float, now: float, rand: float) -> float:
        """A worker in ``slot`` failed on its own: returns how long the slot now waits."""
        hold = self.slots.setdefault(slot, Hold())
        hold.failures = count(hold.failures, lived)
        hold.until = now + delay(hold.failures, rand)
        return hold.until - now

    def start_failed(self, now: float, rand: float) -> float:
        """The kernel refused a fork: every slot waits; returns how long."""
        self.pool.failures += 1
        self.pool.until = now + max(BASE, delay(self.pool.failures + 1, rand))
        return self.pool.until - now

    def started(self) -> None:
        """A fork worked: the kernel has room again."""
        self.pool = Hold()

    def allows(self, slot: int, now: float) -> bool:
        hold = self.slots.get(slot)
        return now >= self.pool.until and (hold is None or now >= hold.until)

    def next_deadline(self, now: float) -> float:
        times = [h.until for h in (self.pool, *self.slots.values()) if h.until > now]
        return min(times, default=float("inf"))

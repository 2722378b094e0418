"""The crash-loop backoff: how long to wait before forking again after workers crashed.

A part of the master: it answers ``next_deadline()`` (the loop sleeps until then at most) and
``allows(now)`` (may the pool fork now?), and is told of every crash. The delays themselves
are the pure ``delay`` below.
"""

from __future__ import annotations

CRASH_WINDOW = 10.0  # a worker that lived shorter than this and died on its own "crashed"
BASE, CAP = 0.1, 5.0  # seconds: the second respawn waits BASE, doubling up to CAP


def delay(crashes: int, rand: float) -> float:
    """Seconds to wait before forking again after ``crashes`` crashes in a row.

    The first respawn is immediate; then 0.1 s doubling up to 5 s, each scaled by a jitter of
    0.5..1.5 (``rand`` in [0, 1)) so that many crashing workers do not fork in lock-step.
    """
    if crashes <= 1:
        return 0.0
    return min(CAP, BASE * 2 ** (crashes - 2)) * (0.5 + rand)


def count(crashes: int, lived: float) -> int:
    """The crash count after a worker died on its own having lived ``lived`` seconds."""
    return crashes + 1 if lived < CRASH_WINDOW else 0


class Backoff:
    """Consecutive crashes, and no fork before ``until``."""

    def __init__(self) -> None:
        self.crashes = 0
        self.until = 0.0

    def crashed(self, lived: float, now: float, rand: float) -> None:
        self.crashes = count(self.crashes, lived)
        self.until = now + delay(self.crashes, rand)

    def allows(self, now: float) -> bool:
        return now >= self.until

    def next_deadline(self, now: float) -> float:
        return self.until if self.until > now else float("inf")

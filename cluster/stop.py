"""The master's stop: graceful (TERM) or quick (INT, QUIT), and its deadline.

A part of the master that exists only once a stop began. It answers ``next_deadline()``; at
the deadline the master kills the workers that are left (``overdue``), after which the stop
only waits to reap them. A graceful stop that had to kill ends the master with exit code 1.
"""

from __future__ import annotations

QUICK_STOP_GRACE = 3.0  # seconds workers get to exit after QUIT before they are killed
# A graceful stop's KILL waits this much past --graceful-timeout: a worker that counts the
# same timeout from its own TERM, a moment later, then exits by itself, not by our KILL.
MARGIN = 1.0


class Stop:
    """One stop under way: how (``graceful``), why (``reason``, for the log), and until when."""

    def __init__(self, graceful: bool, grace: float, now: float, reason: str) -> None:
        self.graceful = graceful
        self.reason = reason
        self.deadline = now + (grace + MARGIN if graceful else QUICK_STOP_GRACE)
        self.killed = False  # the deadline passed and the survivors were sent KILL

    def next_deadline(self) -> float:
        return float("inf") if self.killed else self.deadline

    def overdue(self, now: float) -> bool:
        """Whether the survivors are due their KILL now (true once)."""
        if self.killed or now < self.deadline:
            return False
        self.killed = True
        return True

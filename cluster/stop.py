"""The master's stop: graceful (TERM) or quick (INT, QUIT), and its deadline; before a
graceful one, the drain delay.

``DrainDelay`` is the first phase of a TERM with ``--drain-delay S``: for S seconds the
master serves on as before (workers keep accepting, crashed ones are replaced) while its
health says ``draining``, so that the balancer moves traffic away before anything is refused.
Then the ``Stop`` proper begins. A second TERM cuts the delay short (the graceful stop starts
at once, a third is quick); INT or QUIT stop quickly at any time.

A part of the master that exists only once a stop began. It answers ``next_deadline()``; at
the deadline the master kills the workers that are left (``overdue``), after which the stop
only waits to reap them. A graceful stop that had to kill ends the master with exit code 1.
"""

from __future__ import annotations

QUICK_STOP_GRACE = 3.0  # seconds workers get to exit after QUIT before they are killed
# A graceful stop's KILL waits this much past --graceful-timeout: a worker that counts the
# same timeout from its own TERM, a moment later, then exits by itself, not by our KILL.
MARGIN = 1.0
NUDGE_EVERY = 1.0  # seconds between the graceful stop's reminders to cut idle connections


class Stop:
    """One stop under way: how (``graceful``), why (``reason``, for the log), and until when."""

    def __init__(self, graceful: bool, grace: float, now: float, reason: str,
                 handover: bool = False) -> None:  # fmt: skip
        self.graceful = graceful
        self.reason = reason
        # The stop an upgrade's new master asked for by saying ready, and nobody else since:
        # a second stop of the operator's is quick, and a new master that dies meanwhile
        # gets the host back (``Master.take_back``).
        self.handover = handover
        self.deadline = now + (grace + MARGIN if graceful else QUICK_STOP_GRACE)
        self.killed = False  # the deadline passed and the survivors were sent KILL
        self.nudge_at = now + NUDGE_EVERY  # graceful: ask the workers to cut idle connections

    def next_deadline(self) -> float:
        if self.killed:
            return float("inf")
        return min(self.deadline, self.nudge_at) if self.graceful else self.deadline

    def nudge(self, now: float) -> bool:
        """Time to ask the workers, again, to close the connections idle between requests
        (their own timer does it too; this is the second way, in case a worker missed it)."""
        if not self.graceful or self.killed or now < self.nudge_at:
            return False
        self.nudge_at = now + NUDGE_EVERY
        return True

    def overdue(self, now: float) -> bool:
        """Whether the survivors are due their KILL now (true once)."""
        if self.killed or now < self.deadline:
            return False
        self.killed = True
        return True


class DrainDelay:
    """The drain delay under way: until when, and for which stop (``reason``, for the log)."""

    def __init__(self, seconds: float, now: float, reason: str) -> None:
        self.seconds = seconds
        self.reason = reason
        self.deadline = now + seconds

    def next_deadline(self) -> float:
        return self.deadline

    def over(self, now: float) -> bool:
        return now >= self.deadline

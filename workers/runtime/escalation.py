"""Putting down a hung process: a stack dump and TERM at once, then KILL after a grace.

A request is hung when it makes no progress: waiting for its client's next bytes is not
hung (that wait is bounded by the handler's own socket timeout, or by ``--keep-alive``
between requests); computing, sleeping or blocking on anything else for ``--timeout`` is.

One sequence for both of its users: the master, for a worker whose request ran past
``--timeout``, and a fork-mode worker, for a request child that did. The decisions are pure
(times come in as arguments, signals go out as return values) so tests drive them without
processes; the callers send the signals.
"""

from __future__ import annotations

import signal

from workers.runtime.spec import STACK_DUMP_SIGNAL

KILL_GRACE = 1.0  # seconds between TERM and KILL for a process that does not exit
FIRST_SIGNALS = (STACK_DUMP_SIGNAL, signal.SIGTERM)  # the dump is written before TERM lands


def stalled_for(started: float, io: float, now: float) -> float:
    """Seconds a request (begun at ``started``; 0: none) has made no progress: 0 while it
    waits for its client's bytes (``io`` > 0, see ``scoreboard.Lane``), else the time since
    it began or since its last read from the client returned, whichever is later."""
    if started <= 0 or io > 0:
        return 0.0
    return now - max(started, -io)


def overdue(started: float, now: float, timeout: float, io: float = 0.0) -> bool:
    """Whether a request has made no progress for longer than ``timeout`` (0: never)."""
    return timeout > 0 and stalled_for(started, io, now) > timeout


class Escalation:
    """The processes being put down, and when each one is due its KILL."""

    def __init__(self, grace: float = KILL_GRACE) -> None:
        self.grace = grace
        self._kill_at: dict[int, float] = {}

    def __contains__(self, pid: int) -> bool:
        return pid in self._kill_at

    def begin(self, pid: int, now: float) -> tuple[int, ...]:
        """Start on ``pid``: the signals to send it now (none if it is already under way)."""
        if pid in self._kill_at:
            return ()
        self._kill_at[pid] = now + self.grace
        return FIRST_SIGNALS

    def due(self, now: float) -> list[int]:
        """The pids whose grace ran out: send each one KILL (each is returned only once)."""
        pids = [pid for pid, at in self._kill_at.items() if now >= at]
        for pid in pids:
            self._kill_at[pid] = float("inf")
        return pids

    def next_deadline(self) -> float:
        return min(self._kill_at.values(), default=float("inf"))

    def forget(self, pid: int) -> None:
        """``pid`` exited (and was reaped): nothing more to send it."""
        self._kill_at.pop(pid, None)

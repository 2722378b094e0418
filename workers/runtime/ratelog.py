"""Log lines about misbehaving clients, at a bounded rate.

A client that resets, drips bytes or sends nothing is the client's problem, not the server's,
but the operator wants to know it happens. One line per event would let any client write the
log for us (a thousand resets once wrote 35,000 lines of tracebacks), so each kind of event
gets a budget: ``burst`` lines per ``period`` seconds, per process. Past it, events are only
counted, and the next line that goes out says how many were left unsaid.

The decision (``Budget.allow``) is a pure function of the clock, for the tests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from time import monotonic

PERIOD = 10.0  # seconds over which a kind of event gets its budget of lines
BURST = 20  # lines per period (two a second, on average)


@dataclass
class Budget:
    """How many lines of one kind went out in the current period, and how many were held."""

    period: float = PERIOD
    burst: int = BURST
    started: float = float("-inf")  # when the current period began
    spent: int = 0
    held: int = 0  # events not logged since the last line that went out

    def allow(self, now: float) -> int | None:
        """None: do not log this event (it is counted). Otherwise log it, and add that this
        many events went unlogged before it."""
        if now - self.started >= self.period:
            self.started, self.spent = now, 0
        if self.spent >= self.burst:
            self.held += 1
            return None
        self.spent += 1
        held, self.held = self.held, 0
        return held


class RateLimitedLog:
    """One kind of client event, logged within its ``Budget``."""

    def __init__(self, logger: logging.Logger, budget: Budget | None = None) -> None:
        self.logger = logger
        self.budget = budget or Budget()

    def warning(self, message: str, *args: object) -> bool:
        """Log ``message % args`` if the budget allows; say whether it went out."""
        held = self.budget.allow(monotonic())
        if held is None:
            return False
        if held:
            message += f" (and {held} more like it since the last such line)"
        self.logger.warning(message, *args)
        return True

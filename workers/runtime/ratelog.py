"""Log lines about misbehaving clients, at a bounded rate.

A client that resets, drips bytes or sends nothing is the client's problem, not the server's,
but the operator wants to know it happens. One line per event would let any client write the
log for us (a thousand resets once wrote 35,000 lines of tracebacks), so each kind of event
gets a budget: ``burst`` lines per ``period`` seconds, per worker. Past it, events are only
counted, and the next line that goes out says how many were left unsaid.

Per worker, not per process: in fork mode every request is a process of its own, and a
budget that each child started afresh would let a flood of bad clients write a line each.
So a worker's budgets live in its scoreboard slot (``share``, at boot), where its request
children spend from the same ones; before that, and in processes without a slot, each
``RateLimitedLog`` keeps its own. Two processes spending at the same instant may both get
the last line: a bound on the log's rate needs no lock.

The decision (``allow``) is a pure function of a budget's state and the clock, for the tests.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from time import monotonic
from typing import Protocol

PERIOD = 10.0  # seconds over which a kind of event gets its budget of lines
BURST = 20  # lines per period (two a second, on average)

# The kinds of event, each with its own budget in a worker's scoreboard slot.
CUT, GONE, DROPPED, REJECTED = range(4)
KINDS = 4


class BudgetState(Protocol):
    started: float  # when the current period began
    spent: int  # lines out in it
    held: int  # events not logged since the last line that went out


@dataclass
class Budget:
    """A budget of one process (``BudgetState``), for a log that has no slot to share."""

    started: float = float("-inf")
    spent: int = 0
    held: int = 0


class SharedBudget(ctypes.Structure):
    """The same state in shared memory: one per kind in each scoreboard slot."""

    _fields_ = [
        ("started", ctypes.c_double),
        ("spent", ctypes.c_int32),
        ("held", ctypes.c_int32),
    ]


def allow(
    budget: BudgetState, now: float, period: float = PERIOD, burst: int = BURST
) -> int | None:
    """None: do not log this event (it is counted). Otherwise log it, and add that this many
    events went unlogged before it."""
    if now - budget.started >= period:
        budget.started, budget.spent = now, 0
    if budget.spent >= burst:
        budget.held += 1
        return None
    budget.spent += 1
    held, budget.held = budget.held, 0
    return held


class Shared:
    """The budgets of this process's worker, once bound (``share``)."""

    budgets: ctypes.Array | None = None


SHARED = Shared()


def share(budgets: ctypes.Array) -> None:
    """Spend from the worker's slot from now on (the worker, at boot; its children inherit)."""
    SHARED.budgets = budgets


class RateLimitedLog:
    """One kind of client event, logged within its budget."""

    def __init__(self, logger: logging.Logger, kind: int, period: float = PERIOD,
                 burst: int = BURST) -> None:  # fmt: skip
        self.logger, self.kind, self.period, self.burst = logger, kind, period, burst
        self.budget: BudgetState = Budget()  # until the worker shares its slot's

    def state(self) -> BudgetState:
        shared = SHARED.budgets
        return shared[self.kind] if shared is not None else self.budget

    def warning(self, message: str, *args: object) -> bool:
        """Log ``message % args`` if the budget allows; say whether it went out."""
        held = allow(self.state(), monotonic(), self.period, self.burst)
        if held is None:
            return False
        if held:
            message += f" (and {held} more like it since the last such line)"
        self.logger.warning(message, *args)
        return True

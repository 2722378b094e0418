"""Pool decisions as pure functions of the workers' state: no processes, no clocks of their own.

The master asks these what to do and then does it; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """What the decisions need to know of one worker."""

    pid: int
    slot: int
    generation: int
    spawned_at: float
    ready: bool = False
    retiring: bool = False
    idle: bool = False  # ready and running no request (from the scoreboard)


@dataclass(frozen=True)
class Plan:
    """What the master should do now: fork ``spawn`` workers of the current generation,
    and retire these pids gracefully."""

    spawn: int = 0
    retire: tuple[int, ...] = ()


def plan(target: int, generation: int, strategy: str, workers: Sequence[WorkerView]) -> Plan:
    """The one pool decision: steady state, or a reload in progress.

    ``generation`` is the one we want serving; workers of older generations are replaced:
    with ``all``, a whole new generation boots and only once every one of them is ready are
    the old retired; with ``rolling``, one at a time, each old worker retired only after a new
    one is ready, and the next new one forked only after that old one exited, so that between
    ``target`` and ``target + 1`` processes are alive throughout.
    """
    live = [w for w in workers if not w.retiring]
    current = [w for w in live if w.generation == generation]
    old = [w for w in live if w.generation != generation]
    if not old:
        return Plan(spawn=max(0, target - len(current)), retire=tuple(to_retire(target, current)))
    booting = [w for w in current if not w.ready]
    if strategy == "all":
        if len(current) < target:
            return Plan(spawn=target - len(current))
        if booting:
            return Plan()
        return Plan(retire=tuple(w.pid for w in old))
    # rolling
    if booting:
        return Plan()
    if len(current) + len(old) > target:  # a new one is ready: one old one may go
        oldest = min(old, key=lambda w: w.spawned_at)
        return Plan(retire=(oldest.pid,))
    alive = len(workers)  # retiring ones too: they still run until they exit
    if alive < target + 1 and len(current) < target:
        return Plan(spawn=1)
    return Plan()


def to_retire(target: int, workers: Sequence[WorkerView]) -> list[int]:
    """Pids to retire gracefully when more than ``target`` are active: booting ones first
    (they serve nobody yet), then idle ones, then the youngest (the oldest have proven
    they work)."""
    active = [w for w in workers if not w.retiring]
    excess = len(active) - target
    if excess <= 0:
        return []
    order = sorted(active, key=lambda w: (w.ready, not w.idle, -w.spawned_at))
    return [w.pid for w in order[:excess]]


def adapt(
    target: int, idle: int, min_spare: int, max_spare: int, bound: int, rate: int
) -> tuple[int, int]:
    """One second of Apache-prefork-style adaptation: (new target, next spawn rate).

    Too few idle workers: grow by ``rate`` (1, 2, 4, ... doubling each second the shortage
    lasts, up to 8 and to ``bound``). Too many: shrink by one per second, never below 1.
    """
    if idle < min_spare and target < bound:
        grown = min(bound, target + rate)
        return grown, min(rate * 2, MAX_SPAWN_RATE)
    if idle > max_spare and target > 1:
        return target - 1, 1
    return target, 1


MAX_SPAWN_RATE = 8
ADAPT_PERIOD = 1.0  # seconds between two steps of the adaptive pool


class Adaptive:
    """The pacing of ``adapt``: one step a second, the spawn rate carried between steps.

    A part of the master, present only with --min-spare/--max-spare: it answers
    ``next_deadline()``, and ``step`` returns the new target when a step is due (else None).
    """

    def __init__(self, now: float) -> None:
        self.rate = 1
        self.due = now + ADAPT_PERIOD

    def next_deadline(self) -> float:
        return self.due

    def step(self, now: float, target: int, idle: int, min_spare: int, max_spare: int,
             bound: int) -> int | None:  # fmt: skip
        if now < self.due:
            return None
        self.due = now + ADAPT_PERIOD
        wanted, self.rate = adapt(target, idle, min_spare, max_spare, bound, self.rate)
        return wanted


def free_slots(used: Iterable[int], count: int, capacity: int) -> list[int]:
    """The ``count`` lowest slot numbers below ``capacity`` that no live worker holds (slots
    index the scoreboard). The fixed choice matters for backoff: a slot that waits out its
    backoff is not dodged by forking into the next free one instead."""
    taken = set(used)
    return [slot for slot in range(capacity) if slot not in taken][:count]


def request_limit(max_requests: int, jitter: int, rand: float) -> int:
    """One worker's ``--max-requests``: N plus a share ``rand`` in [0, 1) of 0..J, so that
    workers started together do not all recycle at the same moment. 0 means never."""
    if max_requests <= 0:
        return 0
    return max_requests + int(rand * (jitter + 1))

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


def to_spawn(target: int, workers: Iterable[WorkerView]) -> int:
    """How many workers to fork now so that ``target`` are serving or booting."""
    active = sum(1 for w in workers if not w.retiring)
    return max(0, target - active)


def to_retire(target: int, workers: Sequence[WorkerView]) -> list[int]:
    """Pids to retire gracefully when more than ``target`` are active: booting ones first
    (they serve nobody yet), then the youngest (the oldest have proven they work)."""
    active = [w for w in workers if not w.retiring]
    excess = len(active) - target
    if excess <= 0:
        return []
    order = sorted(active, key=lambda w: (w.ready, -w.spawned_at))
    return [w.pid for w in order[:excess]]


def free_slot(used: Iterable[int]) -> int:
    """The lowest slot number no live worker holds (slots index the scoreboard)."""
    taken = set(used)
    slot = 0
    while slot in taken:
        slot += 1
    return slot


def rescale(target: int, delta: int, bound: int) -> tuple[int, str | None]:
    """The pool size after TTIN (+1) or TTOU (-1), and why it was refused, if it was."""
    wanted = target + delta
    if wanted < 1:
        return target, f"refused: the pool cannot shrink below 1 worker (now {target})"
    if wanted > bound:
        return target, f"refused: the pool cannot grow past --max-workers {bound} (now {target})"
    return wanted, None


def request_limit(max_requests: int, jitter: int, rand: float) -> int:
    """One worker's ``--max-requests``: N plus a share ``rand`` in [0, 1) of 0..J, so that
    workers started together do not all recycle at the same moment. 0 means never."""
    if max_requests <= 0:
        return 0
    return max_requests + int(rand * (jitter + 1))


CRASH_WINDOW = 10.0  # a worker that lived shorter than this and died on its own "crashed"
BACKOFF_BASE, BACKOFF_CAP = 0.1, 5.0


def respawn_delay(crashes: int, rand: float) -> float:
    """Seconds to wait before forking again after ``crashes`` crashes in a row.

    The first respawn is immediate; then 0.1 s doubling up to 5 s, each scaled by a jitter
    of 0.5..1.5 (``rand`` in [0, 1)) so that many crashing workers do not fork in lock-step.
    """
    if crashes <= 1:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (crashes - 2)) * (0.5 + rand)


def count_crash(crashes: int, lived: float) -> int:
    """The crash count after a worker died on its own having lived ``lived`` seconds."""
    return crashes + 1 if lived < CRASH_WINDOW else 0


def overdue(started: float, now: float, timeout: float) -> bool:
    """Whether a request that began at ``started`` (0: no request) has run past ``timeout``."""
    return timeout > 0 and started > 0 and now - started > timeout


def describe_exit(exitcode: int | None) -> str:
    """How a worker died, for the log: 'exited with code 0' or 'killed by SIGKILL'."""
    import signal

    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"

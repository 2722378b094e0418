"""Which of a thread-mode worker's threads waits at the accept loop, and when that changes.

The leader is the one thread that runs the worker's accept loop. A leader that takes a
connection keeps the leadership while it serves it: a short request (the common case) ends
with the same thread back at the listener, and no other thread was woken for it, so a thread
worker under connection-per-request load costs what a sync worker does. Handing the
leadership on at every connection (the textbook leader/follower) woke a second thread per
connection and had it trade the GIL with the one serving: 50 µs a request against sync's 30.

A leader must not sit on the leadership while its request runs long, or the worker's free
threads would accept nothing meanwhile. So:

- the *watcher*, the most recently parked follower, sleeps no longer than until the leader's
  request is ``takeover_after`` old, and then takes the leadership over (the old leader, once
  its request ends, parks or takes a queued connection of its own, as any follower does);
- a handler that waits for its client's next request on a kept-alive connection hands the
  leadership on at once (``step_down``, from ``ClientSocket``): such a wait can last for
  seconds;
- during a stop, a leader hands on before it serves what the drain gives it, so that every
  free thread serves the drain.

The watcher wakes every ``takeover_after`` while requests come (a few hundred wake-ups a
second, against one per connection before) and sleeps for good once the worker has been idle
for ``IDLE_AFTER``; the first request after that wakes it.

A worker whose threads are all busy still accepts nothing: its leader is serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

TAKEOVER_AFTER = 0.005  # seconds a leader's request may run before a free thread leads
IDLE_AFTER = 1.0  # seconds without a request after which the watcher sleeps until one


class Parker:
    """One thread's own place to sleep until another wakes it or its time is up.

    A lock held while nobody has woken it: ``wake`` releases it, the sleeper's timed
    ``acquire`` takes it back. Both ``wake`` and ``settle`` run under the caller's state lock,
    which settles the race of a wake at the very moment the sleep times out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.woken = False

    def wake(self) -> None:
        if not self.woken:
            self.woken = True
            self.lock.release()

    def sleep(self, timeout: float | None) -> bool:
        return self.lock.acquire(timeout=-1 if timeout is None else timeout)

    def settle(self, got: bool) -> None:
        """After ``sleep`` returned ``got``: back to the held state, whatever woke us."""
        if self.woken and not got:  # woken as the sleep timed out: take the release back
            self.lock.acquire()
        self.woken = False


def takeover_due(now: float, busy_since: float | None, after: float) -> bool:
    """Whether a free thread takes the leadership over: the leader's request, begun at
    ``busy_since`` (None while the leader waits at the listener), is ``after`` old."""
    return busy_since is not None and now - busy_since >= after


def watch_timeout(now: float, busy_since: float | None, last_begin: float,
                  after: float) -> float | None:  # fmt: skip
    """How long the watcher sleeps: until a takeover is due while the leader serves; a round
    of ``after`` while requests came lately (the leader may begin one at any time); None
    (until woken) once the worker has been idle ``IDLE_AFTER``."""
    if busy_since is not None:
        return max(0.0, busy_since + after - now)
    if now - last_begin < IDLE_AFTER:
        return after
    return None


class Leadership:
    """The leader among ``lanes`` threads, its request's start, and the parked followers."""

    def __init__(self, lanes: int, takeover_after: float = TAKEOVER_AFTER) -> None:
        self.after = takeover_after
        self.state = threading.Lock()  # held for bookkeeping only, never across a wait
        self.leader: int | None = None
        self.busy_since: float | None = None  # the leader's request began then
        self.last_begin = float("-inf")
        self.parkers = [Parker() for _ in range(lanes)]
        self.parked: list[int] = []  # the followers, the most recently parked last
        self.watching = False  # the last parked one sleeps timed, watching the leader
        # Told (under the state lock) when the leader begins and stops serving a request:
        # thread mode has connections report a wait for the next request only meanwhile.
        self.on_serving: Callable[[bool], None] | None = None

    def _busy(self, since: float | None) -> None:
        if (since is None) != (self.busy_since is None) and self.on_serving is not None:
            self.on_serving(since is not None)
        self.busy_since = since

    def lead(self, lane: int) -> None:
        """Return once ``lane`` is the leader: at once when nobody leads, or it does."""
        parker = self.parkers[lane]
        with self.state:
            if self.leader is None or self.leader == lane:
                self.leader = lane
                self._busy(None)
                return
            self.parked.append(lane)
            timeout = self._timeout_for(lane, time.monotonic())
        while True:
            got = parker.sleep(timeout)
            with self.state:
                parker.settle(got)
                if self.leader == lane:  # handed the leadership
                    return
                now = time.monotonic()
                if self.parked[-1] == lane and (
                    self.leader is None or takeover_due(now, self.busy_since, self.after)
                ):
                    self.parked.pop()
                    self.watching = False
                    self.leader = lane
                    self._busy(None)
                    self._nudge_watcher()
                    return
                timeout = self._timeout_for(lane, now)

    def _timeout_for(self, lane: int, now: float) -> float | None:
        """Only the last parked thread watches; the others sleep until handed the lead."""
        if self.parked[-1] != lane:
            return None
        timeout = watch_timeout(now, self.busy_since, self.last_begin, self.after)
        self.watching = timeout is not None
        return timeout

    def _nudge_watcher(self) -> None:
        """Have the last parked thread look at the leader again (its sleep may be untimed)."""
        if self.parked and not self.watching:
            self.watching = True
            self.parkers[self.parked[-1]].wake()

    def begin(self, lane: int) -> None:
        """The leader took a request and serves it, keeping the leadership meanwhile."""
        with self.state:
            if self.leader == lane:
                self.last_begin = time.monotonic()
                self._busy(self.last_begin)
                self._nudge_watcher()

    def end(self, lane: int) -> bool:
        """``lane``'s request is over; whether it still leads (it goes back to the listener)."""
        with self.state:
            if self.leader != lane:
                return False
            self._busy(None)
            return True

    def hand_on(self, lane: int) -> None:
        """``lane`` gives up the leadership (if it has it) to the last parked thread."""
        with self.state:
            if self.leader != lane:
                return
            self._busy(None)
            if not self.parked:
                self.leader = None
                return
            self.leader = self.parked.pop()
            self.watching = False
            self.parkers[self.leader].wake()
            self._nudge_watcher()

    def step_down(self, lane: int) -> None:
        """The leader's handler waits for its client (a kept-alive connection between
        requests): that can last, so the lead goes on now. Cheap for a non-leader."""
        if self.leader == lane:
            self.hand_on(lane)

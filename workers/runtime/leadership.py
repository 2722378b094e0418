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
  its request ends, parks or takes a queued connection of its own, as any follower does).
  Such a takeover says that requests run long lately (``lengthy``): from then on the
  watcher takes over as soon as a leader begins a request, the textbook leader/follower,
  until one of those requests ends within ``takeover_after``. Otherwise a burst of long
  requests started one every 5 ms: the last of 64 simultaneous 100 ms requests ended at
  313 ms instead of 107;
- a handler that waits for its client's next request on a kept-alive connection hands the
  leadership on at once (``step_down``, from ``ClientSocket``): such a wait can last for
  seconds;
- during a stop, a leader hands on before it serves what the drain gives it, so that every
  free thread serves the drain;
- the watcher also takes the leadership over from a leader that serves short requests back
  to back (it finds the next connection queued each time it is back at the listener) while
  the worker's threads use less than half of the CPU time they could have had
  (``backlog_due``): its requests wait on something (a database, a disk, a sleep), and
  the connections queued behind them would wait for it with other threads free. Without
  this rule, requests of 1-4 ms that wait on I/O ran one at a time on a thread worker,
  whatever its ``--threads`` (250 req/s for 4 ms requests with 4 threads, against 930 when
  the lead went on at every connection). Requests that compute keep one thread: under the
  GIL a second one would only contend with it. The time the leader waited for a CPU
  (runnable, preempted by other processes) is left out of the time it could have used, so
  that a busy machine does not make a computing leader look like a waiting one.

The watcher wakes every ``takeover_after`` while requests come (a few hundred wake-ups a
second, against one per connection before) and sleeps for good once the worker has been idle
for ``IDLE_AFTER``; the first request after that wakes it.

A worker whose threads are all busy still accepts nothing: its leader is serving.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

TAKEOVER_AFTER = 0.005  # seconds a leader's request may run before a free thread leads
IDLE_AFTER = 1.0  # seconds without a request after which the watcher sleeps until one
# Below this share of CPU time, a worker whose leader serves back to back is waiting on
# something rather than computing: a free thread would serve another request meanwhile.
BACKLOG_CPU_SHARE = 0.5


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


def backlog_due(busy_since: float | None, run_since: float | None, looked_at: float,
                now: float, cpu: float, runnable: float = 0.0,
                share: float = BACKLOG_CPU_SHARE) -> bool:  # fmt: skip
    """Whether a free thread takes the leadership over from a leader that serves request
    after request: it serves now (``busy_since``), it has not waited at the listener since
    before the watcher's last look (``run_since``, the first request of its run, is no later
    than ``looked_at``), and the worker used less than ``share`` of the time since that look
    in CPU (``cpu`` seconds, all its threads), leaving out the ``runnable`` seconds the
    leader waited for a CPU meanwhile: its requests wait rather than compute."""
    return (
        busy_since is not None
        and run_since is not None
        and run_since <= looked_at
        and cpu < share * (now - looked_at - runnable)
    )


class Look(NamedTuple):
    """What the watcher saw of the leader at one look, to compare the next one with."""

    leader: int
    at: float  # monotonic
    cpu: float  # the process's CPU time (every thread's)
    runnable: float  # the leader's time spent waiting for a CPU, so far


def runnable_time(tid: int | None) -> float:
    """Seconds this process's thread ``tid`` has spent runnable but not running (preempted),
    from the kernel's scheduler stats; 0.0 where they cannot be read (no /proc, or out of
    file descriptors): the share is then of the whole time."""
    if tid is None:
        return 0.0
    try:
        fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
    except OSError:
        return 0.0
    try:
        fields = os.read(fd, 128).split()
    except OSError:
        return 0.0
    finally:
        os.close(fd)
    return int(fields[1]) / 1e9 if len(fields) > 1 else 0.0


def watch_timeout(now: float, busy_since: float | None, last_begin: float,
                  after: float, lengthy: bool = False) -> float | None:  # fmt: skip
    """How long the watcher sleeps: until a takeover is due while the leader serves (at once
    while requests run long lately, ``lengthy``); a round of ``after`` while requests came
    lately (the leader may begin one at any time); None (until woken) once the worker has
    been idle ``IDLE_AFTER``."""
    if busy_since is not None:
        return 0.0 if lengthy else max(0.0, busy_since + after - now)
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
        self.run_since: float | None = None  # its first request since it last waited
        self.looked: Look | None = None  # the watcher's last look at this leader
        self.tids: list[int | None] = [None] * lanes  # each lane's kernel thread id
        # Requests run long lately: a takeover came at a request's ``after``, and none of
        # the requests begun since has ended within it. The watcher takes over at once.
        self.lengthy = False
        self.began: list[float | None] = [None] * lanes  # each lane's request, if begun as
        # the leader (not taken on its own)
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

    def enter(self, lane: int) -> None:
        """Called by the thread of ``lane`` as it starts: its kernel thread id, for the
        watcher to read its scheduler stats while it leads."""
        self.tids[lane] = threading.get_native_id()

    def lead(self, lane: int) -> None:
        """Return once ``lane`` is the leader: at once when nobody leads, or it does."""
        parker = self.parkers[lane]
        with self.state:
            if self.leader is None or self.leader == lane:
                if self.leader is None:
                    self._new_leader(lane)
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
                runs_long = takeover_due(now, self.busy_since, 0.0 if self.lengthy else self.after)
                if self.parked[-1] == lane and (
                    self.leader is None or runs_long or self._backed_up(now)
                ):
                    self.lengthy = self.lengthy or runs_long
                    self.parked.pop()
                    self.watching = False
                    self._new_leader(lane)
                    self._busy(None)
                    self._nudge_watcher()
                    return
                timeout = self._timeout_for(lane, now)

    def _new_leader(self, lane: int) -> None:
        self.leader = lane
        self.run_since = self.looked = None

    def _backed_up(self, now: float) -> bool:
        """The watcher's look at a leader that may serve back to back (``backlog_due``),
        over the time since its last look (half a round at least, for a share to mean
        something)."""
        leader, looked = self.leader, self.looked
        if leader is None or (looked is not None and looked.leader == leader
                              and now - looked.at < self.after / 2):  # fmt: skip
            return False
        self.looked = Look(leader, now, time.process_time(), runnable_time(self.tids[leader]))
        if looked is None or looked.leader != leader:
            return False
        return backlog_due(self.busy_since, self.run_since, looked.at, now,
                           self.looked.cpu - looked.cpu,
                           self.looked.runnable - looked.runnable)  # fmt: skip

    def _timeout_for(self, lane: int, now: float) -> float | None:
        """Only the last parked thread watches; the others sleep until handed the lead."""
        if self.parked[-1] != lane:
            return None
        timeout = watch_timeout(now, self.busy_since, self.last_begin, self.after, self.lengthy)
        self.watching = timeout is not None
        return timeout

    def _nudge_watcher(self, now: bool = False) -> None:
        """Have the last parked thread look at the leader again: if its sleep is untimed,
        or (``now``) whatever its sleep."""
        if self.parked and (now or not self.watching):
            self.watching = True
            self.parkers[self.parked[-1]].wake()

    def begin(self, lane: int, waited: bool = True) -> None:
        """The leader took a request and serves it, keeping the leadership meanwhile;
        ``waited``: it waited at the listener since its last one (False: a run of requests
        goes on, the next one was queued already)."""
        with self.state:
            if self.leader == lane:
                self.last_begin = time.monotonic()
                if waited or self.run_since is None:
                    self.run_since = self.last_begin
                self.began[lane] = self.last_begin
                self._busy(self.last_begin)
                self._nudge_watcher(now=self.lengthy)

    def end(self, lane: int) -> bool:
        """``lane``'s request is over; whether it still leads (it goes back to the listener)."""
        with self.state:
            began, self.began[lane] = self.began[lane], None
            if self.lengthy and began is not None and time.monotonic() - began < self.after:
                self.lengthy = False  # a short one: requests no longer run long
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
            successor = self.parked.pop()
            self._new_leader(successor)
            self.watching = False
            self.parkers[successor].wake()
            self._nudge_watcher()

    def step_down(self, lane: int) -> None:
        """The leader's handler waits for its client (a kept-alive connection between
        requests): that can last, so the lead goes on now. Cheap for a non-leader."""
        if self.leader == lane:
            self.hand_on(lane)

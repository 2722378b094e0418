"""A client process: ``Client`` is its event loop over its lanes (budget, timers, timeouts,
measurements per second), ``_client_main`` the process entry.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import select
import selectors
import shutil
import signal
import tempfile
import time
import traceback
from collections import deque
from typing import Any

from loadtest.config import Plan
from loadtest.errors import ERROR_KINDS, MAX_ERROR_TIMES, MAX_EXAMPLES
from loadtest.histograms import HDR_HIGHEST_US, HDR_LOWEST_US, new_histogram
from loadtest.http import http_request
from loadtest.lanes import DUE, LANE_CLASSES, RETRY, Lane

TIMER_SCAN = 0.02  # how often a client loop checks timeouts, stop flag and parent


class Client:
    """The event loop of one client process: its lanes, its budget, its measurements."""

    def __init__(self, plan: Plan, index: int, t0: float, stop: Any, counters: Any) -> None:
        config = plan.config
        self.plan = plan
        self.index = index
        self.t0 = t0
        self.end = t0 + plan.run_seconds
        self.stop_flag = stop
        self.counters = counters
        self.parent = os.getppid()
        self.timeout = config.timeout
        self.persistent = config.connect == "persistent"
        self.budget = plan.budgets[index]
        self.selector = selectors.DefaultSelector()
        fileno = getattr(self.selector, "fileno", None)  # epoll's own fd, for wait_precisely
        self.poll_fd: int | None = fileno() if fileno is not None else None
        if self.poll_fd is not None and self.poll_fd >= 1024:  # beyond select()'s FD_SETSIZE
            self.poll_fd = None
        self.timers: list[tuple[float, int, int, Lane]] = []
        self.tiebreak = itertools.count()
        self.ready: deque[Lane] = deque()
        self.stopping = False
        self.aborted = False
        self._tempdir: str | None = None
        self.http_request = http_request(plan.target, close=not self.persistent)
        self.filler = bytes((i * 7 + 1) & 0xFF for i in range(config.payload))
        self.seq = index << 40
        # measurements
        self.requests = 0
        self.errors = 0
        self.error_counts = dict.fromkeys(ERROR_KINDS, 0)
        self.examples: dict[str, list[str]] = {kind: [] for kind in ERROR_KINDS}
        self.error_times: list[tuple[float, str]] = []  # (seconds since t0, kind), bounded
        self.second = 0
        self.hist = new_histogram()
        self.sec_requests = 0
        self.sec_errors = dict.fromkeys(ERROR_KINDS, 0)
        self.seconds: list[dict[str, Any]] = []
        self.last_completion = t0
        first = sum(plan.lanes[:index])
        lane_class = LANE_CLASSES[plan.target.kind]
        self.lanes = [lane_class(self, first + i) for i in range(plan.lanes[index])]
        self.rate = config.rate
        self.interval = config.concurrency / self.rate if self.rate else 0.0
        # Completions after the end (requests in flight then) count in the last second.
        self.max_second = max(math.ceil(plan.run_seconds) - 1, 0)
        if self.rate:
            for lane in self.lanes:  # spread the first sends over one interval
                lane.due = t0 + lane.index / self.rate
                self.push_timer(lane.due, DUE, lane)
        else:
            self.ready.extend(self.lanes)

    def tempdir(self) -> str:
        """Created on first use (unix-dgram client addresses), removed in ``close``."""
        if self._tempdir is None:
            self._tempdir = tempfile.mkdtemp(prefix="loadtest-")
        return self._tempdir

    def next_payload(self) -> bytes:
        """The payload with a per-request sequence number up front, so a stale or duplicated
        reply can never pass for the current one."""
        self.seq += 1
        filler = self.filler
        if len(filler) < 8:
            return filler
        return self.seq.to_bytes(8, "big") + filler[8:]

    def push_timer(self, when: float, kind: int, lane: Lane) -> None:
        """Queue a timer; the counter breaks ties so lanes are never compared."""
        heapq.heappush(self.timers, (when, next(self.tiebreak), kind, lane))

    # -- outcomes
    def _account(self, now: float) -> None:
        """Note a completion time; a new second closes the current one's histogram."""
        self.last_completion = now
        second = min(int(now - self.t0), self.max_second)
        if second != self.second:
            self._flush_second()
            self.second = second

    def _flush_second(self) -> None:
        """Encode the finished second: memory stays bounded however long the run."""
        if self.sec_requests:
            self.seconds.append(
                {
                    "second": self.second,
                    "requests": self.sec_requests,
                    "errors": {k: v for k, v in self.sec_errors.items() if v},
                    "hist": self.hist.encode() if self.hist.get_total_count() else b"",
                }
            )
            self.hist.reset()
            self.sec_requests = 0
            self.sec_errors = dict.fromkeys(ERROR_KINDS, 0)

    def succeed(self, lane: Lane) -> None:
        """A correct reply: record its latency from the intended send time."""
        now = time.monotonic()
        self._account(now)
        micros = int((now - lane.intended) * 1_000_000)
        self.hist.record_value(min(max(micros, HDR_LOWEST_US), HDR_HIGHEST_US))
        self.requests += 1
        self.sec_requests += 1
        self.after(lane, now)

    def fail(self, lane: Lane, kind: str, message: str) -> None:
        """A failed request: count it by kind and keep a few distinct messages."""
        now = time.monotonic()
        self._account(now)
        self.requests += 1
        self.errors += 1
        self.sec_requests += 1
        self.error_counts[kind] += 1
        self.sec_errors[kind] += 1
        examples = self.examples[kind]
        if len(examples) < MAX_EXAMPLES and message not in examples:
            examples.append(message)
        if len(self.error_times) < MAX_ERROR_TIMES:
            self.error_times.append((now - self.t0, kind))
        lane.state = Lane.IDLE
        self.after(lane, now)

    def after(self, lane: Lane, now: float) -> None:
        """Schedule the lane's next request: at once (closed loop) or at its next intended
        time (open loop); through ``ready`` so that a lane failing instantly cannot recurse."""
        lane.state = Lane.IDLE
        if self.rate:
            self.push_timer(lane.due, DUE, lane)  # may be past: then it goes out at once
        else:
            self.ready.append(lane)

    def take_ticket(self, now: float) -> bool:
        """May another request start? Not past the end, not beyond the budget."""
        if self.stopping:
            return False
        if now >= self.end:
            self.stopping = True  # exact end: the scan alone would overshoot by up to 20 ms
            return False
        if self.budget is not None:
            if self.budget <= 0:
                return False
            self.budget -= 1
        return True

    # -- loop
    def in_flight(self) -> list[Lane]:
        """Lanes with a request under way (connecting, sending, waiting, retrying)."""
        return [lane for lane in self.lanes if lane.state != Lane.IDLE]

    def run(self) -> None:
        """The loop: start ready lanes, fire due timers, wait for sockets; until the end."""
        poll = self.selector.select
        ready = self.ready
        timers = self.timers
        counters = self.counters
        slot = 2 * self.index
        monotonic = time.monotonic
        next_scan = monotonic() + TIMER_SCAN
        while True:
            now = monotonic()
            if now >= next_scan:
                self.scan(now)
                next_scan = now + TIMER_SCAN
                if self.aborted or (self.stopping and not self.in_flight()):
                    break
            for _ in range(len(ready)):
                lane = ready.popleft()
                if lane.state != Lane.IDLE:
                    continue
                if self.take_ticket(now):
                    lane.begin(now, now)
                elif not self.stopping and self.budget is not None and not self.in_flight():
                    self.stopping = True  # budget spent and nothing left in flight
            while timers and timers[0][0] <= now:
                when, _, kind, lane = heapq.heappop(timers)
                self.on_timer(when, kind, lane, now)
            if self.stopping and not self.in_flight():
                break
            wait = next_scan - now
            if ready:
                wait = 0
            elif timers and timers[0][0] - now < wait:
                wait = self.wait_precisely(timers[0][0] - now)
            for key, mask in poll(max(wait, 0)):
                key.data.on_event(mask)
            counters[slot] = self.requests
            counters[slot + 1] = self.errors
        counters[slot] = self.requests
        counters[slot + 1] = self.errors

    def wait_precisely(self, seconds: float) -> float:
        """Sleep until a timer or a socket event, to the microsecond; return what is left for
        the selector to wait. epoll rounds its timeout up to whole milliseconds, which would
        add up to 1 ms of our own lateness to every open-loop latency; select() on the epoll
        fd itself wakes on its events too, with microsecond timeouts."""
        if self.poll_fd is None or seconds <= 0:
            return seconds
        select.select([self.poll_fd], [], [], seconds)
        return 0.0

    def on_timer(self, when: float, kind: int, lane: Lane, now: float) -> None:
        """A due open-loop send, or a retry after EAGAIN. Entries left over from a request
        that has since timed out no longer match the lane's state and are dropped."""
        if kind == RETRY:
            if lane.state == Lane.RETRY and lane.retry_at == when:
                deadline = lane.deadline
                lane.state = Lane.IDLE
                lane.begin(lane.intended, now)
                lane.deadline = deadline  # a retry does not extend the request's time
            return
        if lane.state != Lane.IDLE or when != lane.due:
            return
        if self.take_ticket(now):
            intended = lane.due
            lane.due += self.interval
            lane.begin(intended, now)  # latency from the intended time, not from now

    def scan(self, now: float) -> None:
        """Time out overdue requests; notice the end, the stop flag and an orphaned client."""
        if now >= self.end:
            self.stopping = True  # no new requests; those in flight may still finish
        if self.stop_flag.value or os.getppid() != self.parent:
            self.stopping = self.aborted = True  # abandon what is in flight
        if self.budget is not None and self.budget <= 0 and not self.in_flight():
            self.stopping = True
        for lane in self.lanes:
            if lane.state != Lane.IDLE and now > lane.deadline:
                lane.close()
                self.fail(lane, "timeout", f"no complete reply within {self.timeout:g} s")

    def close(self) -> None:
        """Close every socket and remove the temp dir, whatever happened."""
        for lane in self.lanes:
            lane.close()
        self.selector.close()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    def report(self) -> dict[str, Any]:
        """Everything the parent merges: picklable, histograms encoded."""
        self._flush_second()
        return {
            "index": self.index,
            "requests": self.requests,
            "errors": self.error_counts,
            "examples": self.examples,
            "error_times": self.error_times,
            "seconds": self.seconds,
            "last_completion": self.last_completion - self.t0,
            "aborted": self.aborted,
        }


def _client_main(plan: Plan, index: int, shared: Any, conn: Any) -> None:
    """Entry of a client process: set up, say ready, wait for the common start, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it sets the stop flag
    client = None
    try:
        conn.send(("ready", index))
        if not shared.go.wait(timeout=60) or shared.stop.value:
            return  # the parent gave up before the start
        t0 = shared.start.value
        client = Client(plan, index, t0, shared.stop, shared.counters)
        delay = t0 - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the common start time the parent chose for every process
        client.run()
        conn.send(("result", client.report()))
    except BaseException:
        try:
            conn.send(("crash", traceback.format_exc()))
        except OSError:
            pass  # the parent is gone: nobody to tell
    finally:
        if client is not None:
            client.close()
        conn.close()

"""Thread mode's leadership (``workers.runtime.leadership``), with real threads in this
process: who waits at the accept loop, and when that changes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.procs import wait_for
from workers.runtime.leadership import (
    IDLE_AFTER,
    Leadership,
    backlog_due,
    runnable_time,
    takeover_due,
    watch_timeout,
)


@pytest.fixture
def parked() -> Iterator:
    """``parked(leadership, lane)`` starts a thread that waits to lead as ``lane``; it sets
    the returned Event once it leads. Every thread is made to lead and is joined at the end."""
    started: list[tuple[Leadership, int, threading.Thread]] = []

    def park(leadership: Leadership, lane: int) -> threading.Event:
        leads = threading.Event()

        def follow() -> None:
            leadership.lead(lane)
            leads.set()

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        wait_for(lambda: lane in leadership.parked, 5, f"lane {lane} to park")
        started.append((leadership, lane, thread))
        return leads

    yield park
    for leadership, _lane, thread in started:
        while thread.is_alive():  # hand the lead round until every follower has had it
            if leadership.leader is not None:
                leadership.hand_on(leadership.leader)
            thread.join(0.05)
        assert not thread.is_alive()


def test_the_takeover_is_due_once_the_leaders_request_is_that_old() -> None:
    assert not takeover_due(10.0, None, 0.005)  # the leader waits at the listener
    assert not takeover_due(10.004, 10.0, 0.005)
    assert takeover_due(10.005, 10.0, 0.005)


def test_the_watcher_sleeps_until_the_takeover_or_for_good_once_idle() -> None:
    assert watch_timeout(10.002, 10.0, 10.0, 0.005) == pytest.approx(0.003)
    assert watch_timeout(10.009, 10.0, 10.0, 0.005) == 0.0  # overdue: look at once
    assert watch_timeout(10.5, None, 10.0, 0.005) == 0.005  # requests came lately
    assert watch_timeout(10.0 + IDLE_AFTER, None, 10.0, 0.005) is None  # idle: until woken


def test_a_leader_keeps_the_lead_through_short_requests_and_wakes_nobody(parked) -> None:
    """Only the first request after an idle spell wakes the watcher (to watch, in a timed
    sleep); the requests after it wake no thread at all."""
    leadership = Leadership(2, takeover_after=60.0)
    leadership.lead(0)
    follower = parked(leadership, 1)
    leadership.begin(0)
    assert leadership.end(0)  # still the leader: back to the listener
    wait_for(lambda: leadership.watching and not leadership.parkers[1].woken, 5,
             "the watcher to sleep timed")  # fmt: skip
    for _ in range(3):
        leadership.begin(0)
        assert not leadership.parkers[1].woken
        assert leadership.end(0)
    assert leadership.leader == 0 and leadership.parked == [1]
    assert not follower.is_set()


def test_a_free_thread_takes_the_lead_over_from_a_request_that_runs_long(parked) -> None:
    leadership = Leadership(2, takeover_after=0.05)
    leadership.lead(0)
    follower = parked(leadership, 1)
    began = time.monotonic()
    leadership.begin(0)
    assert follower.wait(5), "the follower never took the lead over"
    assert time.monotonic() - began >= 0.05
    assert leadership.leader == 1
    assert not leadership.end(0)  # the old leader's request ends: it leads no more


def test_a_leader_that_steps_down_hands_the_lead_on_at_once(parked) -> None:
    leadership = Leadership(3, takeover_after=60.0)
    leadership.lead(0)
    first = parked(leadership, 1)
    last = parked(leadership, 2)
    leadership.begin(0)
    leadership.step_down(1)  # not the leader: nothing happens
    assert leadership.leader == 0
    leadership.step_down(0)
    assert last.wait(5), "the lead did not go to the last parked thread"
    assert leadership.leader == 2 and leadership.parked == [1]
    assert not first.is_set()


def test_with_nobody_parked_the_lead_is_free_for_the_next_thread() -> None:
    leadership = Leadership(2)
    leadership.lead(0)
    leadership.hand_on(0)
    assert leadership.leader is None
    leadership.lead(1)  # returns at once
    assert leadership.leader == 1


def test_the_serving_callback_follows_the_leaders_request(parked) -> None:
    leadership = Leadership(2, takeover_after=0.05)
    told: list[bool] = []
    leadership.on_serving = told.append
    leadership.lead(0)
    leadership.begin(0)
    leadership.end(0)
    assert told == [True, False]
    follower = parked(leadership, 1)
    leadership.begin(0)
    assert follower.wait(5)
    assert told == [True, False, True, False]  # the takeover ends the old leader's serving


def test_the_backlog_takeover_is_due_for_a_run_of_requests_that_wait_rather_than_compute() -> None:
    # Serving back to back since before the last look (10.0), 5 ms later, 1 ms of CPU.
    assert backlog_due(10.004, 9.0, 10.0, 10.005, 0.001)
    assert not backlog_due(10.004, 9.0, 10.0, 10.005, 0.004)  # it computes: one thread it is
    assert not backlog_due(None, 9.0, 10.0, 10.005, 0.001)  # back at the listener now
    assert not backlog_due(10.004, None, 10.0, 10.005, 0.001)  # no run yet
    assert not backlog_due(10.004, 10.001, 10.0, 10.005, 0.001)  # it waited since the look
    # A leader that computed all the CPU time it got, on a machine whose other processes
    # kept it from running 4 ms of the 5: computing, not waiting.
    assert not backlog_due(10.004, 9.0, 10.0, 10.005, 0.001, runnable=0.004)


def test_the_kernel_tells_how_long_a_thread_waited_for_a_cpu() -> None:
    assert runnable_time(threading.get_native_id()) >= 0.0
    assert runnable_time(None) == 0.0
    assert runnable_time(2**31 - 1) == 0.0  # no such thread: no figure, and no error


REQUEST_WAIT = 0.01  # a request's work, which waits (as on a database) without computing


def serve_back_to_back(leadership: Leadership, lane: int, waited: bool, until) -> int:
    """The leader's requests, one after another (``waited``: with a wait at the listener
    between them), until ``until()``; returns how many it served as the leader."""
    served = 0
    while not until():
        leadership.begin(lane, waited)
        time.sleep(REQUEST_WAIT)  # the request's work, not a wait for a condition
        if not leadership.end(lane):
            return served
        served += 1
    return served


def test_a_free_thread_takes_the_lead_over_from_short_requests_that_queue_and_wait(
    parked,
) -> None:
    """Each request is shorter than the takeover (10 ms against 50), but they come back to
    back and the process barely computes: the follower takes the lead over."""
    leadership = Leadership(2, takeover_after=0.05)
    leadership.enter(0)
    leadership.lead(0)
    follower = parked(leadership, 1)
    deadline = time.monotonic() + 5
    served = serve_back_to_back(leadership, 0, False, lambda: time.monotonic() > deadline)
    assert follower.is_set() and leadership.leader == 1, "the follower never took the lead"
    assert served >= 2  # a run of requests, each of them whole under its leader


def test_a_leader_that_waits_at_the_listener_between_requests_keeps_the_lead(parked) -> None:
    leadership = Leadership(2, takeover_after=0.05)
    leadership.enter(0)
    leadership.lead(0)
    follower = parked(leadership, 1)
    deadline = time.monotonic() + 0.3  # six looks of the watcher
    served = serve_back_to_back(leadership, 0, True, lambda: time.monotonic() > deadline)
    assert not follower.is_set() and leadership.leader == 0
    assert served >= 10


def test_while_requests_run_long_the_watcher_takes_over_as_a_request_begins() -> None:
    assert watch_timeout(10.001, 10.0, 10.0, 0.005, lengthy=True) == 0.0
    assert watch_timeout(10.5, None, 10.0, 0.005, lengthy=True) == 0.005  # idle: rounds


def test_after_a_long_request_the_lead_goes_on_at_each_begin_until_one_is_short(parked) -> None:
    """A request that ran the whole takeover time: the next leader hands on as soon as it
    begins one (the second follower takes over at once, not a takeover time later), until a
    request begun so ends within it."""
    leadership = Leadership(3, takeover_after=0.2)
    leadership.lead(0)
    second = parked(leadership, 1)
    first = parked(leadership, 2)
    leadership.begin(0)
    assert first.wait(5) and leadership.leader == 2  # took the long request over
    assert leadership.lengthy
    began = time.monotonic()
    leadership.begin(2)
    assert second.wait(5) and leadership.leader == 1
    assert time.monotonic() - began < 0.1  # at once, not a takeover time later
    assert not leadership.end(2)  # a short one: requests no longer run long
    assert not leadership.lengthy
    third = parked(leadership, 2)
    leadership.begin(1)
    assert not third.wait(0.1) and leadership.leader == 1  # the lead stays with the leader
    assert leadership.end(1)

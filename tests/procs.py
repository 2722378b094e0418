"""Process helpers for the tests: polling with a deadline, /proc inspection, ending by pid."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from cluster.procfs import (  # noqa: F401  (the tests' helpers, re-exported)
    alive,
    become_subreaper,
    children,
    descendants,
    own_cpu,
    reap_if_ours,
    state,
)

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # a polling interval, not a wait for something to happen
        delay = min(delay * 2, 0.05)


CHECK_PERIOD = 0.05  # how often holds_for re-checks its condition
SAMPLE_PERIOD = 0.001  # how often a sampler thread reads /proc


def sample_until(done: threading.Event, sample: Callable[[], None]) -> threading.Thread:
    """Start a thread that calls ``sample()`` every millisecond until ``done`` is set."""

    def loop() -> None:
        while not done.is_set():
            sample()
            time.sleep(SAMPLE_PERIOD)

    thread = threading.Thread(target=loop)
    thread.start()
    return thread


def holds_for(condition: Callable[[], object], seconds: float, what: str = "condition") -> None:
    """Assert that ``condition`` stays true, checked every 50 ms, for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"{what} stopped holding"
        time.sleep(CHECK_PERIOD)  # observes a duration: it waits for nothing


def every(interval: float, count: int, action: Callable[[int], None]) -> None:
    """Call ``action(n)`` ``count`` times on a fixed schedule, ``interval`` seconds apart."""
    start = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, start + n * interval - time.monotonic()))  # a schedule, not a wait
        action(n)


def request_children(worker: int) -> list[int]:
    """A fork-mode worker's request children: it has no other."""
    return children(worker)


def zombies_of(pid: int) -> list[int]:
    return [child for child in children(pid) if state(child) == "Z"]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def gone(pid: int) -> bool:
    """Exited and reaped (by its parent, or by us as the subreaper of orphans)."""
    reap_if_ours(pid)
    return state(pid) is None

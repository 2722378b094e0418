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


def sample_until(
    done: threading.Event, sample: Callable[[], None], period: float = SAMPLE_PERIOD
) -> threading.Thread:
    """Start a thread that calls ``sample()`` every ``period`` (a millisecond) until ``done``
    is set. A millisecond catches a transient; a coarser look at a longer property costs
    less CPU beside the load it watches."""

    def loop() -> None:
        while not done.is_set():
            sample()
            time.sleep(period)

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


def tcp_listener(port: int) -> tuple[int, str] | None:
    """The accept queue length and the socket inode of the listener on 127.0.0.1:``port``,
    from /proc/net/tcp (None: no such listener). The kernel lists the listening sockets
    first, so the reading stops at the first other one: the suite's load tests leave tens of
    thousands of TIME_WAIT entries behind them, and reading them all took 30 ms of kernel
    time and as much of parsing per look."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            if fields[3] != "0A":  # past the listeners
                return None
            if fields[1] == wanted:
                return int(fields[4].split(":")[1], 16), fields[9]
    return None


def accept_queue_length(port: int) -> int:
    """Connections the kernel holds in the accept queue of our listener on 127.0.0.1:``port``."""
    found = tcp_listener(port)
    if found is None:
        raise AssertionError(f"no listener on port {port}")
    return found[0]


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

"""Process helpers for the tests: polling with a deadline, /proc inspection, ending by pid."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TypeVar

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


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (every thread's list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    result: list[int] = []
    stack = [pid]
    while stack:
        for child in children(stack.pop()):
            result.append(child)
            stack.append(child)
    return result


def state(pid: int) -> str | None:
    """The /proc state letter (R, S, Z...) or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    return state(pid) not in (None, "Z")


def zombies_of(pid: int) -> list[int]:
    return [child for child in children(pid) if state(child) == "Z"]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

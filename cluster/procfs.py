"""Reading the process tree from /proc, for the tools that watch a cluster from outside:
``scripts/chaos.py`` and the tests. The master itself never needs it: it knows its workers.

All of it is Linux-only and tolerant of races: a process may exit between two reads, so a
vanished file means "gone", never an error.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

_PR_SET_CHILD_SUBREAPER = 36


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from every thread's /proc children list."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren...: a worker's request children in fork mode, a new master's tree."""
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and minor page faults, each including the process's
    children that have exited and been collected: the kernel folds those into the parent."""

    cpu: float = 0.0
    faults: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.cpu + other.cpu, self.faults + other.faults)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.faults - other.faults)


_TICKS = os.sysconf("SC_CLK_TCK")
# Indexes into the fields after the comm field of /proc/PID/stat: state, ppid, pgrp, session,
# tty, tpgid, flags, minflt, cminflt, majflt, cmajflt, utime, stime, cutime, cstime...
_STATE, _MINFLT, _CMINFLT, _UTIME, _STIME, _CSTIME = 0, 7, 8, 11, 12, 14


def stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the comm field, or None when it is gone. The
    comm field may hold spaces and parentheses, so split after its last ``)``."""
    try:
        with open(path) as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parse_usage(fields: list[str]) -> Usage:
    """The ``Usage`` in the fields of one /proc/PID/stat: own and collected children's times
    and minor faults (times in clock ticks)."""
    ticks = sum(int(value) for value in fields[_UTIME : _CSTIME + 1])
    return Usage(ticks / _TICKS, int(fields[_MINFLT]) + int(fields[_CMINFLT]))


def usage(pid: int) -> Usage:
    """What ``pid`` used so far; nothing if it is gone."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return parse_usage(fields) if fields else Usage()


def own_cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` itself has used, without its children's."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return (int(fields[_UTIME]) + int(fields[_STIME])) / _TICKS if fields else 0.0


def run_time(pid: int) -> float:
    """CPU seconds ``pid``'s live threads have used, at the scheduler's nanosecond resolution
    (/proc/PID/task/TID/schedstat): /proc/PID/stat counts in clock ticks (10 ms), too coarse
    to tell 0.1% from 0.3% of an idle master over a few seconds. A thread that has ended takes
    its share along, so take differences over windows in which no thread ends (the master's
    loop has none). 0.0 if it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def tree_usage(pid: int) -> Usage:
    """What ``pid`` and all its live descendants used so far.

    Taken before and after a window, the difference is what the whole server spent in it:
    a descendant collected meanwhile moves its share into its parent's totals, so nothing is
    lost or counted twice, provided the tree's root outlives the window.
    """
    total = usage(pid)
    for descendant in descendants(pid):
        total += usage(descendant)
    return total


@dataclass(frozen=True)
class Memory:
    """A process's memory in bytes, from /proc/PID/smaps_rollup.

    ``uss`` (unique set size: its private pages) is what ending the process would give back;
    for a forked worker that is what it added to its master, the rest still shared
    copy-on-write. ``pss`` charges each shared page in equal parts to the processes sharing
    it, so a pool's PSS adds up to what the whole pool costs the machine, counted once.
    """

    rss: int = 0
    pss: int = 0
    uss: int = 0


_ROLLUP_FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss"}


def parse_rollup(text: str) -> Memory:
    """The ``Memory`` in the text of a smaps_rollup file (its values are in kB)."""
    found = {"rss": 0, "pss": 0, "uss": 0}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _ROLLUP_FIELDS and rest.split():
            found[_ROLLUP_FIELDS[key]] += int(rest.split()[0]) * 1024
    return Memory(**found)


def memory(pid: int) -> Memory | None:
    """What ``pid`` holds in memory now; None if it is gone (or not ours to read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return parse_rollup(fh.read())
    except OSError:
        return None


def stat_state(path: str) -> str | None:
    """The state letter (R, S, Z...) of a /proc stat file, or None when it is gone."""
    fields = stat_fields(path)
    return fields[_STATE] if fields else None


def state(pid: int) -> str | None:
    return stat_state(f"/proc/{pid}/stat")


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie."""
    return state(pid) not in (None, "Z")


def become_subreaper() -> None:
    """Orphans of the processes we start get reparented to us rather than to PID 1.

    A new master from an upgrade outlives the old one that forked it; an orphaned fork-mode
    child outlives its killed worker; and some sandboxes run an init that never reaps. As
    their subreaper we see them exit and collect them (``reap_if_ours``).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_if_ours(pid: int) -> None:
    """Collect ``pid`` if it is our child (or an orphan given to us) and has exited."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass

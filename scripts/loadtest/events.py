"""Events placed on the timeline: ``Events.mark`` in-process (thread-safe), or lines
``UNIX_TIME LABEL`` appended to an events file by another process.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Event:
    """Something that happened during the run (``time`` is a UNIX timestamp)."""

    time: float
    label: str


class Events:
    """A thread-safe in-process event log: a chaos thread calls ``mark`` while ``run`` runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Event] = []

    def mark(self, label: str, when: float | None = None) -> Event:
        """Record that something happened now (or at ``when``); safe from any thread."""
        event = Event(time.time() if when is None else when, label)
        with self._lock:
            self._items.append(event)
        return event

    def snapshot(self) -> list[Event]:
        """A copy, so that the caller can read while other threads still mark."""
        with self._lock:
            return list(self._items)


def parse_events(text: str) -> tuple[list[Event], list[str]]:
    """Lines ``UNIX_TIMESTAMP LABEL`` -> events, plus the lines that could not be read (blank
    lines and ``#`` comments are skipped silently)."""
    events, bad = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        stamp, _, label = stripped.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            bad.append(line)
            continue
        if not math.isfinite(when):
            bad.append(line)
            continue
        events.append(Event(when, label.strip() or "event"))
    return events, bad


def read_events(path: str) -> tuple[list[Event], list[str]]:
    """Events from a file a scenario appended to; a missing file means no events."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_events(fh.read())
    except FileNotFoundError:
        return [], []


def append_event(path: str, label: str, when: float | None = None) -> None:
    """Append one event line (for scenarios in another process); O_APPEND keeps lines whole."""
    stamp = time.time() if when is None else when
    line = f"{stamp:.6f} {' '.join(label.split())}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)

"""The one registry of worker modes. Adding a mode: a module with its ``MODE``, and one line
in ``MODES`` below."""

from __future__ import annotations

from workers.runtime.mode import Mode
from workers.runtime.modes import fork, sync, thread

MODES: dict[str, Mode] = {mode.name: mode for mode in (sync.MODE, thread.MODE, fork.MODE)}
DEFAULT = "sync"


def get(name: str) -> Mode:
    return MODES[name]


def names() -> tuple[str, ...]:
    return tuple(MODES)

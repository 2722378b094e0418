"""What a worker's exit means, and what follows from it: a pure function of the facts.

The master gathers the facts of an exit (``ExitFacts``) and asks ``judge`` for the verdict; it
then logs, backs off, aborts a reload or gives up as the verdict says. Tests call ``judge``
with made-up facts, no processes.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from workers.runtime.spec import SELF_INFLICTED

MAX_BOOT_FAILURES = 3  # workers of the first generation dying before ready, in a row: give up

RETIRED = "retired"  # we asked it to go (scale down, reload, recycle, timeout) or we stop
KILLED = "killed"  # it was serving and a signal from outside ended it (kill -9, the OOM killer)
CRASHED = "crashed"  # it was serving and failed on its own (an exit, a segfault, an abort)
BOOT_FAILURE = "boot failure"  # it died before it was ever ready
RELOAD_FAILED = "reload failed"  # a worker of a reload's new generation died before ready
CANNOT_BOOT = "cannot boot"  # the first generation keeps dying before ready: stop, exit 3


@dataclass(frozen=True)
class ExitFacts:
    """One worker's exit as the master saw it."""

    exitcode: int | None  # negative: killed by that signal
    ready: bool  # it had said ready
    retiring: bool  # the master had asked it to go
    stopping: bool  # the master is stopping
    lived: float  # seconds from fork to exit
    incoming: bool = False  # it belongs to a reload's generation that is not serving yet
    boot_failures: int = 0  # earlier workers of its generation that died before ready
    never_ready: bool = False  # the master has not yet been ready once


@dataclass(frozen=True)
class Verdict:
    """What the exit means (``kind``), and whether its slot backs off before the next fork
    (``backoff``: the worker failed on its own, so its replacement may fail the same way)."""

    kind: str
    backoff: bool = False

    @property
    def expected(self) -> bool:
        return self.kind == RETIRED


def killed_from_outside(exitcode: int | None) -> bool:
    """A signal from outside ended it."""
    return exitcode is not None and exitcode < 0 and -exitcode not in SELF_INFLICTED


def judge(facts: ExitFacts) -> Verdict:
    """The meaning of one exit.

    - Asked to go, or stopping: expected, nothing follows.
    - Never ready, in a reload's new generation: the health gate fails the reload.
    - Never ready, in the first generation: a boot failure; the third in a row gives up.
    - Serving, and killed by a signal from outside: replaced at once, no backoff, for the
      replacement has no reason to fail too.
    - Serving, and failed on its own (an exit code, a crash signal): backoff for its slot.
    """
    if facts.retiring or facts.stopping:
        return Verdict(RETIRED)
    if not facts.ready:
        if facts.incoming:
            return Verdict(RELOAD_FAILED, backoff=True)
        if facts.never_ready and facts.boot_failures + 1 >= MAX_BOOT_FAILURES:
            return Verdict(CANNOT_BOOT, backoff=True)
        return Verdict(BOOT_FAILURE, backoff=True)
    if killed_from_outside(facts.exitcode):
        return Verdict(KILLED)
    return Verdict(CRASHED, backoff=True)


def describe(exitcode: int | None) -> str:
    """How a process ended, for the log: 'exited with code 0' or 'killed by SIGKILL'."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"

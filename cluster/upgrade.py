"""Upgrade (USR2): both sides of the handover between an old master and the new one it execs.

``Successor`` is the old master's part: the new master it forked, from the exec until the new
one says ``ready`` on the pipe it inherited (the old master then stops gracefully), exits (the
upgrade failed: the old master keeps serving), or misses its deadline (the old master kills
it). ``Predecessor`` is the new master's part: the pid of the old one and the pipe to say
``ready`` on, once.

An explicit message, not a signal, because a TERM to the old master is an operator's: it stops
the old master gracefully and leaves the new one, booting or serving, in place.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

from cluster import handover
from cluster.spawn import WorkerProcess

log = logging.getLogger("cluster.master")

BOOTING, SERVING, LEFT = "booting", "serving", "left"


class Successor:
    """The new master of an upgrade under way, as its parent, the old master, sees it."""

    def __init__(self, process: WorkerProcess, ready_r: int, deadline: float) -> None:
        self.process = process
        self.ready_r = ready_r  # read end of the ready pipe; owned here, closed by close()
        self.deadline = deadline
        self.state = BOOTING
        self.late = False  # killed for missing its deadline: its exit is no news
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def fds(self) -> list[int]:
        """Ours to close in every worker forked meanwhile."""
        return [fd for fd in (self.process.sentinel, self.ready_r) if fd >= 0]

    def next_deadline(self) -> float:
        return self.deadline if self.state == BOOTING else float("inf")

    def overdue(self, now: float) -> bool:
        """Not ready in time (true once: the caller kills it, then waits for its exit)."""
        if self.state != BOOTING or now < self.deadline:
            return False
        self.deadline = float("inf")
        self.late = True
        return True

    def read(self) -> str | None:
        """Read the pipe: "ready" when the new master just said so, "eof" when it closed
        its end without (it is dying), None while nothing came. After either answer the
        pipe is done with: the caller unregisters it and calls ``close_pipe``."""
        try:
            data = os.read(self.ready_r, 256)
        except BlockingIOError:
            return None
        if not data:
            return "eof"
        self._buffer += data
        if self._buffer.startswith(b"ready"):
            self.state = SERVING
            return "ready"
        return None

    def close_pipe(self) -> None:
        if self.ready_r >= 0:
            os.close(self.ready_r)
            self.ready_r = -1

    def leave(self) -> None:
        """We stop before the new master is ready: it boots and serves on its own."""
        self.state = LEFT

    def close(self) -> None:
        self.close_pipe()
        self.process.close()


class Predecessor:
    """The old master, as the new master that an upgrade exec'd sees it."""

    def __init__(self, pid: int, ready_w: int) -> None:
        self.pid = pid
        self.ready_w = ready_w

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str]) -> Predecessor | None:
        """Take (and remove) the handover variables; None when no upgrade started us."""
        pid = env.pop(handover.ENV_PREDECESSOR, "")
        fd = env.pop(handover.ENV_READY_FD, "")
        if not (pid.isdigit() and fd.isdigit()):
            return None
        try:
            os.set_inheritable(int(fd), False)  # never into a later upgrade's exec
        except OSError:
            return None  # not open: nobody to tell
        return cls(int(pid), int(fd))

    def fds(self) -> list[int]:
        return [self.ready_w] if self.ready_w >= 0 else []

    def announce_ready(self) -> None:
        """Say ready, once; the old master then stops gracefully."""
        if self.ready_w < 0:
            return
        log.info("upgrade: ready, telling the old master %d to stop", self.pid)
        try:
            os.write(self.ready_w, b"ready %d\n" % os.getpid())
        except OSError as err:  # it is gone already (an operator stopped it)
            log.info("upgrade: the old master %d is gone (%s)", self.pid, err.strerror)
        os.close(self.ready_w)
        self.ready_w = -1

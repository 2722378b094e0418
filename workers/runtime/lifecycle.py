"""A worker's signal state: flags the handlers set and the loop reads, a wakeup pipe, and the
checks that the master (or, for a request child, the worker) is still alive."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from workers.runtime.client import CONNECTIONS, close_idle, stopping_past_grace

_PR_SET_PDEATHSIG = 1


class Lifecycle:
    """What the signal handlers set and the loop reads: flags and a wakeup pipe, nothing more."""

    def __init__(self, keep_alive: float = 0.0) -> None:
        self.running = True
        self.quick = False  # a quick stop is under way: do not wait for anything on the way out
        self.children_exited = True  # fork mode: a SIGCHLD came since we last reaped
        self.keep_alive = keep_alive
        self.on_signal: Callable[[int], None] | None = None  # fork mode: tell the children
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def request_stop(self, signum: int, frame: object) -> None:
        """TERM: take no new request; cut the connections idle between requests."""
        self.running = False
        close_idle()
        if self.on_signal is not None:
            self.on_signal(signum)

    def cut_idle(self, signum: int, frame: object) -> None:
        """The master saw a connection idle past ``--keep-alive``: cut those that are. During
        a stop (the master repeats it then), cut every idle one once the stop's grace is over."""
        if stopping_past_grace():
            CONNECTIONS.cut_idle(0.0)
        elif self.keep_alive:
            CONNECTIONS.cut_idle(self.keep_alive)
        if self.on_signal is not None:
            self.on_signal(signum)

    def quick_stop(self, signum: int, frame: object) -> None:
        self.running, self.quick = False, True
        raise SystemExit(0)

    def child_exited(self, signum: int, frame: object) -> None:
        self.children_exited = True

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass


def _load_prctl():  # noqa: ANN202
    """libc's prctl, loaded once: dlopen per call would cost every fork-mode child ~0.2 ms."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the loops' parent checks still cover us
        return None


_prctl = _load_prctl()


def set_parent_death_signal(signum: int, parent_pid: int) -> None:
    """Have the kernel send ``signum`` when our parent dies; exit now if it already has.

    The check after ``prctl`` closes the race where the parent died between our fork and the
    call: the kernel would then never send the signal.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def master_alive(master_pid: int) -> bool:
    return os.getppid() == master_pid

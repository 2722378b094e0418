"""The fork of a request child, without the interpreter's after-fork repairs when none is due.

Why: a request child lives for one connection, and every page it writes first costs it a
copy-on-write fault (several microseconds each on a virtual machine). ``os.fork()`` runs
the ``os.register_at_fork`` hooks of the loaded modules before the handler starts:
``threading`` rebuilds its thread table and locks, ``logging`` re-creates the lock of every
handler, ``random`` reseeds. In a worker that imports the cluster, that Python code writes
some 180 pages, and it was more than half of a fork-mode request's cost
(``scripts/forkcost.py``: 2.8 ms per fork, exit and wait, 1.1 ms with this).

Those hooks repair what *other threads* held at the moment of the fork: a lock taken by a
thread that does not exist in the child. A fork-mode worker forks from its only thread, in
its accept loop, holding nothing, so there is nothing to repair. ``fork()`` therefore calls
the C library's ``fork`` directly while the worker has one thread, and falls back to
``os.fork()`` as soon as it has more (an app that starts a thread of its own, say).

What the child still gets, because a handler could notice its absence:
- ``random`` is reseeded, as its own hook would: otherwise every child of a worker would
  draw the same numbers.
- ``gc.freeze()``: the objects inherited from the worker are left out of the child's
  collections, which would otherwise write to every one of them (a fault per page).
What it does not get: ``threading.main_thread().native_id`` still names the worker's
thread id (``threading.get_native_id()`` is right), and signals that arrived in the worker
just before the fork, not yet handled there, are handled in the child too (the worker's
handlers only set flags and pass a stop on, which is also right for a child).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable

from workers.runtime.access import ROLE

log = logging.getLogger("cluster.worker")


def _load_libc_fork() -> Callable[[], int] | None:
    """libc's ``fork`` called with the GIL held (``PyDLL``): the child starts out holding
    it, as after ``os.fork()``; None where there is no such symbol."""
    try:
        function = ctypes.PyDLL(None, use_errno=True).fork
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    function.argtypes = ()
    return function


_libc_fork = _load_libc_fork()


def fork() -> int:
    """Like ``os.fork()``: 0 in the child, the child's pid in the parent, OSError if the
    kernel refuses (EAGAIN under RLIMIT_NPROC, ENOMEM)."""
    if _libc_fork is None or threading.active_count() != 1:
        return os.fork()
    pid = _libc_fork()
    if pid < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    if pid == 0:
        _after_fork_in_child()
    return pid


def _after_fork_in_child() -> None:
    gc.freeze()
    random = sys.modules.get("random")
    if random is not None:
        random.seed()


class Refusals:
    """Whether the kernel refused our last fork for a request: one log line per episode,
    naming the worker (``ROLE.pid``)."""

    refused = False

    def refused_with(self, err: OSError) -> None:
        """A fork failed: re-raise what is not a lack of resources; say so once."""
        if err.errno not in (errno.EAGAIN, errno.ENOMEM):
            raise err
        if not self.refused:
            log.error("worker %d cannot fork for a request: %s; closing such requests "
                      "until it can", ROLE.pid, err.strerror)  # fmt: skip
        self.refused = True

    def forked(self) -> None:
        if self.refused:
            log.warning("worker %d forks for requests again", ROLE.pid)
            self.refused = False


REFUSALS = Refusals()

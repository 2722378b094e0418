"""Forking one worker: a process handle with a pidfd as its exit sentinel.

Why not ``multiprocess.Process``: importing multiprocess (and the dill it pulls in) adds about
2 MB and 45 memory mappings to the master, which every worker and every fork-mode request child
inherits, and ``fork()`` costs grow with a process's size. On the 2-core machine we measure on,
a fork, exit and reap cost 1.22 ms in a process of ours and 1.40 ms with multiprocess imported
too (``scripts/forkcost.py``): 13% more on every fork-mode request. What the master needs of a
process handle fits in this class.

The sentinel is a pidfd (Linux 5.3+): it becomes readable only once the child has exited, so a
``waitpid`` on that pid after it fired never blocks and never reports "still running" (a pipe
sentinel fires as the child's fds close, a moment earlier).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable


class WorkerProcess:
    """Run ``target(*args)`` in a forked child; the parent keeps pid, sentinel and exit code."""

    def __init__(self, target: Callable[..., object], args: tuple = ()) -> None:
        self.target = target
        self.args = args
        self.pid = 0
        self.sentinel = -1  # pidfd, owned by the parent, closed by close()
        self.exitcode: int | None = None

    def start(self) -> None:
        """Fork and run the target in the child. Raises OSError when the kernel refuses
        (EAGAIN, ENOMEM: no process left; EMFILE, ENFILE: no fd for the pidfd), leaving no
        child behind: one forked before its pidfd failed is killed and reaped here."""
        pid = os.fork()
        if pid == 0:
            os._exit(self._run_child())
        try:
            self.sentinel = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        self.pid = pid

    def _run_child(self) -> int:
        """The child's whole life: never returns into the parent's code, always ``_exit``s."""
        code = 1
        try:
            self.target(*self.args)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException as exc:  # through the log: in its format (JSON too), one record
            logging.getLogger("cluster.worker").critical(
                "process %d ended by %s", os.getpid(), type(exc).__name__, exc_info=True
            )
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
        return code

    def join(self) -> int:
        """Wait for the child (briefly, once the sentinel fired) and return its exit code:
        negative for a signal, as ``multiprocessing`` reports it."""
        if self.exitcode is None:
            _, status = os.waitpid(self.pid, 0)
            self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def start_all(processes: list[WorkerProcess],
              inherited: list[int]) -> tuple[list[WorkerProcess], OSError | None]:  # fmt: skip
    """Fork ``processes`` back to back, in order, until the kernel refuses one: the ones
    started, and the refusal (None if all started). Each new pidfd joins ``inherited`` (the
    list the later siblings' specs share: the fds each closes at boot) as soon as it exists.

    Why back to back: a page the master writes between two forks is copied for the master,
    and the worker forked before is left alone with the old copy, private memory for as long
    as it lives. Spawning one worker in full (its spec, its claim, its bookkeeping, a log line)
    wrote some 300 pages, so every worker of a pool booted one by one paid about 1.2 MiB for
    its successor's spawn (``scripts/private_pages.py``). Here, between two forks, the master
    runs this loop and nothing else.
    """
    for count, process in enumerate(processes):
        try:
            process.start()
        except OSError as err:
            return processes[:count], err
        inherited.append(process.sentinel)
    return processes, None

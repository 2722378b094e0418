"""Upgrade (USR2): exec a new master that inherits the listeners, then retire the old one.

A mixin of ``Master``. The old master forks a child that execs our command line with the
listening fds (see ``cluster.handover``); the new master binds nothing it inherited, writes
the pidfile (the old one's becomes ``PIDFILE.oldbin``) and, once its workers are ready, sends
TERM to the old master, which then stops gracefully and leaves the Unix socket files alone. If
the new master exits or is not ready within ``--graceful-timeout``, the old one kills it,
moves its pidfile back and keeps serving.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time

from cluster import handover, pidfile, pool
from cluster.spawn import WorkerProcess
from workers.process import HANDLED_SIGNALS

log = logging.getLogger("cluster.master")


class UpgradeMixin:
    """USR2 handling for ``Master``."""

    successor: WorkerProcess | None

    def begin_upgrade(self) -> None:
        """Fork and exec a new master of our command line that inherits our listeners."""
        if self.stopping or self.successor is not None or not self.install_signals:
            log.warning("upgrade refused: %s", "stopping" if self.stopping else
                        "one is under way" if self.successor else "not running the CLI")  # fmt: skip
            return
        pairs = [(lst.sock.fileno(), lst.spec.text) for lst in self.listeners]
        pidfile.move_aside(self.config.pidfile, to_old=True)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            successor = WorkerProcess(handover.exec_successor, (pairs, self.pid))
            successor.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.successor = successor
        self.successor_deadline = time.monotonic() + self.config.graceful_timeout
        self.selector.register(successor.sentinel, selectors.EVENT_READ, "successor")
        log.info("upgrade: started new master %d; it takes over once its workers are ready",
                 successor.pid)  # fmt: skip

    def watch_successor(self) -> None:
        if self.successor is not None and time.monotonic() > self.successor_deadline:
            log.error("upgrade failed: new master %d not ready within %gs; killing it, still "
                      "serving", self.successor.pid, self.config.graceful_timeout)  # fmt: skip
            os.kill(self.successor.pid, signal.SIGKILL)
            self.successor_deadline = float("inf")  # its exit is reaped by on_successor_exit

    def on_successor_exit(self) -> None:
        successor, self.successor = self.successor, None
        assert successor is not None
        self.selector.unregister(successor.sentinel)
        how = pool.describe_exit(successor.join())
        successor.close()
        if self.handed_over:
            return
        log.error("upgrade failed: new master %d %s; still serving", successor.pid, how)
        pidfile.move_aside(self.config.pidfile, to_old=False)

    def retire_predecessor(self) -> None:
        """As a new master from an upgrade, once ready: tell the old master to go."""
        old = os.environ.pop(handover.ENV_PREDECESSOR, None)
        if old and old.isdigit():
            log.info("upgrade: ready, retiring the old master %s", old)
            try:
                os.kill(int(old), signal.SIGTERM)
            except ProcessLookupError:
                pass

"""Worker modes: how a worker takes requests off the shared listeners and runs them.

Every mode shares one accept discipline, ``AcceptLoop``: try ``accept()`` (or ``recvfrom``) on
each listener first, and only when every one of them says EAGAIN wait in ``epoll`` with
``EPOLLEXCLUSIVE``, so that one new connection wakes one idle worker rather than all of them.
Under load a worker goes from one request straight to the next with a single system call;
idle, it sleeps in the kernel until a connection, a signal, or the parent check is due.

A mode is a function ``serve(servers, lifecycle, spec, ready)`` that calls ``ready()`` once it
is set up to take requests (the master counts a worker as serving from then on); ``sync`` runs
the handler inline.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable

from workers.process import PARENT_CHECK_INTERVAL, Lifecycle, WorkerSpec, master_alive
from workers.servers import BaseServer

log = logging.getLogger("cluster.worker")

Serve = Callable[[list[BaseServer], Lifecycle, WorkerSpec, Callable[[], None]], None]


class AcceptLoop:
    """Accept-first, epoll-when-idle over every listener, plus the worker's wakeup pipe."""

    def __init__(self, servers: list[BaseServer], lifecycle: Lifecycle, master_pid: int) -> None:
        self.servers = servers
        self.lifecycle = lifecycle
        self.master_pid = master_pid
        self.poller = select.epoll()  # owned here; closed by close()
        for server in servers:
            self.poller.register(server.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.poller.register(lifecycle.wake_r, select.EPOLLIN)

    def take(self) -> tuple[BaseServer, object, object] | None:
        """One queued request from any listener, or None when all are empty right now."""
        for server in self.servers:
            try:
                request, client_address = server.get_request()
            except BlockingIOError:
                continue
            except OSError as err:  # ECONNABORTED, EMFILE...: this one request is lost, not us
                log.warning("accept on %s failed: %s", server.server_address, err)
                continue
            return server, request, client_address
        return None

    def wait(self) -> None:
        """Sleep until a listener is readable, a signal arrives, or the parent check is due."""
        self.poller.poll(PARENT_CHECK_INTERVAL)
        self.lifecycle.drain_wakeups()
        if not master_alive(self.master_pid):
            log.warning("worker %d: master %d is gone, stopping", os.getpid(), self.master_pid)
            self.lifecycle.running = False

    def close(self) -> None:
        self.poller.close()


def dispatch(server: BaseServer, request: object, client_address: object) -> None:
    """Run one accepted request through the server's socketserver steps (verify, process)."""
    server._handle_accepted(request, client_address)


def serve_sync(
    servers: list[BaseServer], lifecycle: Lifecycle, spec: WorkerSpec, ready: Callable[[], None]
) -> None:
    """Handle each request inline; on TERM, finish it, then serve what is already queued."""
    loop = AcceptLoop(servers, lifecycle, spec.master_pid)
    ready()
    try:
        while lifecycle.running:
            taken = loop.take()
            if taken is None:
                loop.wait()
            else:
                dispatch(*taken)
        drain(loop, spec.graceful_timeout)
    finally:
        loop.close()


def drain(loop: AcceptLoop, within: float) -> None:
    """Serve what the kernel already queued on our listeners, so that a stop resets nobody.

    Bounded in time: under a steady stream of new connections the queue never empties, and the
    master kills us at the end of the graceful timeout anyway.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and (taken := loop.take()) is not None:
        dispatch(*taken)


MODES: dict[str, Serve] = {"sync": serve_sync}


def get(mode: str) -> Serve:
    return MODES[mode]

"""Worker modes: how a worker takes requests off the shared listeners and runs them.

Every mode shares one accept discipline, ``AcceptLoop``: try ``accept()`` (or ``recvfrom``) on
each listener first, and only when every one of them says EAGAIN wait in ``epoll`` with
``EPOLLEXCLUSIVE``, so that one new connection wakes one idle worker rather than all of them.
Under load a worker goes from one request straight to the next with a single system call;
idle, it sleeps in the kernel until a connection, a signal, or the parent check is due.

A mode is a function ``serve(bindings, lifecycle, spec, ready)``: it builds its server objects,
calls ``ready()`` once it can take requests (the master counts the worker as serving from then
on), serves until the lifecycle says stop, and on a graceful stop serves what the kernel had
already queued before it returns.

- ``sync``: the handler runs inline, one request at a time.
- ``thread``: exactly ``threads`` handler threads. The loop accepts only while one of them is
  free, so a full worker leaves new connections in the kernel's queue for another worker
  instead of queueing them itself.
- ``fork``: ``ForkingMixIn`` semantics: one child per request, at most ``max_children`` at
  once per worker, reaped by pid before each fork, waited for on a graceful stop.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable

from workers.mixins import ForkingMixIn
from workers.process import (
    PARENT_CHECK_INTERVAL,
    Endpoint,
    Lifecycle,
    WorkerSpec,
    make_server,
    master_alive,
    set_parent_death_signal,
)
from workers.servers import BaseServer

log = logging.getLogger("cluster.worker")

Binding = tuple[Endpoint, type]  # a listener and the handler class that serves it
Serve = Callable[[list[Binding], Lifecycle, WorkerSpec, Callable[[], None]], None]
Taken = tuple[BaseServer, object, object]  # server, request, client address


class AcceptLoop:
    """Accept-first, epoll-when-idle over every listener, plus the worker's wakeup pipe."""

    def __init__(
        self,
        servers: list[BaseServer],
        lifecycle: Lifecycle,
        master_pid: int,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        self.servers = servers
        self.lifecycle = lifecycle
        self.master_pid = master_pid
        self.on_wake = on_wake  # runs after every sleep: fork mode reaps its children there
        self.poller = select.epoll()  # owned here; closed by close()
        for server in servers:
            self.poller.register(server.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.poller.register(lifecycle.wake_r, select.EPOLLIN)

    def take(self) -> Taken | None:
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

    def next(self) -> Taken | None:
        """The next request, waiting for one; None once the worker is told to stop."""
        while self.lifecycle.running:
            taken = self.take()
            if taken is not None:
                return taken
            self.wait()
        return None

    def wait(self) -> None:
        """Sleep until a listener is readable, a signal arrives, or the parent check is due."""
        self.poller.poll(PARENT_CHECK_INTERVAL)
        self.lifecycle.drain_wakeups()
        if self.on_wake is not None:
            self.on_wake()
        if not master_alive(self.master_pid):
            log.warning("worker %d: master %d is gone, stopping", os.getpid(), self.master_pid)
            self.lifecycle.running = False

    def drain(self, within: float, dispatch: Callable[[BaseServer, object, object], None]) -> None:
        """Serve what the kernel already queued on our listeners, so that a stop resets nobody.

        Bounded in time: under a steady stream of new connections the queue never empties, and
        the master kills us at the end of the graceful timeout anyway.
        """
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and (taken := self.take()) is not None:
            dispatch(*taken)

    def close(self) -> None:
        self.poller.close()


def dispatch(server: BaseServer, request: object, client_address: object) -> None:
    """Run one accepted request through the server's socketserver steps (verify, process)."""
    server._handle_accepted(request, client_address)


def close_all(servers: list[BaseServer]) -> None:
    for server in servers:
        server.server_close()


# --------------------------------------------------------------------------------- sync
def serve_sync(
    bindings: list[Binding], lifecycle: Lifecycle, spec: WorkerSpec, ready: Callable[[], None]
) -> None:
    """Handle each request inline; on TERM, finish it, then serve what is already queued."""
    servers = [make_server(endpoint, handler) for endpoint, handler in bindings]
    loop = AcceptLoop(servers, lifecycle, spec.master_pid)
    ready()
    try:
        while (taken := loop.next()) is not None:
            dispatch(*taken)
        loop.drain(spec.graceful_timeout, dispatch)
    finally:
        loop.close()
        close_all(servers)


# --------------------------------------------------------------------------------- thread
class ThreadPool:
    """Exactly ``size`` handler threads fed through a queue, with a count of free ones.

    The accept loop takes a free slot *before* it accepts, so the queue never holds more than
    one request per idle thread: back-pressure stays in the kernel's listen queue.
    """

    def __init__(self, size: int) -> None:
        from queue import SimpleQueue  # thread mode only: a fork-mode worker stays smaller

        self.free = threading.Semaphore(size)
        self.jobs: SimpleQueue[Taken | None] = SimpleQueue()
        # Daemon threads: a quick stop must not wait for them; a graceful one joins them.
        self.threads = [
            threading.Thread(target=self._work, name=f"handler-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                dispatch(*job)
            finally:
                self.free.release()

    def acquire(self, timeout: float) -> bool:
        return self.free.acquire(timeout=timeout)

    def submit(self, server: BaseServer, request: object, client_address: object) -> None:
        """Hand a request to a thread; call only while holding a slot from ``acquire``."""
        self.jobs.put((server, request, client_address))

    def submit_when_free(self, server: BaseServer, request: object, client_address: object) -> None:
        self.free.acquire()
        self.submit(server, request, client_address)

    def join(self, within: float) -> None:
        """Let every running handler finish (bounded), then end the threads."""
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + within
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def serve_thread(
    bindings: list[Binding], lifecycle: Lifecycle, spec: WorkerSpec, ready: Callable[[], None]
) -> None:
    """Accept only while a handler thread is free; on TERM let the running handlers finish."""
    servers = [make_server(endpoint, handler) for endpoint, handler in bindings]
    loop = AcceptLoop(servers, lifecycle, spec.master_pid)
    pool = ThreadPool(spec.threads)
    ready()
    try:
        while lifecycle.running:
            if not pool.acquire(timeout=PARENT_CHECK_INTERVAL):
                if not master_alive(spec.master_pid):
                    lifecycle.running = False
                continue  # all threads busy: leave connections queued for other workers
            taken = loop.next()
            if taken is None:
                pool.free.release()
                break
            pool.submit(*taken)
        loop.drain(spec.graceful_timeout, pool.submit_when_free)
        pool.join(spec.graceful_timeout)
    finally:
        loop.close()
        close_all(servers)


# --------------------------------------------------------------------------------- fork
class WorkerForkingMixIn(ForkingMixIn):
    """``ForkingMixIn`` whose children die with the worker that forked them."""

    def finish_request(self, request: object, client_address: object) -> None:
        # In the child. Everything a child touches first costs it a copy-on-write page fault,
        # so it does the one thing it must: ask to die with the worker (a worker killed -9
        # would otherwise leave its children running). The worker's inherited signal
        # handlers already do the right thing here: INT and QUIT raise SystemExit, which
        # ForkingMixIn turns into _exit(1); TERM lets the request finish, as for a worker.
        set_parent_death_signal(signal.SIGKILL, os.getppid())
        super().finish_request(request, client_address)


def serve_fork(
    bindings: list[Binding], lifecycle: Lifecycle, spec: WorkerSpec, ready: Callable[[], None]
) -> None:
    """Fork a child per request, never more than ``max_children`` alive at once per worker."""
    mixin = type("Forking", (WorkerForkingMixIn,), {"max_children": spec.max_children})
    servers = [make_server(endpoint, handler, mixin) for endpoint, handler in bindings]
    children: set[int] = set()  # shared: the bound is per worker, not per listener

    def reap() -> None:
        """Collect exited children by pid, only when a SIGCHLD said one exited."""
        if lifecycle.children_exited:
            lifecycle.children_exited = False
            servers[0].collect_children()

    loop = AcceptLoop(servers, lifecycle, spec.master_pid, on_wake=reap)
    for server in servers:
        server.active_children = children

    def fork_one(server: BaseServer, request: object, client_address: object) -> None:
        reap()  # before each fork, without blocking
        dispatch(server, request, client_address)  # blocks reaping at max_children

    ready()
    try:
        while (taken := loop.next()) is not None:
            fork_one(*taken)
        loop.drain(spec.graceful_timeout, fork_one)
    finally:
        loop.close()
        for server in servers:
            server.socket.close()
        if lifecycle.quick:  # they would die with us (PDEATHSIG); say so at once
            kill_children(children)
        else:  # graceful: every request runs to its end
            servers[0].collect_children(blocking=True)


def kill_children(children: set[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


MODES: dict[str, Serve] = {"sync": serve_sync, "thread": serve_thread, "fork": serve_fork}


def get(mode: str) -> Serve:
    return MODES[mode]

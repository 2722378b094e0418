"""Worker modes: how a worker takes requests off the shared listeners and runs them.

Every mode shares one accept discipline, ``AcceptLoop``: try ``accept()`` (or ``recvfrom``) on
each listener first, and only when every one of them says EAGAIN wait in ``epoll`` with
``EPOLLEXCLUSIVE``, so that one new connection wakes one idle worker rather than all of them.
Under load a worker goes from one request straight to the next with a single system call;
idle, it sleeps in the kernel until a connection, a signal, or the parent check is due.

A mode is a function ``serve(bindings, context)``: it builds its server objects, calls
``context.ready()`` once it can take requests (the master counts the worker as serving from
then on), serves until the lifecycle says stop, and on a graceful stop serves what the kernel
had already queued before it returns. Each request runs in a scoreboard *lane* (begin: start
time and client; end: back to idle, one more served) so that the master sees what every worker
is doing and can kill one whose request hangs.

- ``sync``: the handler runs inline, one request at a time.
- ``thread``: exactly ``threads`` handler threads. The loop accepts only while one of them is
  free, so a full worker leaves new connections in the kernel's queue for another worker
  instead of queueing them itself.
- ``fork``: ``ForkingMixIn`` semantics: one child per request, at most ``max_children`` at
  once per worker, reaped by pid before each fork, waited for on a graceful stop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

from workers.mixins import ForkingMixIn
from workers.process import (
    PARENT_CHECK_INTERVAL,
    STACK_DUMP_SIGNAL,
    Context,
    Endpoint,
    Lifecycle,
    make_server,
    master_alive,
    set_parent_death_signal,
)
from workers.scoreboard import WorkerSlot
from workers.servers import BaseServer

log = logging.getLogger("cluster.worker")

OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# One woken worker per connection, not all of them (the thundering herd).
LISTENER_EVENTS = select.EPOLLIN | select.EPOLLEXCLUSIVE
RESOURCE_PAUSE = 0.1  # seconds between accept attempts while out of resources

Binding = tuple[Endpoint, type]  # a listener and the handler class that serves it
Serve = Callable[[list[Binding], Context], None]
Taken = tuple[BaseServer, object, object]  # server, request, client address


class AcceptLoop:
    """Accept-first, epoll-when-idle over every listener, plus the worker's wakeup pipe."""

    def __init__(
        self,
        servers: list[BaseServer],
        context: Context,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        self.servers = servers
        self.lifecycle: Lifecycle = context.lifecycle
        self.slot = context.slot
        self.master_pid = context.spec.master_pid
        self.on_wake = on_wake  # runs after every sleep: fork mode reaps its children there
        self.turn = 0  # the listener to try first
        self.starving = False  # accept() failed for want of fds or memory
        # Stream listeners whose connections can hold a worker for long (see step_back).
        self.streams = {s for s in servers if getattr(s, "socket_type", None) == socket.SOCK_STREAM}
        self.poller = select.epoll()  # owned here; closed by close()
        for server in servers:
            self.poller.register(server.fileno(), LISTENER_EVENTS)
        self.poller.register(self.lifecycle.wake_r, select.EPOLLIN)

    def take(self) -> Taken | None:
        """One queued request from any listener, or None when all are empty right now.

        The listeners are tried in turn, starting after the one that gave the last request, so
        that a saturated listener cannot starve the others.
        """
        servers = self.servers
        count = len(servers)
        for step in range(count):
            index = (self.turn + step) % count
            server = servers[index]
            try:
                request, client_address = server.get_request()
            except BlockingIOError:
                continue
            except OSError as err:
                if err.errno in OUT_OF_RESOURCES:
                    self.starved(server, err)
                # else ECONNABORTED and the like: that one client is gone, not us
                continue
            self.turn = index + 1
            if self.starving:
                log.warning("worker %d accepting again", os.getpid())
                self.starving = False
            return server, request, client_address
        return None

    def starved(self, server: BaseServer, err: OSError) -> None:
        """Out of fds or memory: the connection stays queued, and the listener stays readable,
        so waiting in epoll would spin. Say so once, then pause between attempts."""
        if not self.starving:
            log.error("worker %d cannot accept on %s: %s; retrying every %gs", os.getpid(),
                      server.server_address, err.strerror, RESOURCE_PAUSE)  # fmt: skip
            self.starving = True

    def next(self) -> Taken | None:
        """The next request, waiting for one; None once the worker is told to stop."""
        waited = False
        while self.lifecycle.running:
            taken = self.take()
            if taken is not None:
                if waited and taken[0] in self.streams:
                    self.step_back(taken[0])
                return taken
            self.wait()
            waited = True
        return None

    def step_back(self, server: BaseServer) -> None:
        """Move our place in the listener's queue of sleeping workers to its end.

        When several workers sleep in epoll, the kernel wakes the first one registered on the
        listener, so the same worker would take every connection that arrives while the others
        sleep too: all of a client's kept-alive connections would land on one thread-mode
        worker, on one core. Registering again after each connection a wake-up brought us
        puts the others first for the next one. Under load, connections come by accept-first
        without a wake-up, so this costs nothing there. Datagrams hold no worker beyond their
        own request, so datagram listeners skip it.
        """
        fd = server.fileno()
        self.poller.unregister(fd)
        self.poller.register(fd, LISTENER_EVENTS)

    def wait(self) -> None:
        """Sleep until a listener is readable, a signal arrives, or the parent check is due."""
        if self.starving:  # only a signal cuts the pause short
            select.select([self.lifecycle.wake_r], [], [], RESOURCE_PAUSE)
        else:
            self.poller.poll(PARENT_CHECK_INTERVAL)
        self.lifecycle.drain_wakeups()
        self.slot.beat()
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


def in_lane(
    slot: WorkerSlot, lane: int, server: BaseServer, request: object, client: object
) -> None:
    """Dispatch one request with its lane marked busy on the scoreboard meanwhile."""
    slot.begin(lane, client)
    try:
        dispatch(server, request, client)
    finally:
        slot.end(lane)


def close_all(servers: list[BaseServer]) -> None:
    for server in servers:
        server.server_close()


# --------------------------------------------------------------------------------- sync
def serve_sync(bindings: list[Binding], context: Context) -> None:
    """Handle each request inline; on TERM, finish it, then serve what is already queued."""
    servers = [make_server(endpoint, handler) for endpoint, handler in bindings]
    loop = AcceptLoop(servers, context)
    slot = context.slot

    def run(server: BaseServer, request: object, client: object) -> None:
        context.counted()
        in_lane(slot, 0, server, request, client)

    context.ready()
    try:
        while (taken := loop.next()) is not None:
            run(*taken)
        if context.draining():
            loop.drain(context.spec.graceful_timeout, run)
    finally:
        loop.close()
        close_all(servers)


# --------------------------------------------------------------------------------- thread
class ThreadPool:
    """Exactly ``size`` handler threads fed through a queue, with a count of free ones.

    The accept loop takes a free slot *before* it accepts, so the queue never holds more than
    one request per idle thread: back-pressure stays in the kernel's listen queue. Thread
    ``n`` runs its requests in scoreboard lane ``n``.
    """

    def __init__(self, size: int, slot: WorkerSlot) -> None:
        from queue import SimpleQueue  # thread mode only: a fork-mode worker stays smaller

        self.free = threading.Semaphore(size)
        self.jobs: SimpleQueue[Taken | None] = SimpleQueue()
        self.slot = slot
        # Daemon threads: a quick stop must not wait for them; a graceful one joins them.
        self.threads = [
            threading.Thread(target=self._work, args=(n,), name=f"handler-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self, lane: int) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                in_lane(self.slot, lane, *job)
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


def serve_thread(bindings: list[Binding], context: Context) -> None:
    """Accept only while a handler thread is free; on TERM let the running handlers finish."""
    spec, lifecycle = context.spec, context.lifecycle
    servers = [make_server(endpoint, handler) for endpoint, handler in bindings]
    loop = AcceptLoop(servers, context)
    pool = ThreadPool(spec.threads, context.slot)
    context.ready()
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
            context.counted()
            pool.submit(*taken)
        if context.draining():
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
        # ForkingMixIn turns into _exit(1); TERM lets the request finish, as for a worker;
        # USR2 dumps the child's stack (faulthandler survives the fork).
        set_parent_death_signal(signal.SIGKILL, os.getppid())
        super().finish_request(request, client_address)


class Children(set):
    """The worker's ``active_children``, shared by its listeners, that also keeps the
    scoreboard: each child gets a lane when ForkingMixIn adds it and frees it when reaped.

    It also kills children that run past ``--timeout``: a dump of the child's stack first,
    then TERM, then KILL after a grace.
    """

    KILL_GRACE = 1.0

    def __init__(self, slot: WorkerSlot, lanes: int, timeout: float) -> None:
        super().__init__()
        self.slot = slot
        self.free_lanes = list(range(lanes - 1, -1, -1))
        self.lane_of: dict[int, int] = {}
        self.started: dict[int, tuple[float, object]] = {}
        self.timeout = timeout
        self.killing: dict[int, float] = {}  # pid -> when to send KILL
        self.client: object = None  # the request about to be forked (set by the loop)

    def add(self, pid: int) -> None:
        super().add(pid)
        lane = self.free_lanes.pop()
        self.lane_of[pid] = lane
        self.started[pid] = (time.monotonic(), self.client)
        self.slot.begin(lane, self.client)

    def discard(self, pid: int) -> None:
        super().discard(pid)
        lane = self.lane_of.pop(pid, None)
        if lane is not None:
            self.slot.end(lane)
            self.free_lanes.append(lane)
        self.started.pop(pid, None)
        self.killing.pop(pid, None)

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for pid, kill_at in list(self.killing.items()):
            if now >= kill_at:
                _signal(pid, signal.SIGKILL)
                self.killing[pid] = float("inf")
        if not self.timeout:
            return
        for pid, (started, client) in list(self.started.items()):
            if pid not in self.killing and now - started > self.timeout:
                log.error(
                    "request child %d (client %s) ran %.1fs, past --timeout %gs: dumping its "
                    "stack, then TERM", pid, client, now - started, self.timeout,
                )  # fmt: skip
                _signal(pid, STACK_DUMP_SIGNAL)
                _signal(pid, signal.SIGTERM)
                self.killing[pid] = now + self.KILL_GRACE

    def kill_all(self) -> None:
        for pid in self:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def serve_fork(bindings: list[Binding], context: Context) -> None:
    """Fork a child per request, never more than ``max_children`` alive at once per worker."""
    spec, lifecycle = context.spec, context.lifecycle
    mixin = type("Forking", (WorkerForkingMixIn,), {"max_children": spec.max_children})
    servers = [make_server(endpoint, handler, mixin) for endpoint, handler in bindings]
    # One table for every listener: the bound is per worker, not per listener.
    children = Children(context.slot, spec.max_children, spec.timeout)
    for server in servers:
        server.active_children = children

    def reap() -> None:
        """Collect exited children by pid, only when a SIGCHLD said one exited."""
        if lifecycle.children_exited:
            lifecycle.children_exited = False
            servers[0].collect_children()

    def on_wake() -> None:
        reap()
        children.kill_overdue()

    def wait_for_room() -> None:
        """At ``max_children``, wait for a child to exit: woken by SIGCHLD through the wakeup
        pipe, and at least once a second, so overdue children are still killed meanwhile."""
        while len(children) >= spec.max_children:
            select.select([lifecycle.wake_r], [], [], PARENT_CHECK_INTERVAL)
            lifecycle.drain_wakeups()
            on_wake()

    def fork_one(server: BaseServer, request: object, client: object) -> None:
        context.counted()
        reap()  # before each fork, without blocking
        wait_for_room()
        children.client = client
        dispatch(server, request, client)

    loop = AcceptLoop(servers, context, on_wake=on_wake)
    context.ready()
    try:
        while (taken := loop.next()) is not None:
            fork_one(*taken)
        if context.draining():
            loop.drain(spec.graceful_timeout, fork_one)
    finally:
        loop.close()
        for server in servers:
            server.socket.close()
        if lifecycle.quick:  # they would die with us (PDEATHSIG); say so at once
            children.kill_all()
        else:  # graceful: every request runs to its end
            servers[0].collect_children(blocking=True)


MODES: dict[str, Serve] = {"sync": serve_sync, "thread": serve_thread, "fork": serve_fork}


def get(mode: str) -> Serve:
    return MODES[mode]

"""``fork``: ``ForkingMixIn`` semantics: one child per request, at most ``max_children`` alive
at once per worker, reaped by pid, waited for on a graceful stop.

The worker applies ``--timeout`` to each child itself (``kills_own_overdue``): a hung request
costs its child, and the worker with its other children lives on.

The worker forks its children itself. Until the sixth session on issue 14 a small fork
server, forked from the worker at boot, forked them for it, so that the pages the worker
writes per request would not be copied on write under every live child. Measured side by
side (``scripts/ab.py``, 3 runs of 5-6 rounds on a busy machine, one of 6 on a quiet one),
the worker forking itself spent 4-7% (quiet: 12%) less CPU a request and served 4-9%
(quiet: 14%) more: the hand-off (a message, two wake-ups and an answer
per request) had come to cost more than the copies it saved, once ``gc.freeze()`` in the
master and libc's fork (``quickfork``) had made the worker's own fork cheap. One process
per worker less is also less memory, and one failure less to handle.
"""

from __future__ import annotations

import _signal
import logging
import os
import select
import signal
import time

from workers.mixins import ForkingMixIn
from workers.mixins import _reap as reap_exited
from workers.runtime.accept import AcceptLoop, dispatch, log_access
from workers.runtime.access import ACCESS, reopen_logs
from workers.runtime.client import CONNECTIONS, ClientSocket
from workers.runtime.context import CURRENT, Context, make_server
from workers.runtime.escalation import Escalation, overdue, stalled_for
from workers.runtime.lifecycle import set_parent_death_signal
from workers.runtime.mode import Binding, Mode
from workers.runtime.quickfork import REFUSALS
from workers.runtime.quickfork import fork as quick_fork
from workers.runtime.scoreboard import WorkerSlot
from workers.runtime.spec import PARENT_CHECK_INTERVAL
from workers.servers import BaseServer

log = logging.getLogger("cluster.worker")


class WorkerForkingMixIn(ForkingMixIn):
    """``ForkingMixIn`` whose children die with the worker that forked them, and whose
    refused forks cost the request, one log line per episode, and no traceback."""

    def process_request(self, request: object, client_address: object) -> None:
        hold_reopens()  # a USR1 waits until the child is in active_children (its child
        try:  # releases it in finish_request)
            super().process_request(request, client_address)
        except OSError as err:
            REFUSALS.refused_with(err)
            self.shutdown_request(request)
            return
        finally:
            release_reopens()
        REFUSALS.forked()

    def fork_child(self) -> int:
        return quick_fork()

    def finish_request(self, request: object, client_address: object) -> None:
        # In the child. Everything a child touches first costs it a copy-on-write page fault,
        # so it does the one thing it must: ask to die with the worker (a worker killed -9
        # would otherwise leave its children running). The worker's inherited signal
        # handlers already do the right thing here: INT and QUIT raise SystemExit, which
        # ForkingMixIn turns into _exit(1); TERM lets the request finish, as for a worker;
        # USR2 dumps the child's stack (faulthandler survives the fork).
        set_parent_death_signal(signal.SIGKILL, os.getppid())
        release_reopens()  # held across the fork (hold_reopens): a USR1 sent since comes now
        children = self.active_children
        # CURRENT.lane, where this child's errors count, came with the fork (``fork_one``).
        if isinstance(children, Children) and isinstance(request, ClientSocket):
            request.attach(children.slot.doubles, children.slot.io_index(children.next_lane))
            CONNECTIONS.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            self._log_child(request, client_address)

    def _log_child(self, request: object, client_address: object) -> None:
        """A child writes its own access log line at once: it exits right after."""
        if ACCESS.log is None:
            return
        children = self.active_children
        ours = isinstance(children, Children)
        lane = children.next_lane if ours else 0
        started = children.slot.lanes[lane].started if ours else 0.0
        log_access(self, request, client_address, time.monotonic() - started)
        ACCESS.log.flush()


class Children(set):
    """The worker's ``active_children``, shared by its listeners, that also keeps the
    scoreboard: each child gets a lane when ForkingMixIn adds it and frees it when reaped.

    It also puts down children that run past ``--timeout``, with the same escalation the
    master uses for hung workers.
    """

    def __init__(self, slot: WorkerSlot, lanes: int, timeout: float) -> None:
        super().__init__()
        self.slot = slot
        self.free_lanes = list(range(lanes - 1, -1, -1))
        self.lane_of: dict[int, int] = {}
        self.client_of: dict[int, object] = {}
        self.timeout = timeout
        self.escalation = Escalation()
        self.client: object = None  # the request about to be forked (set by the loop)
        self.next_lane = 0  # its lane
        self.next_listener = 0  # and its listener
        self.listener_of: dict[int, int] = {}
        self.owner = os.getpid()

    def add(self, pid: int) -> None:
        """A child was forked for the request in lane ``next_lane`` (begun before the fork)."""
        super().add(pid)
        lane = self.free_lanes.pop()
        self.lane_of[pid] = lane
        self.listener_of[pid] = self.next_listener
        self.client_of[pid] = self.client

    def discard(self, pid: int) -> None:
        super().discard(pid)
        lane = self.lane_of.pop(pid, None)
        if lane is not None:
            self.slot.end(lane, self.listener_of.pop(pid, 0))
            self.free_lanes.append(lane)
        self.client_of.pop(pid, None)
        self.escalation.forget(pid)

    def reap(self) -> None:
        """Collect the children that have exited, never blocking: a full worker must still
        put down an overdue child meanwhile (``ForkingMixIn.collect_children`` would wait
        for an exit). By pid, with ``ForkingMixIn``'s own step (``discard`` frees each lane)."""
        reap_exited(self, os.WNOHANG)

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for pid in self.escalation.due(now):
            _send(pid, signal.SIGKILL)
        for pid, lane in list(self.lane_of.items()):
            record = self.slot.lanes[lane]
            if pid in self.escalation or not overdue(record.started, now, self.timeout,
                                                     record.io):  # fmt: skip
                continue
            log.error(
                "request child %d (client %s) made no progress for %.1fs, past --timeout "
                "%gs: dumping its stack, then TERM", pid, self.client_of.get(pid),
                stalled_for(record.started, record.io, now), self.timeout,
            )  # fmt: skip
            for signum in self.escalation.begin(pid, now):
                _send(pid, signum)

    def kill_all(self) -> None:
        for pid in self:
            _send(pid, signal.SIGKILL)

    def tell_all(self, signum: int) -> None:
        """Pass a stop (TERM), a keep-alive cut (URG) or a reopen of the logs (USR1) on:
        each child cuts its own connection if it is idle between requests, or reopens its
        files. (Not from a child: its copy of this table names its siblings.)"""
        if os.getpid() != self.owner:
            return
        for pid in self:
            _send(pid, signum)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# USR1 waits while a request child is forked and until its pid is in the table the handler
# below reads: one that came between the fork and the record reached every child but the
# newest, which went on writing to the rotated file. The child unblocks it first thing
# (``release_reopens``), and then gets any USR1 sent to it meanwhile. (``_signal``'s own
# function: ``signal.pthread_sigmask`` turns the old mask into enums, a dozen Python calls
# a request whose pages the worker then writes under every live child.)
REOPEN_HELD = (signal.SIGUSR1,)


def hold_reopens() -> None:
    _signal.pthread_sigmask(signal.SIG_BLOCK, REOPEN_HELD)


def release_reopens() -> None:
    _signal.pthread_sigmask(signal.SIG_UNBLOCK, REOPEN_HELD)


def pass_reopens_on(children: Children) -> None:
    """USR1 (reopen the logs) reaches our live children too: each writes to the files it
    was forked with, so the child of a long kept-alive connection would go on writing to
    the rotated file for as long as it lives. They are told first, and reopen in silence;
    we say it, once, as before."""
    before = signal.getsignal(signal.SIGUSR1)

    def handler(number: int, frame: object) -> None:
        if os.getpid() != children.owner:  # a request child, forked with this handler
            reopen_logs()
            return
        children.tell_all(signal.SIGUSR1)
        if callable(before):
            before(number, frame)

    signal.signal(signal.SIGUSR1, handler)


def serve(bindings: list[Binding], context: Context) -> None:
    """Fork a child per request, never more than ``max_children`` alive at once per worker."""
    spec, lifecycle = context.spec, context.lifecycle
    lanes = MODE.lanes(spec)
    mixin = type("Forking", (WorkerForkingMixIn,), {"max_children": lanes})
    servers = [
        make_server(endpoint, handler, context, n, mixin)
        for n, (endpoint, handler) in enumerate(bindings)
    ]
    # One table for every listener: the bound is per worker, not per listener.
    children = Children(context.slot, lanes, spec.timeout)
    for server in servers:
        server.active_children = children
    lifecycle.on_signal = children.tell_all
    pass_reopens_on(children)  # USR1 must reach the children already running

    def reap() -> None:
        """Free the lanes of the children that exited, when a SIGCHLD said some did."""
        if lifecycle.children_exited:
            lifecycle.children_exited = False
            children.reap()

    def on_wake() -> None:
        reap()
        children.kill_overdue()

    def wait_for_exits() -> None:
        """Sleep until a child exits (or a second passes), then reap and put down the
        overdue: a full worker, or one stopping, still applies ``--timeout``."""
        select.select([lifecycle.wake_r], [], [], PARENT_CHECK_INTERVAL)
        lifecycle.drain_wakeups()
        on_wake()

    def room(deadline: float = float("inf")) -> bool:
        """Below ``max_children`` now, or once a child exits (by ``deadline``, while we run).

        Checked *before* accepting, so that a full worker holds no connection it cannot
        start to serve: the connection stays queued for another worker, and a kill of this
        one resets nobody waiting. Woken by SIGCHLD through the wakeup pipe, and at least
        once a second, so overdue children are still killed meanwhile."""
        reap()
        if lifecycle.quick:  # nothing more to take: no drain
            return False
        while len(children) >= lanes:
            if not lifecycle.running and deadline == float("inf") or time.monotonic() > deadline:
                return False
            wait_for_exits()
        return not lifecycle.quick

    def fork_one(server: BaseServer, request: object, client: object) -> None:
        context.counted()
        children.client = client
        lane = children.next_lane = children.free_lanes[-1]
        CURRENT.lane = lane  # what verify_request counts in, and (inherited) the child
        children.next_listener = server.listener_index
        context.slot.begin(lane, client, server.listener_index)  # the child writes into it
        forked = len(children)
        dispatch(server, request, client)
        if len(children) == forked:  # refused by verify_request, or the fork failed
            context.slot.end(lane, server.listener_index)

    loop = AcceptLoop(servers, context, on_wake=on_wake, handlers=lanes)
    context.ready()
    try:
        while room() and (taken := loop.next()) is not None:
            fork_one(*taken)
        # Recycled, a worker leaves the queue to the others; what it parked is its own.
        loop.drain(spec.graceful_timeout, fork_one, room, queue=context.draining())
    finally:
        loop.close()
        for server in servers:
            server.socket.close()
        if lifecycle.quick:  # they would die with us (PDEATHSIG); say so at once
            children.kill_all()
        else:  # graceful: every request runs to its end, and one past --timeout is put down
            while children:
                wait_for_exits()


MODE = Mode(
    name="fork",
    summary="fork a child per request, at most --max-children at once per worker",
    serve=serve,
    lanes=lambda sizes: sizes.max_children,
    kills_own_overdue=True,
)

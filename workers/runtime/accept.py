"""The accept discipline every mode shares: accept first, wait in epoll only when idle.

``AcceptLoop`` tries ``accept()`` (or ``recvfrom``) on each listener first, and only when every
one of them says EAGAIN waits in ``epoll`` with ``EPOLLEXCLUSIVE``, so that one new connection
wakes one idle worker rather than all of them. Under load a worker goes from one request
straight to the next with a single system call; idle, it sleeps in the kernel until a
connection, a signal, or the parent check is due.

Each request runs in a scoreboard *lane* (``in_lane``: begin with start time and client; end:
back to idle, one more served) so that the master sees what every worker is doing and can kill
one whose request hangs.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

from workers.runtime.access import ACCESS, ROLE
from workers.runtime.client import CONNECTIONS, IDLE_GRACE, ClientSocket, CountingClientSocket
from workers.runtime.context import CURRENT, Context
from workers.runtime.lifecycle import Lifecycle, master_alive
from workers.runtime.room import WaitingRoom, defer_accept, has_data
from workers.runtime.scoreboard import WorkerSlot
from workers.servers import BaseServer

log = logging.getLogger("cluster.worker")

OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# One woken worker per connection, not all of them (the thundering herd).
LISTENER_EVENTS = select.EPOLLIN | select.EPOLLEXCLUSIVE
RESOURCE_PAUSE = 0.1  # seconds between accept attempts while out of resources
# An episode of running out of fds ends when accepts have gone through this long without a
# failure: near the limit, accepts fail and succeed by turns, and that is still one episode.
EPISODE_QUIET = 2.0

Taken = tuple[BaseServer, object, object]  # server, request, client address
DRAIN_BOUND = 2048  # a stop serves at most this many queued requests of a non-TCP listener


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting in the accept queue, the backlog) of a TCP listener, from
    ``TCP_INFO`` (Linux reports them as ``tcpi_unacked`` and ``tcpi_sacked`` for a
    listening socket); None where the kernel does not tell."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    return struct.unpack_from("II", info, 24)


def queued(sock: socket.socket) -> int:
    """How many requests a stop may still serve from ``sock``: its queue now, where known."""
    found = listen_queue(sock)
    return found[0] if found is not None else DRAIN_BOUND


class AcceptLoop:
    """Accept-first, epoll-when-idle over every listener, plus the worker's wakeup pipe."""

    def __init__(
        self,
        servers: list[BaseServer],
        context: Context,
        on_wake: Callable[[], None] | None = None,
        handlers: int = 1,
    ) -> None:
        self.servers = servers
        self.lifecycle: Lifecycle = context.lifecycle
        self.slot = context.slot
        self.master_pid = context.spec.master_pid
        self.beat_every = context.spec.beat_every  # the idle wait's bound: a heartbeat each
        self.on_wake = on_wake  # runs after every sleep: fork mode reaps its children there
        self.turn = 0  # the listener to try first
        self.starving = False  # accept() failed for want of fds or memory (and we said so)
        self.starved_at = float("-inf")  # when it last did
        self.refused = 0  # accepts that failed so in this episode
        self.paused = False  # the next wait is a pause: the listener would wake us at once
        # The last ``next`` waited (for a connection, a place, a pause) before it returned:
        # thread mode tells a run of back-to-back requests by it.
        self.waited = False
        # Held around ``take``: thread mode's threads also take connections on their own,
        # beside the one in ``next`` (the listener turn, the counts, the starving episode).
        self.taking = threading.Lock()
        # Stream listeners whose connections can hold a worker for long (see step_back).
        self.streams = {s for s in servers if getattr(s, "socket_type", None) == socket.SOCK_STREAM}
        self.accepted = [context.slot.accepted_index(n) for n in range(len(servers))]
        self.poller = select.epoll()  # owned here; closed by close()
        for server in servers:
            self.poller.register(server.fileno(), LISTENER_EVENTS)
        self.poller.register(self.lifecycle.wake_r, select.EPOLLIN)
        spec = context.spec
        # Silent connections wait in a room, not in a handler (``handlers`` of them: the
        # mode's threads or children), unless the protocol has the server speak first.
        self.waits = {s for s in self.streams
                      if not getattr(s.RequestHandlerClass, "speaks_first", False)}  # fmt: skip
        for server in self.streams:  # the kernel's half of holding silent clients
            defer_accept(server.socket, spec.defer_accept and server in self.waits)
        places = spec.connection_bound(handlers) - handlers
        self.room = (
            WaitingRoom(self.poller, places, spec.request_timeout)
            if spec.waiting_room and self.waits and places > 0 else None
        )  # fmt: skip

    def take(self, servers: list[BaseServer] | None = None, wait: bool = True) -> Taken | None:
        """One queued request from any listener (of ``servers``, by default all), or None
        when all are empty right now (or, without ``wait``, when another thread is taking).

        The listeners are tried in turn, starting after the one that gave the last request, so
        that a saturated listener cannot starve the others.
        """
        if not self.taking.acquire(wait):
            return None
        try:
            return self._take(servers or self.servers)
        finally:
            self.taking.release()

    def _take(self, servers: list[BaseServer]) -> Taken | None:
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
            self.slot.doubles[self.accepted[index]] += 1.0
            if self.starving:
                log.warning("worker %d accepting again (%d accepts failed meanwhile)",
                            os.getpid(), self.refused)  # fmt: skip
                self.starving, self.refused = False, 0
            return server, request, client_address
        return None

    def starved(self, server: BaseServer, err: OSError) -> None:
        """Out of fds or memory: the connection stays queued, and the listener stays readable,
        so waiting in epoll would spin. Say so once an episode, then pause between attempts.
        (Near the limit accepts fail and succeed by turns: a failure within EPISODE_QUIET of
        the last one belongs to the same episode, and is not said again.)"""
        now = time.monotonic()
        if not self.starving and now - self.starved_at > EPISODE_QUIET:
            log.error("worker %d cannot accept on %s: %s; retrying every %gs", os.getpid(),
                      server.server_address, err.strerror, RESOURCE_PAUSE)  # fmt: skip
            self.starving, self.refused = True, 0
        self.starved_at = now
        self.refused += 1
        self.paused = True  # and the pause gives up a silent client's fd (``wait``)

    def needs_room(self, server: BaseServer, request: object) -> bool:
        """Whether a connection just taken goes to the waiting room: its client has sent
        nothing yet, and its handler does not speak first."""
        return self.room is not None and server in self.waits and not has_data(request)  # type: ignore[arg-type]

    def next(self) -> Taken | None:
        """The next request, waiting for one; None once the worker is told to stop."""
        waited = self.waited = False
        room = self.room
        while self.lifecycle.running:
            if room is not None and len(room):  # one look per request while it is empty
                room.admit()
                if room.parked:
                    room.check()
                    room.expire(time.monotonic())  # under load, wait() may never come
                if (ready := room.take()) is not None:
                    return ready
                if not room.make_place(time.monotonic()):  # full: nothing more until a
                    self.wait()  # place frees up
                    continue
            taken = self.take()
            if taken is not None:
                if taken[0] in self.streams:
                    if waited:
                        self.step_back(taken[0])
                    if self.needs_room(taken[0], taken[1]):
                        room.park(*taken)  # type: ignore[union-attr]
                        continue
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
        """Sleep until a listener is readable, a signal arrives, or the parent check is due.
        (Going idle is when the access log's gathered lines go out.)"""
        if ACCESS.log is not None:
            ACCESS.log.flush()
        self.waited = True
        room, timeout = self.room, self.beat_every
        wake_r, woken = self.lifecycle.wake_r, False
        if room is not None and room.parked:
            now = time.monotonic()
            room.expire(now)
            timeout = max(0.0, min(timeout, room.next_expiry() - now))
        if self.paused:  # out of resources: only a signal cuts the pause short
            self.paused = False
            if room is not None:  # silent clients' fds are better spent on one that speaks
                # Here, not where the accept failed: that may be a thread-mode thread's own
                # take, and the room is the loop's alone (it expires the same oldest one).
                room.give_up_oldest(time.monotonic(), "the worker was out of file descriptors")
            woken = bool(select.select([wake_r], [], [], RESOURCE_PAUSE)[0])
        elif room is not None and room.full:
            for fd, _ in room.wait_full(wake_r, timeout):
                if fd == wake_r:
                    woken = True
                elif fd in room:
                    room.spoke(fd)
        else:
            for fd, _ in self.poller.poll(timeout):
                if fd == wake_r:
                    woken = True
                elif room is not None and fd in room:
                    room.spoke(fd)
        if woken:  # a read that finds the pipe empty costs an exception: only when it is not
            self.lifecycle.drain_wakeups()
        self.slot.beat()
        if self.on_wake is not None:
            self.on_wake()
        if not master_alive(self.master_pid):
            log.warning("worker %d: master %d is gone, stopping", os.getpid(), self.master_pid)
            self.lifecycle.running = False

    def drain(
        self,
        within: float,
        dispatch: Callable[[BaseServer, object, object], None],
        room: Callable[[float], bool] | None = None,
        queue: bool = True,
    ) -> None:
        """Serve what a stop leaves us (``drained``), one request at a time.

        ``room(deadline)`` waits (until ``deadline`` at most) for a free child, and says
        whether one is free: nothing is taken off the queue that cannot start at once, so a
        worker killed meanwhile resets no connection it had not begun to serve (they stay
        queued for the others).
        """
        deadline = time.monotonic() + within
        left = self.drained(within, queue)
        while True:
            if room is not None and not room(deadline):
                return
            taken = next(left, None)
            if taken is None:
                return
            dispatch(*taken)

    def drained(self, within: float, queue: bool = True) -> Iterator[Taken]:
        """What a stop still serves, one request at a time, as handlers come free: first the
        parked connections that speak within IDLE_GRACE (a client that just connected may
        have its request on the way; the silent rest are closed), then, with ``queue``, what
        the kernel had queued on our listeners when the stop came, so that a stop resets
        nobody. (A recycling worker leaves the queue to the others.)

        Bounded in time: under a steady stream of new connections the queue never empties,
        and the master kills us at the end of the graceful timeout anyway.
        """
        deadline = time.monotonic() + within
        if self.room is not None:
            yield from self.room.settle(min(within, IDLE_GRACE))
        if not queue:
            return
        # What was queued when the stop came, and no more: connections that keep arriving
        # meanwhile would keep the queue from ever emptying. (TCP tells its queue length;
        # other listeners get a bound no queue of theirs can exceed by much.)
        budget = {server: queued(server.socket) for server in self.servers}
        while time.monotonic() < deadline:
            open_ = [server for server in self.servers if budget[server] > 0]
            if not open_:
                return
            taken = self.take(open_)
            if taken is None:
                return
            budget[taken[0]] -= 1
            yield taken

    def close(self) -> None:
        if self.room is not None:
            self.room.close()
        self.poller.close()


def dispatch(server: BaseServer, request: object, client_address: object) -> None:
    """Run one accepted request through the server's socketserver steps (verify, process)."""
    server._handle_accepted(request, client_address)


def in_lane(
    slot: WorkerSlot, lane: int, server: BaseServer, request: object, client: object
) -> None:
    """Dispatch one request with its lane marked busy on the scoreboard meanwhile, and its
    connection's reads marked in that lane."""
    slot.begin(lane, client, server.listener_index)
    attached = isinstance(request, ClientSocket)
    if attached:
        request.attach(slot.doubles, slot.io_index(lane))
        CONNECTIONS.add(request)
    try:
        dispatch(server, request, client)
    finally:
        if attached:
            CONNECTIONS.discard(request)
        duration = slot.end(lane, server.listener_index)
        if ACCESS.log is not None:
            log_access(server, request, client, duration)


def log_access(server: BaseServer, request: object, client: object, duration: float) -> None:
    """The request's access log line (an http.server handler wrote its own, per request).
    Behind a PROXY header, the client is the original one the header named."""
    if getattr(server, "gate", None) is not None:
        client = CURRENT.client
    if type(request) is CountingClientSocket:
        if request.http_logged:
            return
        bytes_in, bytes_out = request.bytes_in, request.bytes_out
    elif isinstance(request, tuple):  # a datagram
        bytes_in, bytes_out = len(request[0]), "-"
    else:
        bytes_in = bytes_out = "-"
    ACCESS.log.write(  # type: ignore[union-attr]
        f"{client[0]}:{client[1]}" if type(client) is tuple else str(client or "-"),
        server.listener_uri, ROLE.pid, duration * 1000, bytes_in, bytes_out, "-", "-",
    )  # fmt: skip


def close_all(servers: list[BaseServer]) -> None:
    for server in servers:
        server.server_close()

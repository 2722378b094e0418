"""The waiting room: accepted connections whose clients have not sent anything yet.

A handler that reads from a silent client waits for it, and in sync mode a worker has only
one handler: ten clients that connect and say nothing would hold ten workers. So a worker
looks before it hands a new connection to a handler (one ``recv`` with ``MSG_PEEK``), and a
connection with nothing to read waits here, in the worker's epoll, while the worker serves
the ready ones. It costs a file descriptor, not a handler. When its first bytes come (or
its client closes) it goes to a handler like any other; when ``--request-timeout`` passes
first, it is closed, and the cut is logged (rate-limited), naming the client.

A handler whose protocol has the server speak first (a greeting, a banner) would wait for
ever with its client: it says so with the class attribute ``speaks_first = True``, and its
listener's connections go straight to a handler. ``--no-waiting-room`` turns the room off for
every listener. On TCP listeners the kernel also holds a new connection until its client
sends something, for a second (``TCP_DEFER_ACCEPT``, ``--no-defer-accept`` to turn it off):
most connections then arrive with their request, and the room only catches those the kernel
lets through when its wait ends, and serves Unix stream listeners, which have no such option.

The room is bounded (``capacity``): a worker whose room is full accepts nothing more until a
place frees up, so the rest wait in the kernel's queue, for it or another worker. A room full
of clients that have been silent for ``EVICT_AFTER`` seconds or more is a flood, though: then
its oldest connection is closed to make a place, so that silent clients cannot keep a worker
from ever accepting again (each new one would otherwise wait behind them in the queue).
"""

from __future__ import annotations

import os
import select
import socket
from collections import OrderedDict, deque
from time import monotonic

from workers.runtime.client import CUTS, peer

_recv = socket.socket.recv
DEFER_SECONDS = 1  # how long the kernel holds a silent TCP connection (TCP_DEFER_ACCEPT)
EVICT_AFTER = 5.0  # seconds of silence after which a full room gives up its oldest place
PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # a plain int: IntFlag arithmetic is slow


def defer_accept(sock: socket.socket, on: bool) -> None:
    """The kernel's half: on a TCP listener, have it hold each new connection until its client
    sends something, for DEFER_SECONDS at most, so that the connections a worker accepts
    have their request already (no parking, no hand-off) and silent ones never reach it at
    all for a while. Set by every worker at boot (the master never imports the app, so only
    a worker knows whether its handler speaks first); off for those that do. Linux lets a
    connection through when its wait ends even with nothing sent: the room takes it then."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_SECONDS if on else 0)
    except (OSError, AttributeError):
        pass  # not Linux: the waiting room alone does the job


def has_data(sock: socket.socket) -> bool:
    """Whether a handler reading ``sock`` now would not wait: bytes, end-of-file, or an error
    are there to read."""
    try:
        _recv(sock, 1, PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True  # a reset, say: the handler sees it at its first read
    return True


class WaitingRoom:
    """Silent connections, oldest first, each with the time it was parked."""

    def __init__(self, poller: select.epoll, capacity: int, timeout: float) -> None:
        self.poller = poller  # the accept loop's: a parked connection wakes it when it speaks
        self.capacity = capacity
        self.timeout = timeout  # --request-timeout; 0: they may wait for ever (within capacity)
        self.parked: OrderedDict[int, tuple[object, socket.socket, object, float]] = OrderedDict()
        self.ready: deque[tuple[object, socket.socket, object]] = deque()
        # Handed in by a thread-mode handler thread that took a connection on its own
        # (without the accept loop's lock): the loop parks them at its next turn.
        self.incoming: deque[tuple[object, socket.socket, object]] = deque()

    def __len__(self) -> int:
        return len(self.parked) + len(self.ready) + len(self.incoming)

    def __contains__(self, fd: int) -> bool:
        return fd in self.parked

    @property
    def full(self) -> bool:
        return len(self) >= self.capacity

    def make_place(self, now: float) -> bool:
        """Full: close the oldest connection if it has been silent EVICT_AFTER or more (a
        flood of silent clients), and say whether a place is free now."""
        return not self.full or self.give_up_oldest(now, "the waiting room was full")

    def give_up_oldest(self, now: float, why: str) -> bool:
        """Close the oldest parked connection if it has been silent EVICT_AFTER or more:
        places, or file descriptors, are wanted for clients that speak."""
        if not self.parked:
            return False
        fd, (_, sock, _, parked_at) = next(iter(self.parked.items()))
        if now - parked_at < EVICT_AFTER:
            return False
        CUTS.warning("cut client %s: silent for %.0fs while %s", peer(sock), now - parked_at,
                     why)  # fmt: skip
        self.drop(fd)
        return True

    def park(self, server: object, sock: socket.socket, client: object) -> None:
        fd = sock.fileno()
        self.parked[fd] = (server, sock, client, monotonic())
        self.poller.register(fd, select.EPOLLIN | select.EPOLLRDHUP)

    def hand_in(self, server: object, sock: socket.socket, client: object, wake_fd: int) -> None:
        """From another thread than the loop's: park this at the loop's next turn (waking it
        out of its wait: ``wake_fd`` is its wakeup pipe)."""
        self.incoming.append((server, sock, client))
        try:
            os.write(wake_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is woken already

    def admit(self) -> None:
        """Park what other threads handed in (the loop's thread only)."""
        while self.incoming:
            self.park(*self.incoming.popleft())

    def spoke(self, fd: int) -> None:
        """The connection on ``fd`` is readable: on to the handlers, in turn."""
        server, sock, client, _ = self.parked.pop(fd)
        self.poller.unregister(fd)
        self.ready.append((server, sock, client))

    def take(self) -> tuple[object, socket.socket, object] | None:
        return self.ready.popleft() if self.ready else None

    def check(self) -> None:
        """Move the parked connections that spoke since the last look to ``ready``, without
        waiting (one ``epoll_wait``, only while some are parked)."""
        if self.parked:
            for fd, _ in self.poller.poll(0):
                if fd in self.parked:
                    self.spoke(fd)

    def next_expiry(self) -> float:
        """When the oldest parked connection runs out of time (inf: none does)."""
        if not self.timeout:
            return float("inf")
        for _, _, _, parked_at in self.parked.values():
            return parked_at + self.timeout  # parked in order, all with the same timeout
        return float("inf")

    def expire(self, now: float) -> None:
        """Close the connections that stayed silent for the whole ``--request-timeout``."""
        while self.parked and self.next_expiry() <= now:
            fd, (_, sock, _, _) = next(iter(self.parked.items()))
            CUTS.warning("cut client %s: sent nothing within --request-timeout %gs (a handler "
                         "whose protocol has the server speak first says speaks_first = True)",
                         peer(sock), self.timeout)  # fmt: skip
            self.drop(fd)

    def wait_full(self, wake_fd: int, timeout: float) -> list[tuple[int, int]]:
        """Wait, while the room is full, for a parked connection to speak or a signal, but
        not for the listeners: a full worker must not be woken by connections it cannot take."""
        return self._poll_parked(timeout, wake_fd)

    def _poll_parked(self, timeout: float, *also: int) -> list[tuple[int, int]]:
        """Wait for the parked connections (and ``also``) alone: the accept loop's epoll
        would return at once for a listener with connections queued."""
        poller = select.poll()
        for fd in (*also, *self.parked):
            poller.register(fd, select.POLLIN)
        return poller.poll(max(0.0, timeout) * 1000.0)

    def drop(self, fd: int) -> None:
        _, sock, _, _ = self.parked.pop(fd)
        self.poller.unregister(fd)
        _close(sock)

    def settle(self, within: float) -> list[tuple[object, socket.socket, object]]:
        """A stop: give the parked connections ``within`` seconds to speak (a client that
        just connected may have its request on the way), close the rest, and return all
        that are ready, to be served before the worker goes."""
        deadline = monotonic() + within
        self.admit()
        while self.parked and (left := deadline - monotonic()) > 0:
            for fd, _ in self._poll_parked(left):
                self.spoke(fd)
        for fd in list(self.parked):
            self.drop(fd)
        ready, self.ready = list(self.ready), deque()
        return ready

    def close(self) -> None:
        self.admit()
        for fd in list(self.parked):
            self.drop(fd)
        for _, sock, _ in self.ready:
            _close(sock)
        self.ready.clear()


def _close(sock: socket.socket) -> None:
    """Close for every holder: a fork-mode request child may hold a copy of the fd."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass

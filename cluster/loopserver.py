"""Small servers that the master runs inside its own loop: the control socket and the metrics
endpoint.

The master must never block on a client, so each of these is a non-blocking listening socket
in the master's selector, with non-blocking connections: bytes are read as they come, a
message is handled once it is complete, the reply is written as the client takes it. Every
connection has a deadline (a silent client is dropped), a size bound (an endless message is
refused), and the number of connections is bounded (the excess is refused at once). No
thread: the master forks workers, and a thread of its own would be copied into them half-way
through whatever it was doing.

A ``LoopServer`` is a part of the master like the others: it answers ``next_deadline()``
(its earliest connection deadline) and ``expire(now)`` drops the late ones. Selector keys
carry a callable, which the loop calls with the event mask. The protocol is the subclass's:
``split`` cuts complete messages off the input, ``respond`` answers one. A protocol in which
the server speaks first to a client that says nothing (HAProxy's agent-check) sets
``greeting_wait``: a connection silent that long since it opened gets ``greet``'s reply, then
the end, instead of being dropped.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic

log = logging.getLogger("cluster.master")


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    deadline: float
    peer: str = ""
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    close_after_write: bool = False
    received: bool = False  # the client sent something (else, past greeting_wait: greet it)
    refused: bytes = b""  # not admitted: every message gets this reply, then the end


class LoopServer:
    """A listening socket served from the master's selector (see the module docstring)."""

    name = "server"
    max_message = 65536  # bytes a message may have before it is complete
    idle_timeout = 5.0  # seconds a connection may stay silent (or slow) before it is dropped
    max_clients = 128
    greeting_wait: float | None = None  # seconds of first silence before ``greet`` answers
    accept_pause = 0.1  # seconds between accepts while the master has no fd left
    # Full: refuse the new client (False), or make room by dropping the oldest (True), for a
    # protocol whose honest clients are quick (a health check) and for which a refusal is a
    # verdict (a failed check): a flood of slow clients must not crowd the balancer out.
    evict_when_full = False

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, uri: str) -> None:
        self.sock = sock  # owned here, closed by close()
        self.selector = selector
        self.uri = uri
        self.conns: dict[int, Conn] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self.on_accept)
        self.listening = True
        # Out of fds, the listening socket stays readable: left in the selector, it would spin
        # the master and log a line per turn. So it leaves the selector until this time.
        self.paused_until: float | None = None
        self.starved = False  # in an episode of failed accepts (logged once when it begins)

    # ------------------------------------------------------------------ the protocol
    def admit(self, sock: socket.socket) -> bytes | None:
        """A new connection: None to serve it, or a last reply to send before closing it."""
        return None

    def split(self, conn: Conn) -> list[bytes]:
        """Cut the complete messages off ``conn.inbuf`` (the rest stays for later)."""
        raise NotImplementedError

    def respond(self, conn: Conn, message: bytes) -> bytes:
        """The reply to one message; set ``conn.close_after_write`` to end the connection."""
        raise NotImplementedError

    def refuse(self, conn: Conn, why: str) -> bytes:
        """The reply to a message that broke a bound (too long); the connection then ends."""
        return b""

    def greet(self, conn: Conn) -> bytes:
        """With ``greeting_wait``: the reply to a client silent since it connected."""
        return b""

    # ------------------------------------------------------------------ the loop's side
    def fds(self) -> list[int]:
        """Ours: every worker forked meanwhile closes them."""
        return [self.sock.fileno(), *self.conns]

    def next_deadline(self) -> float:
        earliest = min((c.deadline for c in self.conns.values()), default=float("inf"))
        return earliest if self.paused_until is None else min(earliest, self.paused_until)

    def expire(self, now: float) -> None:
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            if self.listening:  # try again; on_accept pauses anew if there is still no fd
                self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)
                self.on_accept(selectors.EVENT_READ)
        for conn in [c for c in self.conns.values() if now >= c.deadline]:
            if self.greeting_wait is not None and not (conn.received or conn.close_after_write):
                conn.outbuf += self.greet(conn)
                conn.close_after_write = True
                conn.deadline = now + self.idle_timeout  # to take the reply, then dropped
                self.flush(conn)
                continue
            log.debug("%s: dropping %s, silent or slow for %gs", self.name, conn.peer or "a client",
                      self.idle_timeout)  # fmt: skip
            self.drop(conn)

    def on_accept(self, mask: int) -> None:
        if self.paused_until is not None:
            return
        for _ in range(self.max_clients):  # what is queued now, in one turn at most
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.resumed()
                return
            except OSError as err:  # out of fds: the client waits in the queue
                self.pause(err)
                return
            self.resumed()
            sock.setblocking(False)
            first_wait = self.idle_timeout if self.greeting_wait is None else self.greeting_wait
            conn = Conn(sock, monotonic() + first_wait, _peer(address))
            if len(self.conns) >= self.max_clients and self.evict_when_full:
                oldest = next(iter(self.conns.values()))  # the dict keeps accept order
                log.debug("%s: full; dropping %s, the oldest, for a new client", self.name,
                          oldest.peer or "a client")  # fmt: skip
                self.drop(oldest)
            if len(self.conns) >= self.max_clients:
                try:
                    sock.send(self.refuse(conn, f"too many clients (at most {self.max_clients})"))
                except OSError:
                    pass
                sock.close()
                continue
            # Not admitted: say so at once, and again to its first message, then end it (an
            # end at once would break the pipe under a client that writes first).
            conn.refused = self.admit(sock) or b""
            conn.outbuf += conn.refused
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, self._events_of(conn))
            if conn.outbuf:
                self.flush(conn)

    def pause(self, err: OSError) -> None:
        """No fd for a new connection: stop watching the listening socket for a moment (the
        clients wait in its queue); one line per episode, not one per turn of the loop."""
        if not self.starved:
            log.warning("%s: cannot accept: %s; retrying every %gs", self.name, err.strerror,
                        self.accept_pause)  # fmt: skip
            self.starved = True
        self.paused_until = monotonic() + self.accept_pause
        self.selector.unregister(self.sock)

    def resumed(self) -> None:
        if self.starved:
            self.starved = False
            log.info("%s: accepting again", self.name)

    def _events_of(self, conn: Conn) -> Callable[[int], None]:
        def on_event(mask: int) -> None:
            try:
                if mask & selectors.EVENT_READ:
                    self.on_readable(conn)
                if mask & selectors.EVENT_WRITE and conn.sock.fileno() in self.conns:
                    self.flush(conn)
            except Exception:  # a bug in a protocol must cost its client, never the master
                log.exception("%s: dropping %s after an error in its handling", self.name,
                              conn.peer or "a client")  # fmt: skip
                self.drop(conn)

        return on_event

    def on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.drop(conn)
            return
        conn.inbuf += data
        conn.received = True
        if conn.refused:
            conn.inbuf.clear()
            conn.outbuf += conn.refused
            conn.close_after_write = True
            self.flush(conn)
            return
        replies = [self.respond(conn, message) for message in self.split(conn)]
        if len(conn.inbuf) > self.max_message:
            replies.append(self.refuse(conn, f"message over {self.max_message} bytes"))
            conn.close_after_write = True
            conn.inbuf.clear()
        conn.deadline = monotonic() + self.idle_timeout
        conn.outbuf += b"".join(replies)
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        """Write what the client will take now; wait for it to take the rest."""
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.drop(conn)
            return
        if not conn.outbuf and conn.close_after_write:
            self.drop(conn)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self.selector.modify(conn.sock, events, self._events_of(conn))

    def drop(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is None:
            return
        self.selector.unregister(conn.sock)
        conn.sock.close()

    def stop_listening(self) -> None:
        """Accept no more (another process now serves the socket); finish the open ones."""
        if self.listening:
            self.listening = False
            if self.paused_until is None:  # a paused socket is out of the selector already
                self.selector.unregister(self.sock)
            self.paused_until = None

    def listen_again(self) -> None:
        """Accept again after ``stop_listening`` (an upgrade's new master died after it took
        the socket over: we serve it again)."""
        if not self.listening:
            self.listening = True
            self.selector.register(self.sock, selectors.EVENT_READ, self.on_accept)

    def close_connections(self) -> None:
        """Drop every connection and stop listening (the socket itself stays open)."""
        for conn in list(self.conns.values()):
            self.drop(conn)
        self.stop_listening()

    def close(self) -> None:
        self.close_connections()
        self.sock.close()


def _peer(address: object) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address or "")

"""A worker's accepted connections: they tell the scoreboard when the handler waits on its
client, and they can be cut while idle between requests.

``ListeningSocket`` replaces the class of each shared stream listener in the worker, so that
``accept()`` returns a ``ClientSocket``: the very socket the stdlib returns, plus two stores
into its scoreboard lane around each ``recv``/``recv_into`` (``io``: waiting since T, or done
at -T). The master's watchdog reads them: a request that waits for its client's bytes is
waiting, not hung, so ``--timeout`` bounds a request's work, not a kept-alive connection's
life.

Between requests. A handler that serves several requests on one connection says when it
waits for the next one: ``http.server`` handlers do, without a change of theirs
(``mark_requests`` wraps their class), and so does the ``http-hello`` demo; any handler may
call ``self.request.between_requests()``. Only protocols whose clients expect an idle
connection to be closed (HTTP clients retry then) should: a client may be sending its next
request at the very moment the connection is cut. Such a wait is recorded in the lane's
``idle`` and:

- on a graceful stop (TERM) the connection is cut at once (``cut_idle(0)``): the read
  returns end-of-file, as if the client had closed, so the handler ends cleanly, the way
  nginx closes idle keep-alive connections on a graceful shutdown;
- past ``--keep-alive`` the master sends the worker ``CUT_IDLE_SIGNAL`` and the connection is
  cut the same way.

A wait the handler did not mark (the first request of a connection, a request body, an
interactive protocol) is never cut: it is the client's turn within a request.
"""

from __future__ import annotations

import signal
import socket
from time import monotonic

from workers.runtime.access import ACCESS, ROLE

CUT_IDLE_SIGNAL = signal.SIGURG  # from the master: cut connections idle past --keep-alive
IDLE_GRACE = 0.5  # seconds a stop leaves a just-answered connection for its next request

_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send, _sendall = socket.socket.send, socket.socket.sendall
_SPARE = memoryview(bytearray(16)).cast("d")  # where an unattached connection writes


class ClientSocket(socket.socket):
    """An accepted stream connection whose reads are marked in a scoreboard lane."""

    __slots__ = ("_io", "_at", "between")
    closing = False  # class-wide: a graceful stop began; idle waits end (after IDLE_GRACE)
    closing_at = 0.0

    def attach(self, doubles: memoryview, at: int) -> None:
        """Write this connection's waits into the lane whose ``io`` is ``doubles[at]``."""
        self._io, self._at = doubles, at

    def between_requests(self) -> None:
        """The handler is done with one request: its next read waits for another one."""
        self.between = True

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.between:
            return self._next_request(_recv, b"", bufsize, flags)
        io, at = self._io, self._at
        io[at] = monotonic()
        try:
            return _recv(self, bufsize, flags)
        finally:
            io[at] = -monotonic()

    def recv_into(self, buffer: object, nbytes: int = 0, flags: int = 0) -> int:
        if self.between:
            return self._next_request(_recv_into, 0, buffer, nbytes, flags)
        io, at = self._io, self._at
        io[at] = monotonic()
        try:
            return _recv_into(self, buffer, nbytes, flags)
        finally:
            io[at] = -monotonic()

    def _next_request(self, read, eof, *args):  # noqa: ANN001, ANN202
        """A read that waits for the client's next request: cut (end-of-file) on a stop,
        once the stop's grace for requests already on their way is over."""
        if ClientSocket.closing and monotonic() >= ClientSocket.closing_at + IDLE_GRACE:
            return eof
        io, at = self._io, self._at
        io[at] = io[at + 1] = now = monotonic()
        if ClientSocket.closing and now >= ClientSocket.closing_at + IDLE_GRACE:
            # The grace ran out between the check above and this wait being seen: the cut
            # (SIGALRM) may have passed it by. End it here.
            io[at], io[at + 1] = -now, 0.0
            self.between = False
            return eof
        try:
            return read(self, *args)
        finally:
            io[at], io[at + 1] = -monotonic(), 0.0
            self.between = False

    def idle_since(self) -> float:
        """When it began waiting for its next request; 0 while it is not."""
        return self._io[self._at + 1] if self.between else 0.0


class CountingClientSocket(ClientSocket):
    """A ``ClientSocket`` that also counts the bytes in and out, for the access log (only
    with ``--access-log``: the counting is not free)."""

    __slots__ = ("bytes_in", "bytes_out", "http_logged")

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.between:
            data = self._next_request(_recv, b"", bufsize, flags)
        else:
            io, at = self._io, self._at
            io[at] = monotonic()
            try:
                data = _recv(self, bufsize, flags)
            finally:
                io[at] = -monotonic()
        self.bytes_in += len(data)
        return data

    def recv_into(self, buffer: object, nbytes: int = 0, flags: int = 0) -> int:
        if self.between:
            count = self._next_request(_recv_into, 0, buffer, nbytes, flags)
        else:
            io, at = self._io, self._at
            io[at] = monotonic()
            try:
                count = _recv_into(self, buffer, nbytes, flags)
            finally:
                io[at] = -monotonic()
        self.bytes_in += count
        return count

    def send(self, data: bytes, flags: int = 0) -> int:
        sent = _send(self, data, flags)
        self.bytes_out += sent
        return sent

    def sendall(self, data: bytes, flags: int = 0) -> None:
        _sendall(self, data, flags)
        self.bytes_out += len(data)


class ListeningSocket(socket.socket):
    """A shared listener whose ``accept()`` gives ``ClientSocket`` connections."""

    __slots__ = ()
    client_class: type[ClientSocket] = ClientSocket  # CountingClientSocket with an access log

    def accept(self) -> tuple[ClientSocket, object]:
        fd, address = self._accept()
        sock = self.client_class(self.family, self.type, self.proto, fileno=fd)
        sock._io, sock._at, sock.between = _SPARE, 0, False
        if type(sock) is CountingClientSocket:
            sock.bytes_in = sock.bytes_out = 0
            sock.http_logged = False
        return sock, address


class Connections:
    """The connections of this process that are inside a request, to cut the idle ones."""

    def __init__(self) -> None:
        self._live: set[ClientSocket] = set()

    def add(self, sock: ClientSocket) -> None:
        self._live.add(sock)

    def discard(self, sock: ClientSocket) -> None:
        self._live.discard(sock)

    def cut_idle(self, longer_than: float) -> int:
        """Cut every connection idle between requests for longer than ``longer_than``
        seconds: its pending read returns end-of-file. Returns how many were cut."""
        now, cut = monotonic(), 0
        for sock in list(self._live):
            since = sock.idle_since()
            if since and now - since >= longer_than:
                try:
                    sock.shutdown(socket.SHUT_RD)
                    cut += 1
                except OSError:
                    pass  # closed meanwhile
        return cut


CONNECTIONS = Connections()  # one per process (a fork-mode child gets a copy of its own)


def close_idle() -> None:
    """A graceful stop (or a recycle) began: close the connections that wait between
    requests.

    Those idle for ``IDLE_GRACE`` already are cut now. One that just had its reply may have
    its client's next request on the way: it gets ``IDLE_GRACE`` for it (the reply then says
    ``Connection: close``, so the client closes cleanly), and is cut when that is over
    (``SIGALRM``). After that, every wait for a next request ends at once.
    """
    if ClientSocket.closing:
        return
    ClientSocket.closing, ClientSocket.closing_at = True, monotonic()
    CONNECTIONS.cut_idle(IDLE_GRACE)
    signal.setitimer(signal.ITIMER_REAL, IDLE_GRACE)  # also for waits that begin meanwhile


def stopping_past_grace() -> bool:
    return ClientSocket.closing and monotonic() >= ClientSocket.closing_at + IDLE_GRACE


def cut_after_grace(signum: int, frame: object) -> None:
    """SIGALRM, ``IDLE_GRACE`` into a stop: cut what still waits for a next request."""
    CONNECTIONS.cut_idle(0.0)


def mark_requests(handler: type) -> type:
    """An ``http.server`` handler class, made to mark the wait before each request after its
    connection's first; any other class as it is. (A subclass: the user's class and its
    own overrides run unchanged.)"""
    bases = {f"{c.__module__}.{c.__qualname__}" for c in handler.__mro__}
    if "http.server.BaseHTTPRequestHandler" not in bases:
        return handler

    class Marked(handler):  # type: ignore[misc, valid-type]
        _served_one = False
        _cluster_status: object = None

        def handle_one_request(self) -> None:
            if self._served_one:
                mark = getattr(self.connection, "between_requests", None)
                if mark is not None:
                    mark()
            self._served_one = True
            self._cluster_status = None
            super().handle_one_request()
            if self._cluster_status is not None and ACCESS.log is not None:
                self._log_access()

        def parse_request(self) -> bool:
            # The request line came (maybe from rfile's buffer, without a read): the wait
            # for this request is over, whatever the handler reads next is part of it.
            if isinstance(self.connection, ClientSocket):
                self.connection.between = False
            self._cluster_started = monotonic()
            return super().parse_request()

        def log_request(self, code: object = "-", size: object = "-") -> None:
            self._cluster_status = code  # the access log line waits for the whole reply
            super().log_request(code, size)

        def end_headers(self) -> None:
            # A stop began: this reply is the connection's last, and says so, so that its
            # client closes instead of sending a request that would find it gone.
            if (
                ClientSocket.closing
                and not self.close_connection
                and (
                    getattr(self, "request_version", "HTTP/0.9") >= "HTTP/1.1"
                    or self.headers
                    and "keep-alive" in self.headers.get("Connection", "").lower()
                )
            ):
                self.send_header("Connection", "close")
            super().end_headers()

        def _log_access(self) -> None:
            """One access log line per HTTP request, once it is answered: its request line,
            status, and bytes (the handler's own logging goes on as it was)."""
            sock = self.connection
            if type(sock) is not CountingClientSocket:
                return
            seen_in, seen_out = getattr(self, "_cluster_bytes", (0, 0))
            code = self._cluster_status
            ACCESS.log.write(  # type: ignore[union-attr]
                _client(self.client_address), getattr(self.server, "listener_uri", "-"),
                ROLE.pid, (monotonic() - self._cluster_started) * 1000,
                sock.bytes_in - seen_in, sock.bytes_out - seen_out,
                getattr(self, "requestline", "-"), int(code) if str(code).isdigit() else code,
            )  # fmt: skip
            self._cluster_bytes = (sock.bytes_in, sock.bytes_out)
            sock.http_logged = True

    Marked.__name__ = Marked.__qualname__ = handler.__name__
    Marked.__module__ = handler.__module__
    return Marked


def _client(address: object) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address or "-")

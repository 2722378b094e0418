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

import _socket
import logging
import select
import signal
import socket
from collections.abc import Callable
from time import monotonic

from workers.runtime import ratelog
from workers.runtime.access import ACCESS, ROLE
from workers.runtime.ratelog import RateLimitedLog

CUT_IDLE_SIGNAL = signal.SIGURG  # from the master: cut connections idle past --keep-alive
IDLE_GRACE = 0.5  # seconds a stop leaves a just-answered connection for its next request
NO_DEADLINE = -1.0  # ``_deadline``: no --request-timeout
NEXT_BYTE = 0.0  # ``_deadline``: the clock starts with the next request's first byte
CUT = 1e-9  # ``_deadline``: cut already, every later read is end-of-file

_recv = socket.socket.recv
_recv_into = socket.socket.recv_into
_send, _sendall = socket.socket.send, socket.socket.sendall
# A socket's family, type and protocol as the C type keeps them, plain ints: the Python
# properties convert each to its enum, some 3 microseconds an accept (the stdlib's accept()
# pays it too), where the new socket's constructor needs only the numbers.
_family, _type, _proto = (_socket.socket.family.__get__, _socket.socket.type.__get__,
                          _socket.socket.proto.__get__)  # fmt: skip
_DONTWAIT = int(socket.MSG_DONTWAIT)  # a plain int: or-ing the IntFlag costs microseconds
_SPARE = memoryview(bytearray(16)).cast("d")  # where an unattached connection writes
CUTS = RateLimitedLog(logging.getLogger("cluster.worker"), ratelog.CUT)


class IdleWaitHook:
    """What runs as a handler begins to wait for its client's next request: in thread
    mode, while the leader serves, the leader hands the accept loop on (that wait can last);
    None otherwise. An instance's attribute, not the class's: setting an attribute of a
    class invalidates its method cache, and this one changes twice a request."""

    __slots__ = ("call",)

    def __init__(self) -> None:
        self.call: Callable[[], None] | None = None


IDLE_WAIT = IdleWaitHook()


class ClientSocket(socket.socket):
    """An accepted stream connection whose reads are marked in a scoreboard lane, and bounded
    by ``--request-timeout``.

    The request deadline. ``--request-timeout`` bounds the reading of one request as a whole,
    however often its client sends a byte (a socket timeout restarts with every byte, so a
    client that drips would hold a worker for ever). The clock of the connection's first
    request starts at ``accept()``; a reply (any send) stops it, and the next request's
    clock starts with its first byte: the wait before that is the keep-alive wait, which
    ``--keep-alive`` bounds. At the deadline the handler's read returns end-of-file, as if the
    client had closed, so the handler ends the way it ends for a client that went away, and
    the cut is logged (rate-limited), naming the client.
    """

    __slots__ = ("_io", "_at", "between", "_deadline")
    closing = False  # class-wide: a graceful stop began; idle waits end (after IDLE_GRACE)
    closing_at = 0.0
    request_timeout = 0.0  # class-wide, set at boot: --request-timeout (0: none)
    after_reply = NO_DEADLINE  # what a reply sets ``_deadline`` to: NEXT_BYTE with a timeout

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
        io[at] = now = monotonic()
        try:
            if self._deadline > 0.0:
                if self._deadline > now and self.gettimeout() is None:  # the common case
                    try:
                        return _recv(self, bufsize, flags | _DONTWAIT)
                    except BlockingIOError:
                        pass
                return self._by_deadline(now, _recv, b"", bufsize, flags)
            data = _recv(self, bufsize, flags)
            if data and self._deadline == NEXT_BYTE:
                self._deadline = monotonic() + self.request_timeout
            return data
        finally:
            io[at] = -monotonic()

    def recv_into(self, buffer: object, nbytes: int = 0, flags: int = 0) -> int:
        if self.between:
            return self._next_request(_recv_into, 0, buffer, nbytes, flags)
        io, at = self._io, self._at
        io[at] = now = monotonic()
        try:
            if self._deadline > 0.0:
                if self._deadline > now and self.gettimeout() is None:  # the common case
                    try:
                        return _recv_into(self, buffer, nbytes, flags | _DONTWAIT)
                    except BlockingIOError:
                        pass
                return self._by_deadline(now, _recv_into, 0, buffer, nbytes, flags)
            count = _recv_into(self, buffer, nbytes, flags)
            if count and self._deadline == NEXT_BYTE:
                self._deadline = monotonic() + self.request_timeout
            return count
        finally:
            io[at] = -monotonic()

    def send(self, data: bytes, flags: int = 0) -> int:
        if self._deadline != CUT:  # a reply: this request's clock stops
            self._deadline = self.after_reply
        return _send(self, data, flags)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if self._deadline != CUT:
            self._deadline = self.after_reply
        _sendall(self, data, flags)

    def _by_deadline(self, now, read, eof, *args):  # noqa: ANN001, ANN202
        """A read within a request whose clock runs that could not be served at once: it
        returns by the deadline, with the bytes that came, or with end-of-file once the
        deadline has passed.

        ``recv``/``recv_into`` already tried the common case (data there, a blocking socket:
        one ``MSG_DONTWAIT`` system call); here a read that would wait polls first, for no
        longer than what is left. A handler's own socket timeout keeps its meaning
        (``TimeoutError`` when it is the shorter), and a handler that does non-blocking I/O
        itself is only cut at its next read past the deadline.
        """
        left = self._deadline - now
        if left <= 0.0:
            return self._cut(eof)
        timeout = self.gettimeout()
        if timeout == 0.0:
            return read(self, *args)
        while True:
            wait = left if timeout is None else min(left, timeout)
            if readable(self, wait):
                return read(self, *args)
            left = self._deadline - monotonic()
            if left <= 0.0:
                return self._cut(eof)
            if timeout is not None and timeout <= wait:
                raise TimeoutError("timed out")

    def _cut(self, eof):  # noqa: ANN001, ANN202
        if self._deadline != CUT:
            self._deadline = CUT
            CUTS.warning("cut client %s: no whole request within --request-timeout %gs",
                         peer(self), self.request_timeout)  # fmt: skip
        return eof

    def _next_request(self, read, eof, *args):  # noqa: ANN001, ANN202
        """A read that waits for the client's next request: cut (end-of-file) on a stop,
        once the stop's grace for requests already on their way is over."""
        if ClientSocket.closing and monotonic() >= ClientSocket.closing_at + IDLE_GRACE:
            return eof
        if IDLE_WAIT.call is not None:
            IDLE_WAIT.call()
        io, at = self._io, self._at
        io[at] = io[at + 1] = now = monotonic()
        if ClientSocket.closing and now >= ClientSocket.closing_at + IDLE_GRACE:
            # The grace ran out between the check above and this wait being seen: the cut
            # (SIGALRM) may have passed it by. End it here.
            io[at], io[at + 1] = -now, 0.0
            self.between = False
            return eof
        got = eof
        try:
            got = read(self, *args)
            return got
        finally:
            io[at], io[at + 1] = -monotonic(), 0.0
            self.between = False
            if got and self._deadline == NEXT_BYTE:  # the next request began
                self._deadline = monotonic() + self.request_timeout

    def idle_since(self) -> float:
        """When it began waiting for its next request; 0 while it is not."""
        return self._io[self._at + 1] if self.between else 0.0


def readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has bytes (or end-of-file, or an error) to read within ``timeout``."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000.0))


def peer(sock: socket.socket) -> str:
    """The client's address as the log names it (the socket may be reset already)."""
    try:
        address = sock.getpeername()
    except OSError:
        return "(gone)"
    return format_client(address) if address else "(unix)"


class CountingClientSocket(ClientSocket):
    """A ``ClientSocket`` that also counts the bytes in and out, for the access log (only
    with ``--access-log``: the counting is not free)."""

    __slots__ = ("bytes_in", "bytes_out", "http_logged")

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = ClientSocket.recv(self, bufsize, flags)
        self.bytes_in += len(data)
        return data

    def recv_into(self, buffer: object, nbytes: int = 0, flags: int = 0) -> int:
        count = ClientSocket.recv_into(self, buffer, nbytes, flags)
        self.bytes_in += count
        return count

    def send(self, data: bytes, flags: int = 0) -> int:
        sent = ClientSocket.send(self, data, flags)
        self.bytes_out += sent
        return sent

    def sendall(self, data: bytes, flags: int = 0) -> None:
        ClientSocket.sendall(self, data, flags)
        self.bytes_out += len(data)


class ListeningSocket(socket.socket):
    """A shared listener whose ``accept()`` gives ``ClientSocket`` connections."""

    __slots__ = ()
    client_class: type[ClientSocket] = ClientSocket  # CountingClientSocket with an access log

    def accept(self) -> tuple[ClientSocket, object]:
        fd, address = self._accept()
        sock = self.client_class(_family(self), _type(self), _proto(self), fileno=fd)
        timeout = ClientSocket.request_timeout
        self.prepare(sock, monotonic() + timeout if timeout else NO_DEADLINE)
        return sock, address

    @staticmethod
    def prepare(sock: ClientSocket, deadline: float) -> None:
        """A new connection's state: no lane yet, its request's deadline."""
        sock._io, sock._at, sock.between = _SPARE, 0, False
        sock._deadline = deadline
        if type(sock) is CountingClientSocket:
            sock.bytes_in = sock.bytes_out = 0
            sock.http_logged = False


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
                format_client(self.client_address), getattr(self.server, "listener_uri", "-"),
                ROLE.pid, (monotonic() - self._cluster_started) * 1000,
                sock.bytes_in - seen_in, sock.bytes_out - seen_out,
                getattr(self, "requestline", "-"), int(code) if str(code).isdigit() else code,
            )  # fmt: skip
            self._cluster_bytes = (sock.bytes_in, sock.bytes_out)
            sock.http_logged = True

    Marked.__name__ = Marked.__qualname__ = handler.__name__
    Marked.__module__ = handler.__module__
    return Marked


def format_client(address: object) -> str:
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address or "-")

"""Lanes: one connection (or datagram socket) each, with at most one request in flight, and
the protocol on it: stream echo, HTTP GET, datagram echo.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from typing import TYPE_CHECKING

from loadtest.errors import classify_errno, describe
from loadtest.http import parse_http_response

if TYPE_CHECKING:
    from loadtest.clients import Client

DUE, RETRY = 0, 1  # timer kinds: an open-loop send, a retry after EAGAIN


class Lane:
    """One connection (or datagram socket) with at most one request in flight.

    The client loop calls ``begin`` to start a request and ``on_event`` when the socket is
    ready; the lane calls back ``client.succeed`` or ``client.fail`` exactly once per request.
    Subclasses define the protocol: what to send and when a reply is complete and right.
    """

    __slots__ = (
        "client", "index", "sock", "state", "intended", "deadline", "due", "out", "buf",
        "expected", "got", "retry_at", "generation",
    )  # fmt: skip

    IDLE, CONNECTING, SENDING, WAITING, RETRY = range(5)

    def __init__(self, client: Client, index: int) -> None:
        self.client = client
        self.index = index
        self.sock: socket.socket | None = None
        self.state = Lane.IDLE
        self.intended = 0.0
        self.deadline = 0.0
        self.due = 0.0  # open loop: the next intended send time
        self.out: bytes | memoryview = b""
        self.buf = b""
        self.expected = b""
        self.got = 0  # stream echo: bytes of the reply matched so far
        self.retry_at = 0.0
        self.generation = 0

    # -- connection
    def make_socket(self) -> socket.socket:
        """Non-blocking, so one loop can drive every lane; no Nagle delay on small requests."""
        plan = self.client.plan
        kind = socket.SOCK_STREAM if plan.target.stream else socket.SOCK_DGRAM
        sock = socket.socket(plan.family, kind)
        sock.setblocking(False)
        if plan.family != socket.AF_UNIX and plan.target.stream:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def open(self) -> None:
        """Start connecting; may finish at once (unix), later (tcp) or fail."""
        sock = self.make_socket()
        self.sock = sock
        code = sock.connect_ex(self.client.plan.address)
        if code == 0:
            self.client.selector.register(sock, selectors.EVENT_READ, self)
            self.send_request()
        elif code == errno.EINPROGRESS:
            self.state = Lane.CONNECTING
            self.client.selector.register(sock, selectors.EVENT_WRITE, self)
        elif code == errno.EAGAIN:  # unix listener backlog full: try again shortly
            self.close()
            self.wait_retry()
        else:
            self.close()
            self.client.fail(self, classify_errno(code), describe(OSError(code, os.strerror(code))))

    def wait_retry(self, delay: float = 0.002) -> None:
        """EAGAIN (a full unix backlog or datagram queue): try again shortly, same deadline."""
        self.state = Lane.RETRY
        self.retry_at = time.monotonic() + delay
        self.client.push_timer(self.retry_at, RETRY, self)

    def close(self) -> None:
        """Drop the connection (after an error, per request, or at the end)."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        try:
            self.client.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # -- request
    def begin(self, intended: float, now: float) -> None:
        """Start one request whose latency counts from ``intended``; connect first if need be."""
        self.intended = intended
        self.deadline = now + self.client.timeout
        self.buf = b""
        self.got = 0
        try:
            if self.sock is None:
                self.open()
            else:
                self.send_request()
        except OSError as err:
            self.close()
            self.client.fail(self, classify_errno(err.errno), describe(err))

    def request_bytes(self) -> bytes:
        """What to send for the next request (protocol-specific)."""
        raise NotImplementedError

    def send_request(self) -> None:
        """Send at once when the socket takes it all (the usual case); else finish on writable."""
        data = self.request_bytes()
        assert self.sock is not None
        sent = self.sock.send(data)
        if sent < len(data):
            self.out = memoryview(data)[sent:]  # slices without copying the rest
            self.state = Lane.SENDING
            self.client.selector.modify(
                self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self
            )
        else:
            self.state = Lane.WAITING

    def on_event(self, mask: int) -> None:
        """The selector's call: finish a connect, send the rest, or read the reply."""
        if self.state == Lane.IDLE:
            # EOF (a kept-alive connection the server closed) or unsolicited bytes between
            # requests: drop the connection quietly; the next request opens a new one.
            self.close()
            return
        try:
            if self.state == Lane.CONNECTING:
                self.connected()
            elif self.state == Lane.SENDING and mask & selectors.EVENT_WRITE:
                self.send_more()
            if self.state in (Lane.WAITING, Lane.SENDING) and mask & selectors.EVENT_READ:
                self.on_readable()
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            self.close()
            self.client.fail(self, classify_errno(err.errno), describe(err))

    def connected(self) -> None:
        """A non-blocking connect finished: its outcome is in SO_ERROR."""
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        self.client.selector.modify(self.sock, selectors.EVENT_READ, self)
        self.send_request()

    def send_more(self) -> None:
        """The rest of a large request, as the socket drains."""
        assert self.sock is not None
        sent = self.sock.send(self.out)
        self.out = self.out[sent:]
        if not self.out:
            self.state = Lane.WAITING
            self.client.selector.modify(self.sock, selectors.EVENT_READ, self)

    def on_readable(self) -> None:
        """Read what arrived; decide whether the reply is complete and right."""
        raise NotImplementedError

    def reply_done(self, keep_open: bool) -> None:
        """A complete, correct reply."""
        if not keep_open:
            self.close()
        self.client.succeed(self)

    def wrong(self, why: str) -> None:
        """A complete reply that is not the right one: the stream is out of step, reconnect."""
        self.close()
        self.client.fail(self, "wrong reply", why)


class StreamEchoLane(Lane):
    """Send the payload, read exactly as many bytes back, compare."""

    __slots__ = ()

    def request_bytes(self) -> bytes:
        """A fresh payload, kept to compare the echo against."""
        self.expected = data = self.client.next_payload()
        return data

    def on_readable(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(262144)
        if not data:
            self.close()
            self.client.fail(self, "reset", "unexpected EOF: the server closed the connection")
            return
        expected = self.expected
        start = self.got
        end = start + len(data)
        # Compare each chunk as it comes (no growing buffer): large payloads stay linear.
        if start == 0 and data == expected:
            self.reply_done(self.client.persistent)
        elif end > len(expected) or memoryview(expected)[start:end] != data:
            self.wrong(_diff(expected, data, start))
        elif end == len(expected):
            self.reply_done(self.client.persistent)
        else:
            self.got = end


def _diff(expected: bytes, got: bytes, offset: int = 0) -> str:
    """Where an echo reply (``got``, from byte ``offset`` on) parts from what was sent: for the
    error examples."""
    if offset + len(got) > len(expected):
        return f"{offset + len(got)} bytes back for {len(expected)} sent"
    part = expected[offset : offset + len(got)]
    at = next((i for i, (a, b) in enumerate(zip(part, got, strict=False)) if a != b), 0)
    return f"byte {offset + at} differs: sent {part[at : at + 8]!r}, got {got[at : at + 8]!r}"


class HttpLane(Lane):
    """Send a GET, parse the response, require a 2xx; honour the server's keep-alive."""

    __slots__ = ()

    def request_bytes(self) -> bytes:
        """The same GET every time (built once per client)."""
        return self.client.http_request

    def on_readable(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(262144)
        buf = self.buf + data if self.buf else data
        try:
            parsed = parse_http_response(buf)
            if parsed is None and not data:
                parsed = parse_http_response(buf, eof=True)  # a body that runs to the close
        except ValueError as err:
            if data:
                self.wrong(f"unparseable response: {err}")
            else:
                self.close()
                self.client.fail(self, "reset", f"unexpected EOF: {err}")
            return
        if parsed is None:
            self.buf = buf
            return
        response, used = parsed
        self.buf = b""
        if used != len(buf):
            self.wrong(f"{len(buf) - used} bytes after the response")
        elif not 200 <= response.status < 300:
            self.wrong(f"HTTP status {response.status}")
        else:
            self.reply_done(self.client.persistent and response.keep_alive and bool(data))


class DatagramLane(Lane):
    """One datagram out, the reply datagram must be identical. A connected socket, so that
    ICMP port-unreachable (udp) or a missing path (unix-dgram) reports as ``refused``."""

    __slots__ = ("bound_path",)

    def __init__(self, client: Client, index: int) -> None:
        super().__init__(client, index)
        self.bound_path: str | None = None

    def make_socket(self) -> socket.socket:
        """unix-dgram: bind a path in the client's temp dir, or the server cannot reply."""
        sock = super().make_socket()
        if self.client.plan.target.kind == "unix-dgram":
            # The server replies to our address: an unbound unix datagram socket has none.
            self.generation += 1
            path = os.path.join(self.client.tempdir(), f"{self.index}-{self.generation}")
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                raise
            self.bound_path = path
        return sock

    def close(self) -> None:
        """Also remove the bound path, so no socket files are left behind."""
        super().close()
        if self.bound_path is not None:
            try:
                os.unlink(self.bound_path)
            except FileNotFoundError:
                pass
            self.bound_path = None

    def open(self) -> None:
        """Connect (datagram: just fixes the peer) and send at once."""
        sock = self.make_socket()
        self.sock = sock
        sock.connect(self.client.plan.address)  # immediate for datagrams; raises on ENOENT
        self.client.selector.register(sock, selectors.EVENT_READ, self)
        self.send_request()

    def request_bytes(self) -> bytes:
        """A fresh payload, kept to compare the reply datagram against."""
        self.expected = data = self.client.next_payload()
        return data

    def send_request(self) -> None:
        """One datagram; a full server queue is retried, not counted as an error."""
        assert self.sock is not None
        try:
            self.sock.send(self.request_bytes())
        except BlockingIOError:  # the server's queue is full
            self.wait_retry(0.001)
            return
        self.state = Lane.WAITING

    def on_readable(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if data != self.expected:
            self.wrong(_diff(self.expected, data))
        else:
            self.reply_done(True)


LANE_CLASSES: dict[str, type[Lane]] = {
    "tcp": StreamEchoLane,
    "unix": StreamEchoLane,
    "http": HttpLane,
    "udp": DatagramLane,
    "unix-dgram": DatagramLane,
}

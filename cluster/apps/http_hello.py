"""``http-hello``: a minimal HTTP/1.1 responder that honours keep-alive and pipelining.

It answers every request with ``Hello, world!``. It reads raw bytes rather than going through
``http.server`` because it is the benchmark's handler: what it measures is the cluster's own cost
between ``accept()`` and the handler, not a request parser's.

Between requests it tells the connection so (``between_requests``, under the cluster), which
bounds the wait by ``--keep-alive`` and lets a graceful stop close it at once. Run elsewhere
(the stdlib's servers) it bounds the wait itself, with a kernel receive timeout.
"""

from __future__ import annotations

import socket
import struct

from workers import BaseRequestHandler

BODY = b"Hello, world!\n"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP_ALIVE_REPLY = _HEAD + b"\r\n" + BODY
CLOSE_REPLY = _HEAD + b"Connection: close\r\n\r\n" + BODY
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 65536
CHUNK = 65536
IDLE_TIMEOUT = 5  # seconds a kept-alive connection may sit idle, when no cluster bounds it
# A kernel receive timeout rather than ``settimeout``: the socket stays blocking, so each recv is
# one system call instead of a poll plus a recv.
_IDLE_TIMEVAL = struct.pack("ll", IDLE_TIMEOUT, 0)


def wants_close(head: bytes) -> bool:
    """Whether the request ends its connection: HTTP/1.0 without keep-alive, or Connection: close."""
    first_line, _, headers = head.partition(b"\r\n")
    lowered = headers.lower()
    if b"connection:" in lowered:
        for line in lowered.split(b"\r\n"):
            if line.startswith(b"connection:"):
                value = line[len(b"connection:") :]
                if b"close" in value:
                    return True
                if b"keep-alive" in value:
                    return False
    return not first_line.endswith(b"HTTP/1.1")


def body_length(head: bytes) -> int:
    """Content-Length of the request (bodies are read and ignored), 0 when absent.

    Raises ValueError for a value that is not a whole number of 0 or more."""
    lowered = head.lower()
    at = lowered.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = lowered.find(b"\r\n", at + 2)
    value = lowered[at + len(b"\r\ncontent-length:") : end if end >= 0 else None].strip()
    if not value.isdigit():
        raise ValueError(f"bad Content-Length {value!r}")
    return int(value)


def closing(sock: socket.socket) -> bool:
    """Whether the cluster is stopping this worker (a reply then closes its connection)."""
    return getattr(sock, "closing", False)


class HelloHandler(BaseRequestHandler):
    """Serve requests on one connection until the client closes, asks to close, or idles."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        between = getattr(sock, "between_requests", None)
        if between is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _IDLE_TIMEVAL)
        recv, sendall = sock.recv, sock.sendall
        buffer = b""
        try:
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        sendall(BAD_REQUEST)
                        return
                    chunk = recv(CHUNK)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                head, buffer = buffer[:end], buffer[end + 4 :]
                try:
                    skip = body_length(head)
                except ValueError:
                    sendall(BAD_REQUEST)
                    return
                while skip > len(buffer):  # discard the body as it comes, never holding it
                    skip -= len(buffer)
                    buffer = recv(min(CHUNK, skip))
                    if not buffer:
                        return
                buffer = buffer[skip:]
                if wants_close(head) or closing(sock):
                    sendall(CLOSE_REPLY)  # a stop began (under the cluster): the last reply
                    return
                sendall(KEEP_ALIVE_REPLY)
                if between is not None and not buffer:
                    between()  # nothing pipelined: the next read waits for a new request
        except (BlockingIOError, TimeoutError, ConnectionError):
            return  # idle past IDLE_TIMEOUT (EAGAIN from SO_RCVTIMEO), or the client went away

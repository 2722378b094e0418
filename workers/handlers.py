"""Request handlers: one instance per request, whose constructor does all the work.

``BaseRequestHandler`` runs ``setup()``, ``handle()`` and, whatever happens in ``handle()``,
``finish()``. The stream and datagram variants give ``handle()`` the same two file objects,
``rfile`` to read the request and ``wfile`` to write the reply, so one service can be written
once and served over either kind of socket.
"""

from __future__ import annotations

import socket
from io import BufferedIOBase, BytesIO
from typing import Any

__all__ = ["BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler"]


class BaseRequestHandler:
    """Handle one request; subclasses define ``handle()``.

    ``self.request``, ``self.client_address`` and ``self.server`` are set before ``setup()``;
    a new instance per request means ``handle()`` may keep any state it likes on ``self``.
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        """Prepare for ``handle()``. Nothing here."""

    def handle(self) -> None:
        """Serve the request. Nothing here: override it."""

    def finish(self) -> None:
        """Clean up after ``handle()``, even when it raised. Nothing here."""


class _SocketWriter(BufferedIOBase):
    """An unbuffered binary writer on a socket: every ``write()`` is one ``sendall()``.

    Nothing is ever held back, so a reply needs no ``flush()`` before the handler reads the
    next request; ``socket.makefile('wb', 0)`` cannot give this, as a raw ``write`` may send
    only part of the data.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class StreamRequestHandler(BaseRequestHandler):
    """Give ``handle()`` ``rfile`` and ``wfile`` on a connected stream socket.

    Class attributes: ``rbufsize`` (-1: buffered reads, since a read per byte would be
    slow), ``wbufsize`` (0: every write is sent at once, so replies go out before the next
    read), ``timeout`` (applied to the connection when not None) and
    ``disable_nagle_algorithm`` (sets TCP_NODELAY; useful only with buffered writes).
    """

    rbufsize: int = -1
    wbufsize: int = 0
    timeout: float | None = None
    disable_nagle_algorithm: bool = False

    def setup(self) -> None:
        self.connection = connection = self.request
        if self.timeout is not None:
            connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile = _SocketWriter(connection)
        else:
            self.wfile = connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        """Send what is still buffered, then close both files (not the socket)."""
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                # The client may be gone (ECONNRESET, EPIPE, ECONNABORTED): nobody to tell.
                pass
        self.wfile.close()
        self.rfile.close()


class DatagramRequestHandler(BaseRequestHandler):
    """Give ``handle()`` ``rfile`` over the received datagram and ``wfile`` for the reply.

    ``finish()`` sends whatever was written to ``wfile`` back to the client as one datagram,
    an empty one if nothing was written.
    """

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = BytesIO(self.packet)
        self.wfile = BytesIO()

    def finish(self) -> None:
        self.socket.sendto(self.wfile.getvalue(), self.client_address)

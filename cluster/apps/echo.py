"""The default app: echo every byte back, on stream and datagram listeners alike."""

from __future__ import annotations

from workers import BaseRequestHandler

CHUNK = 65536
MAX_DATAGRAM = 65535  # read whole datagrams: the largest UDP payload is 65,507 bytes


class EchoHandler(BaseRequestHandler):
    """One class for every transport: ``request`` is a socket on stream listeners and a
    ``(data, socket)`` pair on datagram ones, as in the socketserver design.

    A stream echo has no request framing, so it never says it is between requests: a
    graceful stop waits for its client to close (cutting it could lose bytes the client
    already sent; HTTP clients retry on a closed idle connection, echo clients do not). A
    client that resets ends only its own connection, with no traceback; so does a datagram
    client with nowhere to answer (a unix-dgram sender without a name, or gone already)."""

    max_packet_size = MAX_DATAGRAM  # read by the worker's datagram server

    def handle(self) -> None:
        request = self.request
        if isinstance(request, tuple):
            data, sock = request
            if not self.client_address:  # a unix-dgram sender with no name: nowhere to answer
                return
            try:
                sock.sendto(data, self.client_address)
            except (ConnectionError, FileNotFoundError):
                pass  # a unix-dgram sender gone already (its socket closed, or its name)
            return
        recv, sendall = request.recv, request.sendall
        try:
            while data := recv(CHUNK):
                sendall(data)
        except ConnectionError:
            pass  # reset or broken pipe: that client is gone, nothing to say about it

"""The default app: echo every byte back, on stream and datagram listeners alike."""

from __future__ import annotations

from workers import BaseRequestHandler

CHUNK = 65536


class EchoHandler(BaseRequestHandler):
    """One class for every transport: ``request`` is a socket on stream listeners and a
    ``(data, socket)`` pair on datagram ones, as in the socketserver design."""

    def handle(self) -> None:
        request = self.request
        if isinstance(request, tuple):
            data, sock = request
            sock.sendto(data, self.client_address)
            return
        recv, sendall = request.recv, request.sendall
        while data := recv(CHUNK):
            sendall(data)

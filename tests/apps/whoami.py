"""A handler that says who its client is: for the access-control and PROXY protocol tests.

On a stream it reads one line and answers ``HOST PORT LINE``; a datagram is answered the
same way, as one datagram sent to ``client_address`` (which, behind a PROXY header, must
reach the proxy). The line proves the handler's ``rfile`` starts right after the header."""

from __future__ import annotations

from workers import BaseRequestHandler


def describe(client_address: object, line: bytes) -> bytes:
    if isinstance(client_address, tuple):
        host, port = client_address[0], client_address[1]
    else:
        host, port = repr(client_address), "-"
    return f"{host} {port} ".encode() + line.rstrip(b"\r\n") + b"\n"


class Whoami(BaseRequestHandler):
    def handle(self) -> None:
        if isinstance(self.request, tuple):
            data, sock = self.request
            sock.sendto(describe(self.client_address, data), self.client_address)
            return
        with self.request.makefile("rb") as rfile:
            line = rfile.readline()
        self.request.sendall(describe(self.client_address, line))

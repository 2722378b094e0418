"""``peer:Peer``: answers each connection's first line with the client address the handler
sees, ``HOST PORT``. Behind a proxy that sends a PROXY header, that must be the real client's
address, not the proxy's: the multi-host scenario (``scripts/multihost.py``) checks it."""

from __future__ import annotations

from workers import StreamRequestHandler


class Peer(StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        host, port = self.client_address[0], self.client_address[1]
        self.wfile.write(f"{host} {port}\n".encode())

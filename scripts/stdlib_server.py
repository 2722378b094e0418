"""A peer for the benchmarks: the standard library's socketserver serving our handler.

    python scripts/stdlib_server.py threading|forking|udp [APP]

Binds 127.0.0.1 port 0, prints ``listening on tcp://127.0.0.1:PORT`` (the same line the cluster
logs) and serves until TERM. The handler is the very class the cluster serves for APP.
"""

from __future__ import annotations

import signal
import socketserver
import sys
import threading

from cluster.app import load_handler

SERVERS = {
    "threading": socketserver.ThreadingTCPServer,
    "forking": socketserver.ForkingTCPServer,
    "udp": socketserver.UDPServer,
}


def main() -> None:
    kind, app = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "http-hello"
    server_class = SERVERS[kind]
    server_class.allow_reuse_address = True
    server_class.daemon_threads = True
    handler = load_handler(app)
    with server_class(("127.0.0.1", 0), handler) as server:
        host, port = server.server_address
        scheme = "udp" if kind == "udp" else "tcp"
        print(f"listening on {scheme}://{host}:{port}", file=sys.stderr, flush=True)
        stop = threading.Thread(target=server.shutdown)
        signal.signal(signal.SIGTERM, lambda *_: stop.start())
        server.serve_forever()


if __name__ == "__main__":
    main()

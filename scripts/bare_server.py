"""A reference for the benchmarks: the least any Python prefork server can do for a handler.

    python scripts/bare_server.py prefork|fork tcp|udp [APP] [--carry MODULE,MODULE...]

No framework at all: the parent binds 127.0.0.1 port 0, prints ``listening on
SCHEME://127.0.0.1:PORT`` and forks two children that serve, as the cluster's two workers do,
while it only waits. ``prefork``: each child blocks in ``accept()`` (or ``recvfrom()``) and
calls the handler class directly. ``fork``: each accepts and forks a grandchild per
connection, which runs the handler and ``_exit``s; it reaps without blocking before each fork.

It loads the very handler class the cluster serves for APP, so it carries the same imports
(and pays for them in every fork). Whatever this loop reaches is a ceiling for any server
running that handler on this machine: scripts/bench.py shows it beside the real servers. It
has no bounds, logging or graceful stop, so it is not a server to use: a handler's error just
drops that one connection, and TERM to the parent ends the whole process group at once.

``--carry`` imports those modules too, before the fork, and uses none of them: the same loop
then pays for their memory in every fork, which tells how much of a server's cost is the
size of the process it forks from (``docs/benchmarks-notes.md``, "The floor of fork mode").
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys

from cluster.app import load_handler


def serve_prefork_stream(listener: socket.socket, handler: type) -> None:
    while True:
        conn, address = listener.accept()
        try:
            handler(conn, address, None)
        except OSError:
            pass  # that client reset or timed out: drop it, serve the next
        finally:
            conn.close()


def serve_fork_stream(listener: socket.socket, handler: type) -> None:
    while True:
        conn, address = listener.accept()
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        if os.fork() == 0:
            try:
                handler(conn, address, None)
            except OSError:
                pass
            finally:
                os._exit(0)
        conn.close()


def serve_datagrams(listener: socket.socket, handler: type) -> None:
    while True:
        data, address = listener.recvfrom(65536)
        try:
            handler((data, listener), address, None)
        except OSError:
            pass


def main() -> None:
    args = sys.argv[1:]
    carried: list[str] = []
    if "--carry" in args:
        at = args.index("--carry")
        carried = args[at + 1].split(",")
        del args[at : at + 2]
    usable = len(args) in (2, 3) and args[0] in ("prefork", "fork") and args[1] in ("tcp", "udp")
    if not usable:
        raise SystemExit("usage: bare_server.py prefork|fork tcp|udp [APP] [--carry M,M...]")
    mode, transport = args[0], args[1]
    if (mode, transport) == ("fork", "udp"):
        raise SystemExit("bare_server: fork mode serves tcp only")
    app = args[2] if len(args) > 2 else ("echo" if transport == "udp" else "http-hello")
    handler = load_handler(app)
    for module in carried:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise SystemExit(f"bare_server: cannot carry {module}: {err}") from None
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    listener = socket.socket(socket.AF_INET, kind)
    listener.bind(("127.0.0.1", 0))
    if transport == "tcp":
        listener.listen(1024)
    serve = {
        ("prefork", "tcp"): serve_prefork_stream,
        ("fork", "tcp"): serve_fork_stream,
        ("prefork", "udp"): serve_datagrams,
    }[mode, transport]
    os.setpgid(0, 0)  # our own group: killing it ends our processes, and nothing else
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    for _ in range(2):
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            serve(listener, handler)
    print(f"listening on {transport}://127.0.0.1:{listener.getsockname()[1]}", file=sys.stderr,
          flush=True)  # fmt: skip
    while True:
        signal.pause()  # the parent only waits for TERM


if __name__ == "__main__":
    main()

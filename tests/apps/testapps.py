"""Handlers the integration tests serve. Each makes one behaviour observable from a client."""

from __future__ import annotations

import http.server
import os
import socketserver
import threading
import time

from workers import BaseRequestHandler, StreamRequestHandler


class Gate(StreamRequestHandler):
    """Says ``started PID``, waits for the client's ``finish`` line, then says ``done PID``.

    A slow request whose length the test controls exactly: no sleeps on either side.
    """

    speaks_first = True  # it writes before it reads: no waiting room

    def handle(self) -> None:
        self.wfile.write(b"started %d\n" % os.getpid())
        line = self.rfile.readline()
        if line.strip() == b"finish":
            self.wfile.write(b"done %d\n" % os.getpid())


class Boom(StreamRequestHandler):
    """Raises on ``boom``, echoes the line otherwise."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if line.strip() == b"boom":
            raise RuntimeError("boom requested by the client")
        self.wfile.write(line)


class Pid(BaseRequestHandler):
    """Replies with the pid of the process that served the request (stream or datagram)."""

    speaks_first = True  # it writes before it reads: no waiting room

    def handle(self) -> None:
        reply = b"%d\n" % os.getpid()
        if isinstance(self.request, tuple):
            self.request[1].sendto(reply, self.client_address)
        else:
            self.request.sendall(reply)


class ThreadName(BaseRequestHandler):
    """Replies with the name of the thread that served the request (thread mode: its lane)."""

    speaks_first = True  # it writes before it reads: no waiting room

    def handle(self) -> None:
        self.request.sendall(threading.current_thread().name.encode() + b"\n")


class StdlibUpper(socketserver.StreamRequestHandler):
    """Written against the stdlib's socketserver, never against ours."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


class StdlibHTTP(http.server.BaseHTTPRequestHandler):
    """A plain http.server handler."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"path={self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Exit(StreamRequestHandler):
    """Calls ``sys.exit()`` on ``exit``, echoes the line otherwise."""

    def handle(self) -> None:
        import sys

        line = self.rfile.readline()
        if line.strip() == b"exit":
            sys.exit(7)
        self.wfile.write(line)


def hang_forever() -> None:
    """Blocks for good: what a hung request looks like (its name shows in the stack dump)."""
    import threading

    threading.Event().wait()


def spin_forever() -> None:
    """Busy for good, with no system call at all: a handler stuck in a loop."""
    while True:
        pass


class Hang(StreamRequestHandler):
    """Hangs on ``hang`` (blocked on a lock), spins on ``spin``, echoes the line otherwise."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if line.strip() == b"hang":
            hang_forever()
        if line.strip() == b"spin":
            spin_forever()
        self.wfile.write(line)


class Crash(BaseRequestHandler):
    """Takes its whole process down with every request (``os._exit(1)``)."""

    def handle(self) -> None:
        os._exit(1)


class LineEcho(StreamRequestHandler):
    """Echoes line by line until the client closes: a persistent connection."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Sequence(StreamRequestHandler):
    """Reads one line, then replies with how many requests this process served before it."""

    served = 0

    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(b"%d\n" % Sequence.served)
        Sequence.served += 1


class Slow(StreamRequestHandler):
    """Reads a line with a number of seconds, works that long, then says ``done PID``: a
    request of a known length, to keep many lanes of a worker busy at once."""

    def handle(self) -> None:
        seconds = float(self.rfile.readline() or 0)
        time.sleep(seconds)
        self.wfile.write(b"done %d\n" % os.getpid())


class Overlap(StreamRequestHandler):
    """Reads a line with a number of seconds, waits that long (as on a database), then says
    how many requests of this process ran at once at most so far: thread mode's concurrency,
    seen from inside."""

    running = 0
    most = 0
    lock = threading.Lock()

    def handle(self) -> None:
        seconds = float(self.rfile.readline() or 0)
        with Overlap.lock:
            Overlap.running += 1
            Overlap.most = max(Overlap.most, Overlap.running)
        time.sleep(seconds)
        with Overlap.lock:
            Overlap.running -= 1
        self.wfile.write(b"%d\n" % Overlap.most)


class ShutdownOnRequest(BaseRequestHandler):
    """Replies, then calls ``self.server.shutdown()``, as a stdlib handler that ends its server."""

    speaks_first = True  # it writes before it reads: no waiting room

    def handle(self) -> None:
        self.request.sendall(b"stopping\n")
        self.server.shutdown()

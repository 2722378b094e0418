"""What a mode needs at run time besides its servers, and the server objects themselves."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from workers.runtime import ratelog
from workers.runtime.client import ListeningSocket, close_idle, format_client
from workers.runtime.lifecycle import Lifecycle
from workers.runtime.ratelog import RateLimitedLog
from workers.runtime.scoreboard import DRAINING, ERRORS, IDLE, WorkerSlot
from workers.runtime.spec import Endpoint, WorkerSpec
from workers.servers import BaseServer, TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer

log = logging.getLogger("cluster.worker")

LARGEST_DATAGRAM = 65535  # UDP carries 65,507 bytes at most; the stdlib's 8192 would cut them
CLIENT_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# A client that resets is not a server error: a line, within a budget, instead of a traceback.
GONE = RateLimitedLog(logging.getLogger("cluster.worker"), ratelog.GONE)

SERVER_CLASSES: dict[str, type[BaseServer]] = {
    "tcp": TCPServer,
    "udp": UDPServer,
    "unix": UnixStreamServer,
    "unix-dgram": UnixDatagramServer,
}


class Context:
    """The spec, the signal flags, our scoreboard slot, and the request count that
    ``--max-requests`` recycles on."""

    def __init__(self, spec: WorkerSpec, lifecycle: Lifecycle, slot: WorkerSlot) -> None:
        self.pid = os.getpid()  # the worker's, also in its fork-mode children
        self.spec = spec
        self.lifecycle = lifecycle
        self.slot = slot
        self.served = 0
        self.limit = spec.max_requests
        self.recycled = False  # we hit --max-requests: the master is forking our replacement
        self.said_held = False  # we logged that the master holds our recycling back
        self.exit_code = 0  # EXIT_CUT: a graceful stop had to cut requests short

    def tell(self, message: bytes) -> None:
        notify(self.spec.notify_fd, message, self.pid)

    def ask_master_to_stop(self) -> None:
        """What ``server.shutdown()`` means in a worker: the master stops gracefully (this
        request included). It returns at once: waiting would wait for ourselves."""
        self.tell(b"stop")

    def ready(self) -> None:
        """We can take requests: the master counts us as serving from now on."""
        self.slot.set_state(IDLE)
        self.tell(b"ready")

    def counted(self) -> None:
        """One more request taken; at the limit, take no more and let the master replace us,
        unless it holds recycling back (``recycling_held``): then at the first request after."""
        self.served += 1
        if self.served >= self.limit > 0 and not self.recycled and not self.recycling_held():
            self.lifecycle.running = False
            self.recycled = True
            self.tell(b"recycle %d" % self.served)
            close_idle()

    def recycling_held(self) -> bool:
        """Whether the master holds our recycling back: the workers it forked to replace
        others of our generation fail to boot (new code on disk that does not import, say),
        so a worker that left now would leave a place nobody can take, and one after another
        the pool would empty. We serve on past ``--max-requests``, and say so once."""
        if not self.slot.header.hold_recycling:
            return False
        if not self.said_held:
            self.said_held = True
            log.warning("worker %d: recycling held at %d requests (--max-requests): a new "
                        "worker cannot boot with the app on disk; serving on", os.getpid(),
                        self.served)  # fmt: skip
        return True

    def draining(self) -> bool:
        """We stopped taking new requests; whether to serve what is already queued first.

        On a stop, yes: the listeners may close after us. A worker recycling itself leaves
        them to the other workers and its replacement, so that its count stays exact.
        """
        self.slot.set_state(DRAINING)
        return not self.recycled


def notify(fd: int, message: bytes, pid: int) -> None:
    """One line to the master: ``PID MESSAGE``; shorter than PIPE_BUF, so the write is atomic."""
    try:
        os.write(fd, b"%d %s\n" % (pid, message))
    except OSError:
        pass  # the master is gone; the parent check ends us soon


class CurrentLane(threading.local):
    """Which scoreboard lane this thread's request runs in: 0 in sync mode, the thread's own
    in thread mode, the request's in fork mode (set by the worker before it forks). And, on
    a listener with access rules, the client its handler sees (the original one a PROXY
    header named), for the access log."""

    lane = 0
    client: object = None


CURRENT = CurrentLane()


def make_server(
    endpoint: Endpoint, handler: type, context: Context, listener: int,
    mixin: type | None = None,
) -> BaseServer:  # fmt: skip
    """A socketserver-style server object wrapped around an already bound, shared socket:
    the worker's ``listener``-th.

    Handlers receive it as ``self.server``, exactly as under the stdlib, so code that reads
    ``server.server_address`` (or ``server_name``, as http.server does) keeps working, and
    ``self.server.shutdown()`` asks the master for a graceful stop. Its ``handle_error``
    (the stdlib's, or the library user's override) also counts the error on the scoreboard.
    """
    server = _server(endpoint, handler, mixin)
    if endpoint.proxy or endpoint.allow:
        from workers.runtime.gate import Gate

        server.gate = Gate(endpoint.uri, endpoint.proxy, endpoint.allow, endpoint.proxy_allow,
                           context.slot, listener)  # fmt: skip
    server.listener_index = listener
    server.listener_uri = endpoint.uri
    server.shutdown = context.ask_master_to_stop  # type: ignore[method-assign]
    report = server.handle_error
    stock = getattr(report, "__func__", None) is BaseServer.handle_error
    slot = context.slot

    def handle_error(request: object, client_address: object) -> None:
        if stock and client_went_away(request):
            GONE.warning("client %s went away in the middle of its request: %s",
                         format_client(client_address), sys.exc_info()[1])  # fmt: skip
            return
        slot.doubles[slot.stats_index(CURRENT.lane, listener) + ERRORS] += 1.0
        report(request, client_address)

    server.handle_error = handle_error  # type: ignore[method-assign]
    return server


def client_went_away(request: object) -> bool:
    """Whether the exception being handled is the client's doing: a reset or broken pipe on
    a connection that is gone. (The same errors from a connection the handler made to
    somebody else are the server's problem, and keep their traceback.)"""
    if not isinstance(sys.exc_info()[1], CLIENT_GONE) or not isinstance(request, socket.socket):
        return False
    try:
        request.getpeername()
    except OSError:
        return True
    return False


def _server(endpoint: Endpoint, handler: type, mixin: type | None) -> BaseServer:
    if endpoint.proxy or endpoint.allow:  # access rules: verify_request, the PROXY header
        from workers.runtime.gate import GateMixIn

        mixin = type(f"{mixin.__name__}Gate" if mixin else "Gate",
                     (mixin, GateMixIn) if mixin else (GateMixIn,), {})  # fmt: skip
    if endpoint.kind in ("tcp", "unix"):
        # Our copy of the shared listener: accept() now gives connections that mark their
        # reads in the scoreboard (workers.runtime.client). The master's copy is untouched.
        endpoint.sock.__class__ = ListeningSocket
    if endpoint.server is not None:
        # The library API: the user's own server object (a PreforkTCPServer subclass, say),
        # forked along with us, so that its overrides and attributes reach the handlers.
        server = endpoint.server
        if mixin is not None:
            server.__class__ = type(
                f"{mixin.__name__}{type(server).__name__}", (mixin, type(server)), {}
            )
        return server
    server_class = SERVER_CLASSES[endpoint.kind]
    if mixin is not None:
        server_class = type(f"{mixin.__name__}{server_class.__name__}", (mixin, server_class), {})
    server = server_class(endpoint.sock.getsockname(), handler, bind_and_activate=False)
    server.socket.close()  # the placeholder the constructor made; we serve the shared one
    server.socket = endpoint.sock
    server.server_address = endpoint.sock.getsockname()
    if hasattr(server, "max_packet_size"):  # datagrams: whole ones, however large
        server.max_packet_size = max(server.max_packet_size, LARGEST_DATAGRAM,
                                     getattr(handler, "max_packet_size", 0))  # fmt: skip
    if endpoint.kind == "tcp":
        server.server_name, server.server_port = server.server_address[:2]
    return server

"""The synchronous servers: one request at a time, on the caller's thread.

``BaseServer`` owns the request loop and knows nothing about sockets. ``TCPServer`` adds the
socket's life cycle (create, bind, listen, accept, close). ``UDPServer`` and the two Unix
servers differ from it only in class attributes and the one step that must differ
(``get_request`` for datagrams), so every other behaviour is shared and overridden in one place.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

__all__ = ["BaseServer", "TCPServer", "UDPServer"]

log = logging.getLogger("workers")

# We only ever wait on one descriptor for a short while: poll() needs no descriptor of its own
# (unlike epoll) and has no FD_SETSIZE ceiling (unlike select).
if hasattr(selectors, "PollSelector"):
    _Selector: type[selectors.BaseSelector] = selectors.PollSelector
else:  # pragma: no cover - platforms without poll()
    _Selector = selectors.SelectSelector

HandlerFactory = Callable[[Any, Any, "BaseServer"], object]


class BaseServer:
    """The request loop, independent of where requests come from.

    Methods for the caller: ``__init__(server_address, RequestHandlerClass)``,
    ``serve_forever(poll_interval=0.5)``, ``shutdown()``, ``handle_request()`` and, from the
    subclass that owns a socket, ``fileno()`` (the loop waits on it with a selector).

    Steps meant to be overridden, one behaviour each: ``server_bind``, ``server_activate``,
    ``get_request``, ``handle_timeout``, ``verify_request``, ``process_request``,
    ``shutdown_request``, ``close_request``, ``service_actions``, ``handle_error``,
    ``server_close``. ``finish_request`` is the step subclasses call to run the handler.

    Class attributes a subclass or instance may override: ``timeout`` here, and the socket's
    ``address_family``, ``socket_type``, ``allow_reuse_address``, ``allow_reuse_port`` in
    ``TCPServer``. Instance attributes: ``server_address``, ``RequestHandlerClass``, ``socket``.
    """

    timeout: float | None = None

    def __init__(self, server_address: Any, RequestHandlerClass: HandlerFactory) -> None:
        """Remember where to listen and what to run. May be extended, do not override."""
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__is_shut_down = threading.Event()
        self.__shutdown_request = False

    def server_activate(self) -> None:
        """Start accepting requests; called by the constructor. Nothing to do here."""

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle requests until ``shutdown()`` is called from another thread.

        ``timeout`` is ignored; ``poll_interval`` bounds how long a shutdown request can go
        unnoticed. ``service_actions()`` runs after every wake-up, request or not.
        """
        self.__is_shut_down.clear()
        try:
            with _Selector() as selector:
                selector.register(self, selectors.EVENT_READ)
                while not self.__shutdown_request:
                    ready = selector.select(poll_interval)
                    # shutdown() may have come while we waited: stop before taking a request.
                    if self.__shutdown_request:
                        break
                    if ready:
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self.__shutdown_request = False
            self.__is_shut_down.set()

    def shutdown(self) -> None:
        """Ask ``serve_forever()`` to stop and wait until it has.

        Deadlocks if called from the thread running ``serve_forever()``.
        """
        self.__shutdown_request = True
        self.__is_shut_down.wait()

    def service_actions(self) -> None:
        """Periodic work for the ``serve_forever()`` loop (``ForkingMixIn`` reaps here)."""

    # Who does what, on the way from a readable socket to a finished request:
    # - handle_request(): waits (honouring timeout), then _handle_request_noblock();
    # - get_request(): the only step that differs between stream and datagram sockets;
    # - process_request(): where a mixin hands the request to a thread or a child process;
    # - finish_request(): builds RequestHandlerClass, whose constructor does all the work.

    def handle_request(self) -> None:
        """Wait for one request and handle it, or call ``handle_timeout()``.

        The wait is bounded by the smaller of ``self.timeout`` and the socket's own timeout
        (older code used ``socket.settimeout()`` to get out of this call).
        """
        timeout = self.socket.gettimeout()
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        deadline = None if timeout is None else monotonic() + timeout

        with _Selector() as selector:
            selector.register(self, selectors.EVENT_READ)
            # A loop, because select() may wake early (a signal) with nothing ready.
            while True:
                if selector.select(timeout):
                    return self._handle_request_noblock()
                if deadline is not None:
                    timeout = deadline - monotonic()
                    if timeout <= 0:
                        return self.handle_timeout()

    def _handle_request_noblock(self) -> None:
        """Take one request that should be ready and handle it, without waiting.

        Another process may have taken it first (a shared non-blocking listener): then
        ``get_request()`` fails with ``BlockingIOError`` and we return quietly.
        """
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        self._handle_accepted(request, client_address)

    def _handle_accepted(self, request: Any, client_address: Any) -> None:
        """Verify and process a request already taken by ``get_request()``.

        Split out for the cluster's worker loop, which calls ``get_request()`` on several
        listeners itself. Whatever happens, the request is shut down unless processing
        took ownership of it (a thread or a child process).
        """
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def handle_timeout(self) -> None:
        """Called when ``handle_request()`` waited ``timeout`` seconds for nothing."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return True to handle this request, False to drop it unanswered."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Handle the request right here, then release it.

        The mixins override this one step to move the work to a thread or a child process.
        """
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Release what the server holds. Nothing here."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the handler: its constructor handles the request entirely."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """End the conversation with the client, then release the request."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Release one request's resources. Nothing here."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Report an exception raised while handling a request, and carry on serving.

        Logged, not printed, so the cluster decides where it goes: to the ``"workers"``
        logger at ERROR with the traceback. When nothing configured logging, its last-resort
        handler still writes message and traceback to stderr, as the stdlib does.
        """
        log.error(
            "Exception occurred during processing of request from %r",
            client_address,
            exc_info=True,
        )

    def __enter__(self) -> BaseServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server_close()


class TCPServer(BaseServer):
    """A synchronous server on a stream socket; the base of every socket server here.

    Adds, to ``BaseServer``: ``__init__(server_address, RequestHandlerClass,
    bind_and_activate=True)`` (pass False to set socket options before calling
    ``server_bind()`` and ``server_activate()`` yourself), ``fileno()``, and the class
    attributes ``address_family``, ``socket_type``, ``request_queue_size`` (the listen
    backlog), ``allow_reuse_address`` and ``allow_reuse_port``.
    """

    address_family: int = socket.AF_INET
    socket_type: int = socket.SOCK_STREAM
    request_queue_size: int = 5
    allow_reuse_address: bool = False
    allow_reuse_port: bool = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: HandlerFactory,
        bind_and_activate: bool = True,
    ) -> None:
        """Create the socket and, by default, bind and listen. May be extended."""
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                # The constructor failed: nobody else holds the socket to close it.
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Set the reuse options, bind, and record the address actually bound (port 0)."""
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Start listening, with ``request_queue_size`` as the backlog."""
        self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    def fileno(self) -> int:
        """The listening socket's descriptor, for selectors."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Accept one connection: ``(connected socket, client address)``."""
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> None:
        """Shut down our sending side, then close.

        ``close()`` alone only drops this process's reference: a forked child or another
        holder of the descriptor would keep the connection open and the client waiting.
        """
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # e.g. ENOTCONN: the client is already gone.
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Close this process's descriptor for the connection."""
        request.close()


class UDPServer(TCPServer):
    """A synchronous server on a datagram socket; a request is ``(data, socket)``."""

    allow_reuse_address = False
    allow_reuse_port = False
    socket_type = socket.SOCK_DGRAM
    max_packet_size: int = 8192

    def get_request(self) -> tuple[Any, Any]:
        """Read one datagram; the reply goes out through the same (shared) socket."""
        data, client_address = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), client_address

    def server_activate(self) -> None:
        """Datagram sockets do not listen."""

    def shutdown_request(self, request: Any) -> None:
        """No connection to shut down: just release."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """The socket in the request is the server's own: keep it open."""


if hasattr(socket, "AF_UNIX"):
    __all__ += ["UnixStreamServer", "UnixDatagramServer"]

    class UnixStreamServer(TCPServer):
        """``TCPServer`` on a Unix stream socket; the address is a filesystem path."""

        address_family = socket.AF_UNIX

    class UnixDatagramServer(UDPServer):
        """``UDPServer`` on a Unix datagram socket; clients must bind to be answered."""

        address_family = socket.AF_UNIX

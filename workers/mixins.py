"""Concurrency as a mix-in: each mixin overrides ``process_request`` (plus its own cleanup).

Put the mixin first in the bases, ``class ThreadingUDPServer(ThreadingMixIn, UDPServer)``,
so its ``process_request`` wins over the synchronous one in the server class.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from typing import Any

from .servers import TCPServer, UDPServer, _Selector

__all__ = ["ThreadingMixIn", "ThreadingTCPServer", "ThreadingUDPServer"]


if hasattr(os, "fork"):
    __all__ += ["ForkingMixIn", "ForkingTCPServer", "ForkingUDPServer"]

    _pidfd_open = getattr(os, "pidfd_open", None)
    # Backoff bounds (seconds) when children must be polled for lack of pidfds.
    _POLL_MIN = 0.001
    _POLL_MAX = 0.05

    def _reap(children: set[int], flags: int) -> None:
        """Collect those of ``children`` that have exited (or all, if ``flags`` is 0).

        Always by pid: ``waitpid(-1)`` would also collect children that other code in this
        process forked (the worker loop, ``subprocess``) and lose their exit status.
        """
        for pid in tuple(children):
            try:
                done, _ = os.waitpid(pid, flags)
            except ChildProcessError:
                children.discard(pid)  # Someone else collected it; its status is theirs.
                continue
            if done:
                children.discard(pid)

    def _wait_for_any(children: set[int]) -> None:
        """Block until at least one of ``children`` has exited (it may stay unreaped).

        A pidfd per child lets one ``poll()`` wait on exactly our own children. Without
        pidfds (old kernel, not Linux, out of descriptors) we poll them by pid with a short
        backoff: blocking in ``waitpid()`` on any single one could outlast many others.
        """
        if _pidfd_open is not None:
            pidfds: list[int] = []
            try:
                for pid in tuple(children):
                    try:
                        pidfds.append(_pidfd_open(pid))
                    except ProcessLookupError:
                        children.discard(pid)  # Collected elsewhere: a slot is free already.
                        return
                with _Selector() as selector:
                    for pidfd in pidfds:
                        selector.register(pidfd, selectors.EVENT_READ)
                    selector.select()
                return
            except OSError:
                pass  # No pidfds after all: poll below.
            finally:
                for pidfd in pidfds:
                    os.close(pidfd)
        count = len(children)
        delay = _POLL_MIN
        _reap(children, os.WNOHANG)
        while len(children) == count:
            time.sleep(delay)
            delay = min(2 * delay, _POLL_MAX)
            _reap(children, os.WNOHANG)

    class ForkingMixIn:
        """Handle each request in a new child process.

        ``active_children`` is the set of our children not yet collected (None until the
        first fork). At ``max_children`` we block until one of them exits, before forking
        again. ``server_close()`` waits for all of them when ``block_on_close`` is true.
        """

        # handle_request() wakes at least this often, so that zombies get collected.
        timeout: float | None = 300
        active_children: set[int] | None = None
        max_children: int = 40
        block_on_close: bool = True

        def collect_children(self, *, blocking: bool = False) -> None:
            """Collect our exited children; with ``blocking``, wait for all of them.

            First, while at ``max_children``, wait for a slot: that is what bounds the
            number of processes a burst of requests can create.
            """
            children = self.active_children
            if children is None:
                return
            while children and len(children) >= self.max_children:
                _wait_for_any(children)
                _reap(children, os.WNOHANG)
            _reap(children, 0 if blocking else os.WNOHANG)

        def handle_timeout(self) -> None:
            """An idle ``handle_request()`` loop still collects zombies."""
            self.collect_children()

        def service_actions(self) -> None:
            """``serve_forever()`` collects zombies after every wake-up."""
            self.collect_children()

        def fork_child(self) -> int:
            """The fork for one request, ``os.fork()``: the cluster's workers use a cheaper
            one (``workers.runtime.quickfork``)."""
            return os.fork()

        def process_request(self, request: Any, client_address: Any) -> None:
            """Fork; the child handles the request and exits, the parent drops its copy.

            The bound on children is enforced here too, not only in ``service_actions()``,
            so that loops calling ``handle_request()`` or ``_handle_request_noblock()``
            directly cannot exceed ``max_children``.
            """
            if self.active_children is None:
                self.active_children = set()
            elif len(self.active_children) >= self.max_children:
                self.collect_children()
            pid = self.fork_child()
            if pid:
                self.active_children.add(pid)
                # The child has its own descriptor; ours would keep the connection open.
                self.close_request(request)
                return
            self.serve_in_child(request, client_address)

        def serve_in_child(self, request: Any, client_address: Any) -> None:
            """The child's part: handle the request, then leave, whatever happens, through
            os._exit(), so that we never return into the parent's loop nor run its atexit
            handlers or flush its inherited buffers."""
            status = 1
            try:
                self.finish_request(request, client_address)
                status = 0
            except Exception:
                self.handle_error(request, client_address)
            finally:
                try:
                    self.shutdown_request(request)
                finally:
                    os._exit(status)

        def server_close(self) -> None:
            """Close the socket, then collect children (waiting if ``block_on_close``)."""
            super().server_close()
            self.collect_children(blocking=self.block_on_close)


class _ThreadList:
    """The non-daemon request threads that ``server_close()`` must join.

    Finished threads are dropped each time a new one is added, as Python 3.11 does
    (bpo-37193): the list holds the live threads and the newest, never a history.
    """

    __slots__ = ("_threads",)

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def __len__(self) -> int:
        return len(self._threads)

    def append(self, thread: threading.Thread) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)

    def join(self) -> None:
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()


class _NoThreads:
    """Stands in for ``_ThreadList`` while nothing is tracked: joining is a no-op."""

    __slots__ = ()

    def join(self) -> None:
        pass


class ThreadingMixIn:
    """Handle each request in a new thread.

    ``daemon_threads``: request threads do not keep the process alive at exit.
    ``block_on_close``: ``server_close()`` joins the non-daemon request threads.
    """

    daemon_threads: bool = False
    block_on_close: bool = True
    # Replaced by a per-server _ThreadList on the first tracked thread.
    _threads: _ThreadList | _NoThreads = _NoThreads()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The thread's body: ``process_request`` of ``BaseServer``, plus error handling."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the request; remember it if ``server_close()`` must join it."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=self.daemon_threads,
        )
        thread.start()
        if self.block_on_close and not thread.daemon:
            threads = self._threads
            if not isinstance(threads, _ThreadList):
                threads = self._threads = _ThreadList()
            threads.append(thread)

    def server_close(self) -> None:
        """Close the socket, then join the request threads we track."""
        super().server_close()
        self._threads.join()


if hasattr(os, "fork"):

    class ForkingUDPServer(ForkingMixIn, UDPServer):
        """A UDP server that handles each datagram in a child process."""

    class ForkingTCPServer(ForkingMixIn, TCPServer):
        """A TCP server that handles each connection in a child process."""


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    """A UDP server that handles each datagram in a thread."""


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    """A TCP server that handles each connection in a thread."""


if hasattr(socket, "AF_UNIX"):
    from .servers import UnixDatagramServer, UnixStreamServer

    __all__ += ["ThreadingUnixStreamServer", "ThreadingUnixDatagramServer"]

    class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
        """A Unix stream server that handles each connection in a thread."""

    class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
        """A Unix datagram server that handles each datagram in a thread."""

    if hasattr(os, "fork"):
        __all__ += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]

        class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
            """A Unix stream server that handles each connection in a child process."""

        class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
            """A Unix datagram server that handles each datagram in a child process."""

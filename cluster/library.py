"""The library API: the whole cluster behind socketserver's own interface.

    from cluster import PreforkTCPServer

    with PreforkTCPServer(("127.0.0.1", 0), Handler, workers=4, worker_class="thread") as srv:
        srv.serve_forever()   # the master loop; srv.shutdown() from another thread drains it

The constructor binds like ``TCPServer`` (so ``server_address`` holds the real port at once);
``serve_forever`` runs the very ``Master`` that ``cluster run`` runs, with this object's socket
as its one listener. Workers are forked copies of this object, so a subclass's overrides
(``verify_request``, ``handle_error``) and attributes reach the handlers through ``self.server``
as they would under the stdlib.
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields
from typing import Any

from cluster import (
    __all__,  # noqa: F401  (the public names, listed once, in the package)
    commands,
)
from cluster.config import Config, build, read_toml
from cluster.errors import ConfigError
from cluster.listeners import Listener, format_uri, parse_bind, socket_kind
from cluster.master import Master
from workers.servers import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer

_OPTIONS = frozenset(f.name for f in fields(Config)) - {"app", "bind", "pidfile"}
_NOT_FROM_FILE = ("app", "bind", "pidfile")  # the library serves its own socket and handler


def _keyword(name: str) -> str:
    """How the library spells an option in its messages: as the keyword itself."""
    return name


class PreforkMixIn:
    """Turn a socketserver class into a prefork cluster: put it first among the bases.

    Keyword options are ``cluster run``'s long flags (``workers``, ``worker_class``,
    ``threads``, ``max_children``, ``graceful_timeout``, ``max_workers``, ``name``...); they
    may also be set as class attributes of a subclass. ``config="FILE.toml"`` reads the same
    keys from a file, under the keyword options; ``reload()`` (or HUP) reads it afresh.
    """

    prefork_options: dict[str, Any] = {}

    def __init__(self, server_address: Any, RequestHandlerClass: type,
                 bind_and_activate: bool = True, **options: Any) -> None:  # fmt: skip
        unknown = set(options) - _OPTIONS
        if unknown:
            raise TypeError(f"unknown prefork option(s): {', '.join(sorted(unknown))}")
        self.prefork_options = {**type(self).prefork_options, **options}
        self._master: Master | None = None
        self._shutdown_requested = False
        self._serving_done = threading.Event()
        self._master_created = threading.Event()
        super().__init__(server_address, RequestHandlerClass, bind_and_activate)  # type: ignore[call-arg]
        try:
            self.prefork_config()  # a bad option fails here, naming the keyword, not later
        except ConfigError as err:
            self.server_close()  # type: ignore[attr-defined]
            raise ValueError(str(err)) from None

    def prefork_config(self) -> Config:
        """The Config the master runs with: our options over the defaults, validated."""
        uri = format_uri(socket_kind(self.socket), self.socket.getsockname())  # type: ignore[attr-defined]
        handler = self.RequestHandlerClass  # type: ignore[attr-defined]
        base = {"app": f"{handler.__module__}:{handler.__qualname__}", "bind": [uri],
                "name": handler.__name__}  # fmt: skip
        path = self.prefork_options.get("config")
        from_file = read_toml(path) if path else {}
        for key in _NOT_FROM_FILE:
            if key in from_file:
                raise ConfigError(f"bad config file {path}: {key!r} is not for the library, "
                                  "which serves its own socket and handler")  # fmt: skip
        return build({**base, **from_file}, self.prefork_options, spell=_keyword)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the master loop until ``shutdown()`` (or TERM, when called in the main thread).

        ``poll_interval`` is accepted for compatibility; the master sleeps until something
        happens instead of polling.
        """
        sock = self.socket  # type: ignore[attr-defined]
        config = self.prefork_config()
        listener = Listener(
            spec=parse_bind(config.bind[0]), sock=sock, kind=socket_kind(sock),
            owns_socket=False, server=self,
        )  # fmt: skip
        self._serving_done.clear()
        sock.setblocking(False)  # the accept discipline every worker relies on
        try:
            self._master = Master(
                config, listeners=[listener], handler=self.RequestHandlerClass,  # type: ignore[attr-defined]
                set_title=False, reread_config=self.prefork_config,
            )  # fmt: skip
            self._master_created.set()
            if self._shutdown_requested:
                self._master.submit(commands.make("stop", origin="library"))
            self.exit_code = self._master.run()
        finally:
            sock.setblocking(True)
            self._master = None
            self._master_created.clear()
            self._shutdown_requested = False
            self._serving_done.set()

    def shutdown(self) -> None:
        """Stop gracefully: in-flight requests finish, every worker exits; then return.

        Call it from another thread than ``serve_forever``'s, as with socketserver.
        """
        self._shutdown_requested = True
        master = self._master
        if master is not None:
            master.submit(commands.make("stop", origin="library"))
        self._serving_done.wait()

    def _ask(self, name: str, n: int | None = None, timeout: float = 30.0) -> dict | None:
        """Send one command to the master loop and wait for its reply (None: not serving)."""
        master = self._master
        if master is None:
            return None
        try:
            command = commands.make(name, n, origin="library")
        except commands.CommandError as err:  # scale(0): a reply that says why, as for others
            return {"ok": False, "error": f"{name} refused: {err}"}
        return master.submit(command).wait(timeout)

    def scale(self, n: int) -> dict | None:
        """Set the pool's target to ``n`` workers (within 1 .. max_workers): the reply says
        the new target, or why it was refused. Workers are forked or retired right after."""
        return self._ask("scale", n)

    def reload(self) -> dict | None:
        """Start a new generation of workers (as HUP): every worker is replaced, without a
        refused connection. Returns once the new generation has started booting (or, with
        a bind's own ``module:Class`` to check first, once its check has begun)."""
        return self._ask("reload")

    def drain(self) -> dict | None:
        """Out of the balancer's rotation (``--health`` says draining); nothing else changes."""
        return self._ask("drain")

    def undrain(self) -> dict | None:
        """Back in rotation."""
        return self._ask("undrain")

    def status(self) -> dict | None:
        """The master's status (workers with their scoreboard state), or None when not serving."""
        reply = self._ask("status")
        return reply if reply and reply.get("ok") else None

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the live workers (empty when not serving)."""
        status = self.status()
        return sorted(w["pid"] for w in status["workers"]) if status else []

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the first generation of workers is serving (for tests and scripts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._master_created.wait(timeout):
            return False
        master = self._master
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return master is not None and master.ready.wait(remaining)


class PreforkTCPServer(PreforkMixIn, TCPServer):
    """``TCPServer`` served by a prefork cluster."""

    allow_reuse_address = True


class PreforkUDPServer(PreforkMixIn, UDPServer):
    """``UDPServer`` served by a prefork cluster."""


class PreforkUnixStreamServer(PreforkMixIn, UnixStreamServer):
    """``UnixStreamServer`` served by a prefork cluster."""


class PreforkUnixDatagramServer(PreforkMixIn, UnixDatagramServer):
    """``UnixDatagramServer`` served by a prefork cluster."""

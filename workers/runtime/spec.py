"""What the master hands a worker at fork time, and the signals they exchange.

Nothing here is pickled: the master builds a ``WorkerSpec`` and forks, so the child reads it
as plain memory. Signals to a worker (the master is the only sender that matters):

    TERM        graceful: finish the request at hand, serve what is queued, exit 0
    INT, QUIT   quick: exit now
    USR2        dump the Python stack of every thread to the log (faulthandler): the master
                sends it before it kills a worker whose request ran past ``--timeout``
    URG         cut the connections idle between requests past ``--keep-alive``
    USR1        reopen the log files (the master passes the operator's USR1 on)
    HUP, TTIN, TTOU, WINCH   ignored here: they are the master's, and a signal sent to the
                whole process group must not kill workers
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.runtime.privileges import Identity
from workers.runtime.scoreboard import Scoreboard
from workers.servers import BaseServer

EXIT_BOOT_ERROR = 3  # the master treats this exit code as "the app cannot boot"
EXIT_CUT = 65  # a graceful stop had to cut requests short: the master's stop then exits 1
# Signals a process raises against itself when it fails: a crash, not a kill from outside.
SELF_INFLICTED = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                            signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP})  # fmt: skip
STACK_DUMP_SIGNAL = signal.SIGUSR2  # to a worker (never the master): dump every thread's stack
PARENT_CHECK_INTERVAL = 1.0  # seconds between checks that the master still lives
WAITING_ROOM = 64  # default places per worker for connections that have not spoken yet
# Blocked by the master across a fork and unblocked by the worker once its own handlers are
# in place, so that a TERM sent during boot is neither lost nor run by the master's handler.
HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH, signal.SIGURG,
)  # fmt: skip


@dataclass
class Endpoint:
    """A listening socket as the worker sees it: the socket, its kind, and its own handler."""

    sock: socket.socket
    kind: str  # "tcp" | "udp" | "unix" | "unix-dgram"
    app: str | None = None  # per-listener ``module:Class``; None serves the default app
    server: BaseServer | None = None  # the library API's own server object, reused as is
    uri: str = "-"  # its real address, as the master's log and the access log name it
    # Who may talk to it (workers.runtime.gate); the master resolved the defaults already.
    proxy: str = ""  # ?proxy=: "" (none), v1, v2 or any
    allow: tuple = ()  # ipaddress networks the client must be in; empty: everyone
    proxy_allow: tuple = ()  # networks a PROXY header may come from


@dataclass
class WorkerSpec:
    """Everything a worker needs, built by the master before the fork."""

    slot: int
    generation: int
    mode: str  # a name in ``workers.runtime.modes.MODES``
    name: str
    master_pid: int
    endpoints: list[Endpoint]
    load_handler: Callable[[str | None], type]  # app spec (None: default) -> handler class
    notify_fd: int  # write end of the master's notify pipe
    scoreboard: Scoreboard  # this worker's generation's; we write slot ``slot``
    inherited_fds: list[int] = field(default_factory=list)  # the master's, closed at boot
    threads: int = 16
    max_children: int = 40
    graceful_timeout: float = 30.0
    timeout: float = 30.0  # modes that kill their own overdue requests (fork) read it
    keep_alive: float = 5.0  # cut a connection idle between requests this long (0: never)
    beat_every: float = PARENT_CHECK_INTERVAL  # an idle worker's heartbeat period
    max_requests: int = 0  # recycle after this many requests (0: never); jitter already added
    request_timeout: float = 30.0  # the deadline for reading one request (0: none)
    waiting_room: bool = True  # silent new connections wait in a room, not in a handler
    max_connections: int = 0  # connections held at once, handlers' and room's (0: see below)
    defer_accept: bool = (
        True  # TCP_DEFER_ACCEPT on TCP listeners whose handler does not speak first
    )
    identity: Identity | None = None  # --user/--group: whom to become before the app loads

    def connection_bound(self, handlers: int) -> int:
        """The most connections a worker with ``handlers`` handlers holds at once: those in
        its handlers plus those in its waiting room (``--max-connections``; by default
        WAITING_ROOM more than it has handlers)."""
        return self.max_connections or handlers + WAITING_ROOM

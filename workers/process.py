"""The worker process: what runs between the master's fork and the accept loop, and after it.

A worker owns very little: its copies of the listening sockets, the write end of the master's
notify pipe, and a wakeup pipe of its own. Everything else it inherited from the master (the
master's wakeup pipe and selector, the pidfds of its siblings) is closed first thing, so that
no fd outlives its owner's intent.

Signals (the master is the only sender that matters):

    TERM        graceful: finish the request at hand, serve what is queued, exit 0
    INT, QUIT   quick: exit now
    USR2        dump the Python stack of every thread to the log (faulthandler): the master
                sends it before it kills a worker whose request ran past ``--timeout``
    HUP, TTIN, TTOU, USR1, WINCH   ignored here: they are the master's, and a signal sent to
                the whole process group must not kill workers

The master blocks these signals around the fork and the worker unblocks them only once its own
handlers are in place, so a TERM sent during boot is never lost nor handled by the master's code.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.scoreboard import DRAINING, IDLE, Scoreboard, WorkerSlot
from workers.servers import BaseServer, TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer

log = logging.getLogger("cluster.worker")

EXIT_BOOT_ERROR = 3  # the master treats this exit code as "the app cannot boot"
STACK_DUMP_SIGNAL = signal.SIGUSR2  # to a worker (never the master): dump every thread's stack
PARENT_CHECK_INTERVAL = 1.0  # seconds between checks that the master still lives
HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH,
)  # fmt: skip
_PR_SET_PDEATHSIG = 1

SERVER_CLASSES: dict[str, type[BaseServer]] = {
    "tcp": TCPServer,
    "udp": UDPServer,
    "unix": UnixStreamServer,
    "unix-dgram": UnixDatagramServer,
}


@dataclass
class Endpoint:
    """A listening socket as the worker sees it: the socket, its kind, and its own handler."""

    sock: socket.socket
    kind: str  # "tcp" | "udp" | "unix" | "unix-dgram"
    app: str | None = None  # per-listener ``module:Class``; None serves the default app
    server: BaseServer | None = None  # the library API's own server object, reused as is


@dataclass
class WorkerSpec:
    """Everything a worker needs, built by the master before the fork (nothing is pickled)."""

    slot: int
    generation: int
    mode: str
    name: str
    master_pid: int
    endpoints: list[Endpoint]
    load_handler: Callable[[str | None], type]  # app spec (None: default) -> handler class
    notify_fd: int  # write end of the master's notify pipe
    inherited_fds: list[int] = field(default_factory=list)  # the master's, closed at boot
    scoreboard: Scoreboard | None = None  # shared with the master; we write slot ``slot``
    threads: int = 8
    max_children: int = 40
    graceful_timeout: float = 30.0
    timeout: float = 30.0  # fork mode: the worker itself kills children running longer
    max_requests: int = 0  # recycle after this many requests (0: never); jitter already added


class Lifecycle:
    """What the signal handlers set and the loop reads: flags and a wakeup pipe, nothing more."""

    def __init__(self) -> None:
        self.running = True
        self.quick = False  # a quick stop is under way: do not wait for anything on the way out
        self.children_exited = True  # fork mode: a SIGCHLD came since we last reaped
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def request_stop(self, signum: int, frame: object) -> None:
        self.running = False

    def quick_stop(self, signum: int, frame: object) -> None:
        self.running, self.quick = False, True
        raise SystemExit(0)

    def child_exited(self, signum: int, frame: object) -> None:
        self.children_exited = True

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass


class Context:
    """What a mode needs at run time besides its servers: the spec, the signal flags, our
    scoreboard slot, and the request count that ``--max-requests`` recycles on."""

    def __init__(self, spec: WorkerSpec, lifecycle: Lifecycle, slot: WorkerSlot) -> None:
        self.spec = spec
        self.lifecycle = lifecycle
        self.slot = slot
        self.served = 0
        self.limit = spec.max_requests
        self.recycled = False  # we hit --max-requests: the master is forking our replacement

    def tell(self, message: bytes) -> None:
        notify(self.spec.notify_fd, message)

    def ready(self) -> None:
        """We can take requests: the master counts us as serving from now on."""
        self.slot.set_state(IDLE)
        self.tell(b"ready")

    def counted(self) -> None:
        """One more request taken; at the limit, take no more and let the master replace us."""
        self.served += 1
        if self.served == self.limit:
            self.lifecycle.running = False
            self.recycled = True
            self.tell(b"recycle %d" % self.served)

    def draining(self) -> bool:
        """We stopped taking new requests; whether to serve what is already queued first.

        On a stop, yes: the listeners may close after us. A worker recycling itself leaves
        them to the other workers and its replacement, so that its count stays exact.
        """
        self.slot.set_state(DRAINING)
        return not self.recycled


def make_server(endpoint: Endpoint, handler: type, mixin: type | None = None) -> BaseServer:
    """A socketserver-style server object wrapped around an already bound, shared socket.

    Handlers receive it as ``self.server``, exactly as under the stdlib, so code that reads
    ``server.server_address`` (or ``server_name``, as http.server does) keeps working.
    """
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
    if endpoint.kind == "tcp":
        server.server_name, server.server_port = server.server_address[:2]
    return server


def _load_prctl():  # noqa: ANN202
    """libc's prctl, loaded once: dlopen per call would cost every fork-mode child ~0.2 ms."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the loops' parent checks still cover us
        return None


_prctl = _load_prctl()


def set_parent_death_signal(signum: int, parent_pid: int) -> None:
    """Have the kernel send ``signum`` when our parent dies; exit now if it already has.

    The check after ``prctl`` closes the race where the parent died between our fork and the
    call: the kernel would then never send the signal.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def master_alive(master_pid: int) -> bool:
    return os.getppid() == master_pid


def run(spec: WorkerSpec) -> None:
    """The worker's life: boot, tell the master we're ready, serve, exit. Target of the Process."""
    from workers import modes  # late: modes import this module

    lifecycle = boot(spec)
    assert spec.scoreboard is not None
    slot = spec.scoreboard.worker_slot(spec.slot)
    slot.header.pid = os.getpid()
    try:
        handlers = [spec.load_handler(ep.app) for ep in spec.endpoints]
    except Exception as err:  # an app that fails to import in the worker: a boot error
        log.error("worker %d cannot load the app: %s", os.getpid(), err)
        sys.exit(EXIT_BOOT_ERROR)
    serve = modes.get(spec.mode)
    serve(list(zip(spec.endpoints, handlers, strict=True)), Context(spec, lifecycle, slot))


def boot(spec: WorkerSpec) -> Lifecycle:
    """Undo what the worker inherited from the master and set up its own signals."""
    for fd in spec.inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    lifecycle = Lifecycle()
    signal.set_wakeup_fd(lifecycle.wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lifecycle.request_stop)
    signal.signal(signal.SIGINT, lifecycle.quick_stop)
    signal.signal(signal.SIGQUIT, lifecycle.quick_stop)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, lifecycle.child_exited)
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    set_parent_death_signal(signal.SIGQUIT, spec.master_pid)  # master gone: a quick stop
    name = f" [{spec.name}]" if spec.name else ""
    set_title(f"cluster: worker{name} {spec.mode} slot={spec.slot} gen={spec.generation}")
    return lifecycle


def set_title(title: str) -> None:
    """Set the process title; titles are cosmetic, so a missing setproctitle never fails us."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def notify(fd: int, message: bytes) -> None:
    """One line to the master: ``PID MESSAGE``; shorter than PIPE_BUF, so the write is atomic."""
    try:
        os.write(fd, b"%d %s\n" % (os.getpid(), message))
    except OSError:
        pass  # the master is gone; the parent check ends us soon

"""fork mode's fork server: a small process, forked from the worker at boot, that forks the
request children for it.

Why: after every fork, each page the forking process writes costs it a copy-on-write fault
(several microseconds each on a virtual machine), and the worker writes a lot of pages per
request: its accept loop, waiting room, access rules, scoreboard and child table are
Python objects spread over its heap. Forking from the worker, ``scripts/forkcost.py``-style
probes measured 211 faults and 1.5 ms of the worker's CPU per request, against 96 faults
and 0.4 ms for the bare fork loop's parent. The fork server's loop is as small as that
one: read a connection, fork, say the child's pid, reap. The worker does everything else,
without forking, so its pages stay its own.

Who owns what:
- The worker owns the request's life as before: accepting, the waiting room, access rules,
  the lane on the scoreboard, ``max_children`` (it takes no connection without a free
  lane), ``--timeout`` on each child (it signals the child's pid) and the graceful stop.
- The fork server owns the processes: it forks one child per request, which runs the
  worker's very ``ForkingMixIn.serve_in_child``, reaps them (it has no other children, so
  ``waitpid(-1)`` takes only its own) and tells the worker which pid each request got and
  which pids it has reaped. It never has more than ``max_children``: the worker hands it
  nothing without a free lane.

The channel is a ``SOCK_SEQPACKET`` socket pair: the worker sends the connection's fd
(``SCM_RIGHTS``) with its listener, lane, client address and request deadline; the fork
server answers ``(FORKED, pid, exited pids)`` (pid 0: the kernel refused the fork), and
reports exits on their own, ``(EXITED, pids)`` followed by a byte on the worker's wakeup
pipe, when the worker may be waiting for a lane (see ``serve_forks``). A worker waiting for
exits (full, or stopping) also asks, once a second, whether the fork server still answers
(``PING``, answered ``(PONG, exited pids)``): a stopped or stuck fork server reports no exit,
and the worker would otherwise wait for a lane, or for its stop, for good.

Faults: the fork server dies with the worker (parent-death signal), and its children with
it. A fork server that dies (killed -9, say) ends its children the same way and stops the
worker at once (it has no child left to wait for), which the master replaces; one that
does not answer within ``--timeout`` (at most 10 s) is killed, with the same outcome.
"""

from __future__ import annotations

import ctypes
import logging
import marshal
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from workers.runtime.access import reopen_logs
from workers.runtime.client import ListeningSocket
from workers.runtime.context import CURRENT
from workers.runtime.lifecycle import Lifecycle, set_parent_death_signal
from workers.runtime.quickfork import REFUSALS
from workers.runtime.quickfork import fork as quick_fork
from workers.runtime.ratelog import DROPPED as DROPPED_FD
from workers.runtime.ratelog import RateLimitedLog
from workers.runtime.scoreboard import WorkerSlot
from workers.runtime.spec import SELF_INFLICTED
from workers.servers import BaseServer, TCPServer, UDPServer

log = logging.getLogger("cluster.worker")
DROPPED = RateLimitedLog(log, DROPPED_FD)  # connections whose fd the kernel could not pass us

FORKED, EXITED, PONG = 0, 1, 2
PING = marshal.dumps(None)  # the worker, waiting for exits: do you still answer?
MESSAGE_SIZE = 70_000  # the largest message: one datagram (65,535 bytes) and its header
# The fork server's receive buffer, made once: a new one per request would be pages to write.
BUFFER = bytearray(MESSAGE_SIZE)
VIEW = memoryview(BUFFER)
FD_SPACE = socket.CMSG_SPACE(4)  # one fd
# A fork takes milliseconds; a fork server this late is stopped or stuck, and the worker
# stops too (the master replaces it) rather than hang with it.
ANSWER_TIMEOUT = 10.0
EXIT_REPORT_DELAY_MS = 10  # exits wait this long for a FORKED answer to go with


def serves_all(servers: list[BaseServer]) -> bool:
    """Whether the fork server can fork for these listeners: those whose requests are our own
    connection sockets or datagrams, which the channel can carry. A library user's server
    with its own ``get_request`` (an SSL wrapper, say) keeps forking in the worker."""
    stock = (TCPServer.get_request, UDPServer.get_request)
    return all(getattr(type(server), "get_request", None) in stock for server in servers)


class ForkedChildren:
    """What a request child forked by the fork server reads as its server's
    ``active_children`` (``WorkerForkingMixIn.finish_request``): the scoreboard and the lane
    it writes in. The fork server keeps its own count of children, in its loop."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self.next_lane = 0


class ForkServer:
    """The worker's end: start the fork server, hand requests to it, hear of exits."""

    def __init__(
        self, servers: list[BaseServer], lifecycle: Lifecycle, slot: WorkerSlot,
        timeout: float = 0.0,
    ) -> None:  # fmt: skip
        self.servers, self.lifecycle, self.slot = servers, lifecycle, slot
        # --timeout, when shorter: the worker would be put down as hung meanwhile
        self.answer_timeout = min(ANSWER_TIMEOUT, timeout) if timeout > 0 else ANSWER_TIMEOUT
        self.pid = 0
        self.channel: socket.socket | None = None
        self.exits: list[int] = []  # heard of while waiting for a FORKED answer
        self.pinged = 0.0  # when our PING still unanswered went out (0: none is)
        self.heard = 0.0  # when the fork server last said anything
        self.gone = False  # the fork server died, or closed its end
        self.status: int | None = None  # its wait status, once reaped
        self.put_down_here = False  # we killed it (it did not answer)

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker = os.getpid()
        try:
            pid = quick_fork()
        except OSError:  # the caller decides (out of processes: it forks for itself)
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            ours.close()
            status = 1
            try:
                serve_forks(theirs, self.servers, self.slot, self.lifecycle.wake_w, worker)
                status = 0
            except BaseException:  # noqa: BLE001 - whatever it is, never return into the worker
                log.exception("fork server %d failed", os.getpid())
            finally:
                os._exit(status)
        theirs.close()
        self.pid, self.channel = pid, ours
        ours.setblocking(False)
        self._receive(block=True)  # its hello: set up, titled, and ready to fork
        _chain_handler(signal.SIGUSR1, lambda: self.tell(signal.SIGUSR1))

    def put_down(self) -> None:
        """Kill a fork server that does not answer (stopped, or stuck)."""
        self.put_down_here = True
        self.tell(signal.SIGKILL)

    def tell(self, signum: int) -> None:
        """Pass a signal on (USR1: the fork server's children must write to reopened logs)."""
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def hand_off(self, server: BaseServer, request: Any, client_address: Any, lane: int) -> int:
        """Have the fork server fork a child for ``request``: its pid, or 0 if none was forked
        (the kernel refused, or the fork server is gone). The worker then drops its copy."""
        channel = self.channel
        if channel is None or self.gone:
            return 0
        if isinstance(request, tuple):  # a datagram: (data, the listener's socket)
            message = marshal.dumps((server.listener_index, lane, client_address, 0.0,
                                     request[0]))  # fmt: skip
            fds: list[int] = []
        else:
            message = marshal.dumps((server.listener_index, lane, client_address,
                                     request._deadline, None))  # fmt: skip
            fds = [request.fileno()]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds[0]))] if fds else []
        try:
            channel.sendmsg([message], ancillary)
        except BlockingIOError:  # its queue is full: wait for room (it answers each one)
            if not select.select([], [channel], [], self.answer_timeout)[1]:
                self.put_down()
                self.lost(f"took nothing within {self.answer_timeout:g}s (killed)")
                return 0
            return self.hand_off(server, request, client_address, lane)
        except OSError as err:
            self.lost(f"cannot be reached ({err.strerror})")
            return 0
        while True:
            answer = self._receive(block=True)
            if answer is None:
                return 0
            if answer[0] == FORKED:
                return answer[1]

    def exited(self, look: bool = True) -> list[int]:
        """The pids reaped since we last asked, as far as the answers so far said; with
        ``look``, also those of reports waiting on the channel (never blocks)."""
        while look and self._receive(block=False) is not None:
            pass
        exits, self.exits = self.exits, []
        return exits

    def keep_answering(self, now: float) -> None:
        """Called about once a second while the worker waits for exits, after reading
        what the fork server said (``exited``): a PING if it said nothing for a second and
        none is out; one unanswered past the answer timeout means a stopped or stuck fork
        server: kill it, it is lost."""
        if self.channel is None or self.gone or not self.pinged and now - self.heard < 1.0:
            return
        if self.pinged and now - self.pinged > self.answer_timeout:
            self.put_down()
            self.lost(f"did not answer within {self.answer_timeout:g}s (killed)")
        elif not self.pinged:
            try:
                self.channel.send(PING)
            except BlockingIOError:  # its queue is full: it has answers to give first
                return
            except OSError as err:
                self.lost(f"cannot be reached ({err.strerror})")
                return
            self.pinged = now

    def _receive(self, block: bool) -> tuple[Any, ...] | None:
        channel = self.channel
        if channel is None or self.gone:
            return None
        try:
            if block and not select.select([channel], [], [], self.answer_timeout)[0]:
                self.put_down()
                self.lost(f"did not answer within {self.answer_timeout:g}s (killed)")
                return None
            data = channel.recv(MESSAGE_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.lost("is gone")
            return None
        self.heard = time.monotonic()
        answer = marshal.loads(data)
        self.exits.extend(answer[-1])  # (EXITED, pids), (PONG, pids) or (FORKED, pid, pids)
        if answer[0] == PONG:
            self.pinged = 0.0
        return answer

    def lost(self, why: str) -> None:
        """The fork server is of no more use: say why, once; the worker stops."""
        if not self.gone:
            log.error("worker %d: its fork server %d %s; stopping", os.getpid(), self.pid, why)
        self.gone = True

    def reap(self) -> None:
        """After a SIGCHLD: if it was the fork server's, it is lost (and reaped here)."""
        if not self.pid:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid:
            self.lost(f"exited ({_describe(status)})")
            self.pid, self.status = 0, status

    def killed_from_outside(self, within: float = 1.0) -> bool:
        """Whether a signal from outside ended the lost fork server (``kill -9``, the OOM
        killer): not we, nor a failure of its own. Then the worker exits with
        ``EXIT_FORK_SERVER_KILLED``, and the master replaces it at once, as it replaces a
        worker killed so (no backoff: the replacement has no reason to fail). It waits up
        to ``within`` for the fork server to be reaped: its channel closes as it dies, a
        moment before it can be."""
        deadline = time.monotonic() + within
        while self.pid and time.monotonic() < deadline:
            self.reap()
            if self.pid:
                select.select([], [], [], 0.01)  # its exit is under way
        if self.put_down_here or self.status is None or not os.WIFSIGNALED(self.status):
            return False
        return os.WTERMSIG(self.status) not in SELF_INFLICTED

    def stop(self, quick: bool) -> None:
        """End the fork server: closing the channel tells it to reap and exit."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if not self.pid:
            return
        if quick:
            self.tell(signal.SIGKILL)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"code {os.waitstatus_to_exitcode(status)}"


def _chain_handler(signum: int, then: Callable[[], None]) -> None:
    """Run ``then`` after the handler in place for ``signum``."""
    before = signal.getsignal(signum)

    def handler(number: int, frame: object) -> None:
        if callable(before):
            before(number, frame)
        then()

    signal.signal(signum, handler)


# ----------------------------------------------------------------------------- the fork server
def serve_forks(
    channel: socket.socket, servers: list[BaseServer], slot: WorkerSlot, wake_worker: int,
    worker: int,
) -> None:  # fmt: skip
    """The fork server's loop, until the worker closes its end of the channel.

    It keeps the worker's signal handlers for its children's sake (each child is a request
    of the worker's) but lets them do nothing here, and wakes on a pipe of its own. The loop
    is written flat on purpose: every object it touches after a fork is a page to copy.

    Exits reach the worker with the next FORKED answer, or on their own (with a wake-up)
    when the worker may be waiting for a free lane, or once the fork server has had no
    request for EXIT_REPORT_DELAY: a worker that is not full needs them only for its books.
    """
    set_parent_death_signal(signal.SIGKILL, worker)
    _give_back_free_heap()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGURG):
        _ignore_here(signum)
    children = ForkedChildren(slot)
    lanes = getattr(servers[0], "max_children", 1)
    for server in servers:
        server.active_children = children  # type: ignore[attr-defined]  # for the child
    from workers.runtime.entry import set_title

    set_title(f"cluster: fork server of worker {worker}")
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    channel.send(marshal.dumps((EXITED, [])))  # hello: the worker may say it is ready
    recvmsg_into, send, poll, waitpid = channel.recvmsg_into, channel.send, poller.poll, os.waitpid
    # One thread here (threads do not survive the fork that made us, and we run no code of
    # the app): we may always skip the interpreter's repairs.
    fork, refusals = partial(quick_fork, single_threaded=True), REFUSALS
    dumps, loads = marshal.dumps, marshal.loads
    hold, release, adopt = hold_reopens, release_reopens, ListeningSocket.adopt
    live: set[int] = set()  # our children not yet reaped
    pass_reopens_on(live)
    exits: list[int] = []  # reaped, not yet reported
    buffers, view = [BUFFER], VIEW
    while True:
        for fd, _ in poll(EXIT_REPORT_DELAY_MS if exits else -1) or ((-1, 0),):
            if fd == wake_r:
                _drain(wake_r)
                continue
            if fd == -1:  # nothing came for a while: report what we reaped
                exits = _report(channel, exits, wake_worker)
                continue
            try:
                size, ancillary, _, _ = recvmsg_into(buffers, FD_SPACE)
            except (BlockingIOError, InterruptedError):
                continue
            if not size:
                _finish(live)
                return
            message = loads(view[:size])
            if message is None:  # PING: the worker waits for exits; say we still answer
                send(dumps((PONG, exits)))
                exits = []
                continue
            index, lane, client_address, deadline, datagram = message
            server = servers[index]
            if datagram is None:
                fd = _fd_of(ancillary)
                if fd < 0:  # out of fds here: the kernel dropped it; the worker closes its own
                    DROPPED.warning("fork server %d: no fd left to take a connection; "
                                    "closing it", os.getpid())  # fmt: skip
                    send(dumps((FORKED, 0, exits)))
                    exits = []
                    continue
                # rebuilt around our copy of the worker's fd, with the same deadline
                request: Any = adopt(server.socket, fd, deadline)  # type: ignore[attr-defined]
            else:
                request = (datagram, server.socket)  # type: ignore[attr-defined]
            children.next_lane = lane  # the child's lane (finish_request sets CURRENT.lane)
            CURRENT.client = client_address  # the access log's (the worker's is not ours)
            hold()  # a USR1 waits until the child is in ``live``
            try:
                pid = fork()
            except OSError as err:
                release()
                refusals.refused_with(err)
                server.shutdown_request(request)  # type: ignore[attr-defined]
                pid = 0
            else:
                if pid == 0:  # the child releases it (WorkerForkingMixIn.finish_request)
                    server.serve_in_child(request, client_address)  # type: ignore[attr-defined]
                refusals.forked()
                live.add(pid)
                release()
                if datagram is None:
                    request.close()  # the child has its own descriptor
            send(dumps((FORKED, pid, exits)))
            exits = []
        while live:  # reap: every child of ours is a request's (no other ever exists)
            try:
                pid, _ = waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                live.clear()
                break
            if not pid:
                break
            live.discard(pid)
            exits.append(pid)
        if exits and len(live) + len(exits) >= lanes:  # the worker may be waiting for a lane
            exits = _report(channel, exits, wake_worker)


# USR1 waits while a request child is forked and until its pid is in the set the handler
# below reads: one that came between the fork and the record reached every child but the
# newest, which went on writing to the rotated file. The child unblocks it first thing
# (``release_reopens``), and then gets any USR1 sent to it meanwhile.
REOPEN_HELD = frozenset({signal.SIGUSR1})


def hold_reopens() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, REOPEN_HELD)


def release_reopens() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, REOPEN_HELD)


def pass_reopens_on(live: set[int]) -> None:
    """USR1 (reopen the logs) reaches our live children too (the fork server's, or a worker's
    that forks its children itself): each writes to the files it was forked with, so the child of a long kept-alive connection would go on writing to
    the rotated file for as long as it lives. They are told first, and reopen in silence;
    we say it, once, as before."""
    before = signal.getsignal(signal.SIGUSR1)
    me = os.getpid()

    def handler(number: int, frame: object) -> None:
        if os.getpid() != me:  # a request child, forked with this handler
            reopen_logs()
            return
        for pid in list(live):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:  # exiting, not reaped yet
                pass
        if callable(before):
            before(number, frame)

    signal.signal(signal.SIGUSR1, handler)


def _report(channel: socket.socket, exits: list[int], wake_worker: int) -> list[int]:
    """Report reaped pids on their own, and wake the worker to read them; what is left to
    report (nothing)."""
    try:
        channel.send(marshal.dumps((EXITED, exits)))
        os.write(wake_worker, b"\0")
    except OSError:  # the worker is gone: so are we, in a moment (parent-death signal)
        pass
    return []


def _fd_bytes(fd: int) -> bytes:
    return fd.to_bytes(4, sys.byteorder)


def _fd_of(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The connection's fd in a message's ancillary data; -1 if the kernel could not give
    it to us (no fd left: it says MSG_CTRUNC and sends the rest)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
    return -1


def _finish(live: set[int]) -> None:
    """The worker closed the channel: it has stopped waiting for our children (they were
    told to stop, or killed), so reap what is left and leave."""
    for pid in live:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _give_back_free_heap() -> None:
    """Unmap the C heap's free pages (glibc's ``malloc_trim``): every page we map is a page
    table entry each fork copies and each child's exit tears down, some 20 microseconds a
    megabyte on each side; this gives back some 0.7 MiB the worker had freed."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


def _ignore_here(signum: int) -> None:
    """Leave the handler in place for the children, but let it do nothing in the fork
    server itself: the worker stops us by closing the channel (or by its death)."""
    before = signal.getsignal(signum)
    me = os.getpid()

    def handler(number: int, frame: object) -> None:
        if os.getpid() != me and callable(before):
            before(number, frame)

    signal.signal(signum, handler)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass

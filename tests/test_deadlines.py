"""The request deadline and the log budget, without processes: a socketpair stands for a
client, and the clock is the real one (short deadlines)."""

from __future__ import annotations

import os
import resource
import select
import socket
import threading
import time

import pytest

from workers.runtime import client as client_module
from workers.runtime.client import NEXT_BYTE, NO_DEADLINE, ClientSocket, readable
from workers.runtime.ratelog import Budget, allow
from workers.runtime.room import EVICT_AFTER, WaitingRoom, has_data

pytestmark = pytest.mark.timeout(20)
TIMEOUT = 1.0  # short, but long enough for a loaded machine to get through a test's steps


@pytest.fixture
def pair(monkeypatch):
    """(our client end, the server's ClientSocket) with a TIMEOUT --request-timeout."""
    monkeypatch.setattr(ClientSocket, "request_timeout", TIMEOUT)
    monkeypatch.setattr(ClientSocket, "after_reply", NEXT_BYTE)
    ours, theirs = socket.socketpair()
    server = ClientSocket(theirs.family, theirs.type, theirs.proto, fileno=theirs.detach())
    server._io, server._at, server.between = memoryview(bytearray(16)).cast("d"), 0, False
    server._deadline = time.monotonic() + TIMEOUT  # as accept() sets it
    yield ours, server
    ours.close()
    server.close()


def drip(sock: socket.socket, every: float, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.wait(every):
            try:
                sock.send(b"x")
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_dripping_client_is_cut_at_the_deadline_however_often_it_sends(pair) -> None:
    ours, server = pair
    stop = threading.Event()
    dripper = drip(ours, 0.05, stop)
    started, got = time.monotonic(), b""
    try:
        while chunk := server.recv(100):
            got += chunk
    finally:
        stop.set()
        dripper.join()
    assert TIMEOUT - 0.05 <= time.monotonic() - started <= TIMEOUT + 0.5
    assert got  # it did read what dripped in before the deadline
    assert server.recv(100) == b""  # and stays cut


def test_a_reply_stops_the_clock_and_the_next_request_starts_it_at_its_first_byte(pair) -> None:
    ours, server = pair
    ours.sendall(b"one")
    assert server.recv(10) == b"one"
    server.sendall(b"reply")  # the request is answered
    assert server._deadline == NEXT_BYTE  # no clock runs while the client is idle
    ours.sendall(b"two")
    before = time.monotonic()
    assert server.recv(10) == b"two"
    assert before + TIMEOUT <= server._deadline <= time.monotonic() + TIMEOUT  # its first byte


def test_the_handlers_own_shorter_socket_timeout_still_raises(pair) -> None:
    ours, server = pair
    server.settimeout(0.1)
    with pytest.raises(TimeoutError):
        server.recv(10)


def test_a_cut_is_logged_once_naming_the_client(pair, caplog) -> None:
    ours, server = pair
    client_module.CUTS.budget = Budget()
    while server.recv(10):
        pass
    assert server.recv(10) == b""
    cuts = [r for r in caplog.records if "no whole request within" in r.getMessage()]
    assert len(cuts) == 1


def test_readiness_checks_do_not_consume_or_wait(pair) -> None:
    ours, server = pair
    server._deadline = NO_DEADLINE  # this one is about the peeks, not the clock
    assert not has_data(server) and not readable(server, 0)
    ours.sendall(b"hi")
    assert has_data(server) and readable(server, 1)
    assert server.recv(10) == b"hi"  # the peek left the bytes where they were
    ours.close()
    assert has_data(server)  # end-of-file is something a handler can read at once


def test_the_log_budget_holds_lines_past_the_burst_and_counts_them() -> None:
    budget = Budget()
    spend = lambda now: allow(budget, now, period=10.0, burst=2)  # noqa: E731
    assert spend(0.0) == 0
    assert spend(1.0) == 0
    assert spend(2.0) is None
    assert spend(3.0) is None
    assert spend(10.5) == 2  # a new period: this line says 2 went unsaid
    assert spend(11.0) == 0


def test_a_full_waiting_room_gives_up_its_oldest_place_only_to_a_flood() -> None:
    """Two places, both taken: a new connection waits in the queue while they are fresh, but
    once the oldest has been silent EVICT_AFTER seconds it is closed to make a place."""
    poller = select.epoll()
    pairs = [socket.socketpair() for _ in range(2)]
    room = WaitingRoom(poller, capacity=2, timeout=30.0)
    try:
        for _, server in pairs:
            room.park("listener", server, "client")
        now = time.monotonic()
        assert room.full and not room.make_place(now + 1.0)
        assert room.make_place(now + EVICT_AFTER + 0.1)
        pairs[0][0].settimeout(1)
        assert pairs[0][0].recv(10) == b""  # the oldest was closed
        assert len(room) == 1 and not room.full
    finally:
        room.close()
        poller.close()
        for client, _ in pairs:
            client.close()


def test_a_take_out_of_fds_leaves_the_waiting_room_to_the_loops_own_wait() -> None:
    """Out of fds, the room's oldest silent client is given up for one that speaks; but by
    the loop's own thread, at its pause, never by the accept that failed: in thread mode
    that may be a free thread's own take, and the leader may be expiring the very same
    connection meanwhile (a KeyError, which ended the leader). A real EMFILE: this
    process's fd limit lowered below its next fd for the take, and restored."""
    from workers import BaseRequestHandler, TCPServer
    from workers.runtime.accept import AcceptLoop
    from workers.runtime.context import Context
    from workers.runtime.lifecycle import Lifecycle
    from workers.runtime.scoreboard import Scoreboard
    from workers.runtime.spec import WorkerSpec

    board = Scoreboard(capacity=1, lanes=2)
    board.claim(0, pid=os.getpid(), generation=1)
    spec = WorkerSpec(slot=0, generation=1, mode="thread", name="", master_pid=os.getppid(),
                      endpoints=[], load_handler=lambda app: BaseRequestHandler, notify_fd=-1,
                      scoreboard=board)  # fmt: skip
    lifecycle = Lifecycle()
    server = TCPServer(("127.0.0.1", 0), BaseRequestHandler)
    server.socket.setblocking(False)
    loop = AcceptLoop([server], Context(spec, lifecycle, board.worker_slot(0)), handlers=2)
    client = socket.create_connection(server.server_address)  # queued, for the take
    ours, silent = socket.socketpair()
    try:
        assert loop.room is not None
        loop.room.park(server, silent, "silent client")
        fd = silent.fileno()
        parked = loop.room.parked[fd]  # silent for longer than a full room lets it stay
        loop.room.parked[fd] = (*parked[:3], parked[3] - EVICT_AFTER - 1.0)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            taken = loop.take(wait=False)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert taken is None and loop.starving and loop.paused
        assert fd in loop.room  # the take left it to the loop
        loop.wait()  # the pause: the loop's thread gives the oldest silent one up
        assert fd not in loop.room
        ours.settimeout(1)
        assert ours.recv(10) == b""  # closed
    finally:
        loop.close()
        server.server_close()
        client.close()
        ours.close()
        silent.close()
        board.close()
        os.close(lifecycle.wake_r)
        os.close(lifecycle.wake_w)

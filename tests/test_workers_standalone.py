"""The ``workers`` socketserver classes on their own: real sockets, real threads and forks.

Servers are driven with ``handle_request()`` on the test's thread wherever possible: a client
can connect and send before the server accepts (the backlog and socket buffers hold it), so
most tests need no thread at all. Every thread is joined and every forked child collected.
"""

from __future__ import annotations

import array
import http.client
import http.server
import logging
import os
import select
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import workers
import workers as socketserver_compat
from tests.conftest import read_line

pytestmark = pytest.mark.timeout(30)

HAS_UNIX = hasattr(socket, "AF_UNIX")
HAS_FORK = hasattr(os, "fork")
needs_fork = pytest.mark.skipif(not HAS_FORK, reason="needs os.fork")
CLIENT_TIMEOUT = 10.0


def live_children() -> set[int]:
    """This process's children not yet collected, zombies included (Linux; else empty)."""
    pids: set[int] = set()
    for path in Path("/proc/self/task").glob("*/children"):
        pids.update(int(pid) for pid in path.read_text().split())
    return pids


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every test joins the threads and collects the children it started."""
    threads_before = set(threading.enumerate())
    children_before = live_children()
    yield
    assert set(threading.enumerate()) <= threads_before
    assert live_children() <= children_before


# --- handlers -----------------------------------------------------------------------------


class EchoLine(workers.StreamRequestHandler):
    """Reply with the first line received."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class EchoDatagram(workers.DatagramRequestHandler):
    """Reply with the datagram received."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


class EchoThenWaitForEOF(workers.StreamRequestHandler):
    """Echo one line, then stay until the client shuts down its side; leave a marker file.

    The marker (named after the pid) proves the child ran to completion.
    """

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())
        self.rfile.read()
        marker_dir: Path = self.server.marker_dir
        (marker_dir / str(os.getpid())).write_text("done")


class FailOnBoom(workers.StreamRequestHandler):
    """Echo a line, unless it is ``boom``: then raise."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if line == b"boom\n":
            raise ValueError("boom requested")
        self.wfile.write(line)


# --- helpers ------------------------------------------------------------------------------


def server_address_for(server_class: type, tmp_path: Path, name: str = "server.sock") -> object:
    if HAS_UNIX and server_class.address_family == socket.AF_UNIX:
        return str(tmp_path / name)
    return ("127.0.0.1", 0)


def stream_client(server: workers.TCPServer) -> socket.socket:
    sock = socket.socket(server.address_family, socket.SOCK_STREAM)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect(server.server_address)
    return sock


def datagram_client(server: workers.UDPServer, tmp_path: Path) -> socket.socket:
    sock = socket.socket(server.address_family, socket.SOCK_DGRAM)
    sock.settimeout(CLIENT_TIMEOUT)
    if server.address_family == socket.AF_UNIX:
        sock.bind(str(tmp_path / "client.sock"))  # An unbound Unix client cannot be answered.
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def round_trip(server: workers.TCPServer, line: bytes) -> bytes:
    with stream_client(server) as client:
        client.sendall(line)
        return read_line(client)


def round_trip_with_handle_request(server: workers.TCPServer, line: bytes) -> bytes:
    with stream_client(server) as client:
        client.sendall(line)
        server.handle_request()
        return read_line(client)


@contextmanager
def serving(server: workers.BaseServer) -> Iterator[threading.Thread]:
    """Run ``serve_forever`` in a thread; stop, join and close on the way out."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield thread
    finally:
        server.shutdown()
        thread.join(CLIENT_TIMEOUT)
        server.server_close()
    assert not thread.is_alive()


def fork_pid(server: workers.ForkingMixIn) -> int:
    """Handle one request on a forking server and return the new child's pid."""
    before = set(server.active_children or ())
    server.handle_request()
    (pid,) = set(server.active_children) - before
    return pid


def assert_collected(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def classes(*names: str) -> list:
    return [
        pytest.param(getattr(workers, name), id=name) for name in names if hasattr(workers, name)
    ]


STREAM_SERVERS = classes(
    "TCPServer",
    "ThreadingTCPServer",
    "ForkingTCPServer",
    "UnixStreamServer",
    "ThreadingUnixStreamServer",
    "ForkingUnixStreamServer",
)
DATAGRAM_SERVERS = classes(
    "UDPServer",
    "ThreadingUDPServer",
    "ForkingUDPServer",
    "UnixDatagramServer",
    "ThreadingUnixDatagramServer",
    "ForkingUnixDatagramServer",
)


# --- echo on every kind of server -----------------------------------------------------------


@pytest.mark.parametrize("server_class", STREAM_SERVERS)
def test_stream_echo(server_class: type, tmp_path: Path) -> None:
    with server_class(server_address_for(server_class, tmp_path), EchoLine) as server:
        with stream_client(server) as client:
            client.sendall(b"hello\n")
            server.handle_request()
            # shutdown_request() closes the server's side, so the reply ends with EOF.
            assert read_to_eof(client) == b"hello\n"
    if isinstance(server, workers.ForkingMixIn):
        assert server.active_children == set()


@pytest.mark.parametrize("server_class", DATAGRAM_SERVERS)
def test_datagram_echo(server_class: type, tmp_path: Path) -> None:
    with server_class(server_address_for(server_class, tmp_path), EchoDatagram) as server:
        with datagram_client(server, tmp_path) as client:
            for payload in (b"ping", b"pong"):
                client.sendto(payload, server.server_address)
                server.handle_request()
                data, address = client.recvfrom(1024)
                assert data == payload
                assert address == server.server_address
    if isinstance(server, workers.ForkingMixIn):
        assert server.active_children == set()


def test_tcp_server_binds_port_zero_and_records_address() -> None:
    with workers.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        host, port = server.server_address
        assert host == "127.0.0.1" and port != 0
        assert server.fileno() == server.socket.fileno()
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_bind_and_activate_false_leaves_socket_unbound() -> None:
    class ReuseServer(workers.TCPServer):
        allow_reuse_address = True

    server = ReuseServer(("127.0.0.1", 0), EchoLine, bind_and_activate=False)
    try:
        assert server.socket.getsockname()[1] == 0
        server.server_bind()
        server.server_activate()
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        assert round_trip_with_handle_request(server, b"x\n") == b"x\n"
    finally:
        server.server_close()


def test_failed_bind_closes_the_socket() -> None:
    created: list[socket.socket] = []

    class Recording(workers.TCPServer):
        def server_bind(self) -> None:
            created.append(self.socket)
            raise OSError("bind refused")

    with pytest.raises(OSError, match="bind refused"):
        Recording(("127.0.0.1", 0), EchoLine)
    assert created[0].fileno() == -1


# --- the request loop ----------------------------------------------------------------------


def test_serve_forever_in_thread_and_shutdown_returns() -> None:
    calls = []

    class Counting(workers.TCPServer):
        def service_actions(self) -> None:
            calls.append(1)

    server = Counting(("127.0.0.1", 0), EchoLine)
    with serving(server) as thread:
        assert round_trip(server, b"one\n") == b"one\n"
        assert round_trip(server, b"two\n") == b"two\n"
        assert thread.is_alive()
    assert calls  # service_actions() ran in the loop
    assert server.socket.fileno() == -1


def test_serve_forever_can_run_again_after_shutdown() -> None:
    with workers.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        for line in (b"first\n", b"second\n"):
            thread = threading.Thread(target=server.serve_forever, args=(0.05,))
            thread.start()
            try:
                assert round_trip(server, line) == line
            finally:
                server.shutdown()
                thread.join(CLIENT_TIMEOUT)
            assert not thread.is_alive()


def test_handle_request_timeout_calls_handle_timeout() -> None:
    timeouts = []

    class Impatient(workers.TCPServer):
        timeout = 0.05

        def handle_timeout(self) -> None:
            timeouts.append(time.monotonic())

    with Impatient(("127.0.0.1", 0), EchoLine) as server:
        started = time.monotonic()
        server.handle_request()
        assert len(timeouts) == 1
        assert timeouts[0] - started >= 0.05


def test_handle_request_honours_the_socket_timeout_too() -> None:
    timeouts = []

    class Recording(workers.TCPServer):
        def handle_timeout(self) -> None:
            timeouts.append(1)

    with Recording(("127.0.0.1", 0), EchoLine) as server:
        server.socket.settimeout(0.01)  # self.timeout is None: the socket's bounds the wait
        server.handle_request()
        assert timeouts == [1]


def test_context_manager_closes_the_socket() -> None:
    with workers.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        sock = server.socket
        assert sock.fileno() >= 0
    assert sock.fileno() == -1


def test_handle_request_noblock_returns_quietly_when_nothing_is_queued() -> None:
    with workers.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        server.socket.setblocking(False)  # as the cluster's shared listeners are
        assert server._handle_request_noblock() is None  # accept() raised BlockingIOError
        with stream_client(server) as client:
            client.sendall(b"late\n")
            readable, _, _ = select.select([server], [], [], CLIENT_TIMEOUT)
            assert readable
            server._handle_request_noblock()
            assert read_to_eof(client) == b"late\n"


def test_handle_accepted_processes_a_request_taken_by_the_caller() -> None:
    with workers.TCPServer(("127.0.0.1", 0), EchoLine) as server:
        with stream_client(server) as client:
            client.sendall(b"taken\n")
            request, client_address = server.get_request()
            server._handle_accepted(request, client_address)
            assert read_to_eof(client) == b"taken\n"
        assert request.fileno() == -1


def test_verify_request_false_drops_the_request() -> None:
    handled = []

    class Recording(EchoLine):
        def handle(self) -> None:
            handled.append(1)

    class Refusing(workers.TCPServer):
        def verify_request(self, request: object, client_address: object) -> bool:
            return False

    with Refusing(("127.0.0.1", 0), Recording) as server, stream_client(server) as client:
        client.sendall(b"hello\n")
        server.handle_request()
        assert read_to_eof(client) == b""
    assert handled == []


def test_failing_handler_is_logged_and_the_next_request_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="workers")
    with workers.TCPServer(("127.0.0.1", 0), FailOnBoom) as server:
        with stream_client(server) as client:
            failing_address = client.getsockname()
            client.sendall(b"boom\n")
            server.handle_request()
            assert read_to_eof(client) == b""
        assert round_trip_with_handle_request(server, b"fine\n") == b"fine\n"

    records = [r for r in caplog.records if r.name == "workers"]
    assert len(records) == 1
    (record,) = records
    assert record.levelno == logging.ERROR
    assert repr(failing_address) in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


# --- handlers ------------------------------------------------------------------------------


def test_buffered_wfile_is_flushed_by_finish_and_nagle_can_be_disabled() -> None:
    nodelay = []

    class Buffered(workers.StreamRequestHandler):
        wbufsize = -1
        disable_nagle_algorithm = True
        timeout = CLIENT_TIMEOUT

        def handle(self) -> None:
            nodelay.append(self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            assert self.connection.gettimeout() == CLIENT_TIMEOUT
            self.wfile.write(self.rfile.readline().upper())  # stays buffered until finish()

    with workers.TCPServer(("127.0.0.1", 0), Buffered) as server:
        assert round_trip_with_handle_request(server, b"quiet\n") == b"QUIET\n"
    assert nodelay and nodelay[0] != 0


def test_socket_writer_sends_everything_and_counts_bytes() -> None:
    numbers = array.array("i", range(1000))
    written = []

    class Writer(workers.StreamRequestHandler):
        def handle(self) -> None:
            written.append(self.wfile.write(numbers))  # not bytes: counted in bytes anyway

        def finish(self) -> None:
            super().finish()
            assert self.rfile.closed and self.wfile.closed
            self.connection.shutdown(socket.SHUT_WR)

    left, right = socket.socketpair()
    with left, right:
        Writer(left, "peer", None)
        assert written == [numbers.itemsize * len(numbers)]
        assert read_to_eof(right) == numbers.tobytes()


def test_stdlib_stream_handler_served_by_workers_tcp_server() -> None:
    class Upper(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())

    with workers.TCPServer(("127.0.0.1", 0), Upper) as server:
        assert round_trip_with_handle_request(server, b"stdlib\n") == b"STDLIB\n"


def test_http_handler_served_by_workers_threading_tcp_server() -> None:
    from tests.apps.testapps import StdlibHTTP

    server = workers.ThreadingTCPServer(("127.0.0.1", 0), StdlibHTTP)
    with serving(server):
        host, port = server.server_address
        for path in ("/a", "/b"):
            conn = http.client.HTTPConnection(host, port, timeout=CLIENT_TIMEOUT)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                assert response.status == 200
                assert response.read() == f"path={path}".encode()
            finally:
                conn.close()


# --- threads -------------------------------------------------------------------------------


def test_threading_server_serves_two_slow_requests_concurrently() -> None:
    both_inside = threading.Barrier(2, timeout=CLIENT_TIMEOUT)

    class Slow(workers.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            both_inside.wait()  # breaks (and the reply is lost) if requests ran one by one
            self.wfile.write(line)

    server = workers.ThreadingTCPServer(("127.0.0.1", 0), Slow)
    with serving(server):
        results: dict[bytes, bytes] = {}

        def client(line: bytes) -> None:
            results[line] = round_trip(server, line)

        clients = [threading.Thread(target=client, args=(line,)) for line in (b"a\n", b"b\n")]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(CLIENT_TIMEOUT)
        assert not any(thread.is_alive() for thread in clients)
    assert results == {b"a\n": b"a\n", b"b\n": b"b\n"}


def test_threading_server_close_joins_request_threads() -> None:
    release = threading.Event()
    finished = []

    class Lingering(workers.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())
            release.wait(CLIENT_TIMEOUT)
            finished.append(threading.current_thread())

    server = workers.ThreadingTCPServer(("127.0.0.1", 0), Lingering)
    with stream_client(server) as client:
        client.sendall(b"x\n")
        server.handle_request()
        assert read_line(client) == b"x\n"
        release.set()
        server.server_close()  # must not return before the request thread has finished
    assert len(finished) == 1
    assert not finished[0].is_alive()


def test_threading_server_drops_finished_threads_when_a_request_starts() -> None:
    """As Python 3.11 does (bpo-37193): each new request thread sweeps out the finished ones,
    so after 10 sequential requests fewer than 10 are kept."""
    with workers.ThreadingTCPServer(("127.0.0.1", 0), EchoLine) as server:
        for i in range(10):
            line = b"%d\n" % i
            assert round_trip_with_handle_request(server, line) == line
        assert len(server._threads) < 10


# --- forking -------------------------------------------------------------------------------


@needs_fork
def test_forking_server_close_waits_for_its_children(tmp_path: Path) -> None:
    server = workers.ForkingTCPServer(("127.0.0.1", 0), EchoThenWaitForEOF)
    server.marker_dir = tmp_path
    clients = [stream_client(server) for _ in range(3)]
    try:
        pids = []
        for client in clients:
            client.sendall(b"hi\n")
            pids.append(fork_pid(server))
        for client in clients:
            assert read_line(client) == b"hi\n"  # every child is alive, waiting for EOF
        assert server.active_children == set(pids)
        for client in clients:
            # shutdown(), not close(): later children inherited this process's client sockets.
            client.shutdown(socket.SHUT_WR)
        server.server_close()
    finally:
        for client in clients:
            client.close()
    assert server.active_children == set()
    for pid in pids:
        assert (tmp_path / str(pid)).read_text() == "done"
        assert_collected(pid)


@needs_fork
def test_forking_child_exit_status_reflects_handler_outcome() -> None:
    with workers.ForkingTCPServer(("127.0.0.1", 0), FailOnBoom) as server:
        statuses = {}
        for line in (b"fine\n", b"boom\n"):
            with stream_client(server) as client:
                client.sendall(line)
                pid = fork_pid(server)
                read_to_eof(client)
            # Collect it ourselves to see the status; the server must then forget it.
            _, status = os.waitpid(pid, 0)
            server.active_children.discard(pid)
            statuses[line] = os.waitstatus_to_exitcode(status)
    assert statuses == {b"fine\n": 0, b"boom\n": 1}


@needs_fork
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "waitpid-fallback"])
def test_forking_server_blocks_at_max_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_pidfd: bool
) -> None:
    if not use_pidfd:
        monkeypatch.setattr(workers.mixins, "_pidfd_open", None)
    elif workers.mixins._pidfd_open is None:
        pytest.skip("no os.pidfd_open here")

    class Bounded(workers.ForkingTCPServer):
        max_children = 2

    server = Bounded(("127.0.0.1", 0), EchoThenWaitForEOF)
    server.marker_dir = tmp_path
    clients = [stream_client(server) for _ in range(3)]
    try:
        for client in clients:
            client.sendall(b"hi\n")
        first = fork_pid(server)
        second = fork_pid(server)
        for client in clients[:2]:
            assert read_line(client) == b"hi\n"
        assert server.active_children == {first, second}

        # At the limit: the next request must wait for a child to exit, and collect it,
        # before forking. Let the first one go; the third request then takes its slot.
        clients[0].shutdown(socket.SHUT_WR)
        third = fork_pid(server)
        assert server.active_children == {second, third}
        assert (tmp_path / str(first)).exists()
        assert_collected(first)
        assert read_line(clients[2]) == b"hi\n"

        for client in clients[1:]:
            client.shutdown(socket.SHUT_WR)
        server.server_close()
    finally:
        for client in clients:
            client.close()
    assert server.active_children == set()
    for pid in (second, third):
        assert_collected(pid)


@needs_fork
def test_collect_children_at_the_limit_from_service_actions(tmp_path: Path) -> None:
    class Bounded(workers.ForkingTCPServer):
        max_children = 1

    server = Bounded(("127.0.0.1", 0), EchoThenWaitForEOF)
    server.marker_dir = tmp_path
    try:
        with stream_client(server) as client:
            client.sendall(b"hi\n")
            pid = fork_pid(server)
            assert read_line(client) == b"hi\n"
            client.shutdown(socket.SHUT_WR)
            server.service_actions()  # at the limit: blocks until the child is collected
        assert server.active_children == set()
        assert_collected(pid)
    finally:
        server.server_close()


@needs_fork
def test_forking_server_never_collects_a_foreign_child() -> None:
    foreign = os.fork()
    if foreign == 0:
        os._exit(7)
    try:
        # Wait until it has exited, leaving its status in place (WNOWAIT).
        os.waitid(os.P_PID, foreign, os.WEXITED | os.WNOWAIT)

        class Bounded(workers.ForkingTCPServer):
            max_children = 1  # every request after the first hits the limit path

        with Bounded(("127.0.0.1", 0), EchoLine) as server:
            for i in range(3):
                line = b"%d\n" % i
                with stream_client(server) as client:
                    client.sendall(line)
                    server.handle_request()
                    assert read_to_eof(client) == line
                server.service_actions()
            server.collect_children(blocking=True)
        assert server.active_children == set()
    finally:
        _, status = os.waitpid(foreign, 0)
    assert os.waitstatus_to_exitcode(status) == 7


@needs_fork
def test_forking_handle_timeout_collects_children() -> None:
    class Quick(workers.ForkingTCPServer):
        timeout = 0.01

    assert workers.ForkingMixIn.timeout == 300
    with Quick(("127.0.0.1", 0), EchoLine) as server:
        with stream_client(server) as client:
            client.sendall(b"x\n")
            pid = fork_pid(server)
            assert read_to_eof(client) == b"x\n"
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # the child has exited
        server.handle_request()  # nothing comes: handle_timeout() collects the child
        assert server.active_children == set()
        assert_collected(pid)


# --- the module as a drop-in for socketserver ------------------------------------------------


def test_import_workers_as_socketserver_exposes_the_stdlib_api() -> None:
    for name in socketserver.__all__:
        ours = getattr(socketserver_compat, name)
        assert ours is not getattr(socketserver, name), name  # our own, not a re-export
        assert ours.__module__.startswith("workers."), name
    extra = (
        {"ForkingUnixStreamServer", "ForkingUnixDatagramServer"} if HAS_UNIX and HAS_FORK else set()
    )
    assert sorted(workers.__all__) == sorted({*socketserver.__all__, *extra})  # as in 3.12
    if HAS_UNIX and HAS_FORK:
        assert issubclass(workers.ForkingUnixStreamServer, workers.UnixStreamServer)
        assert issubclass(workers.ForkingUnixDatagramServer, workers.UnixDatagramServer)


def test_class_attributes_match_the_stdlib_defaults() -> None:
    assert workers.BaseServer.timeout is None
    assert workers.TCPServer.request_queue_size == 5
    assert workers.TCPServer.allow_reuse_address is False
    assert workers.TCPServer.allow_reuse_port is False
    assert workers.UDPServer.max_packet_size == 8192
    assert workers.UDPServer.socket_type == socket.SOCK_DGRAM
    assert workers.ThreadingMixIn.daemon_threads is False
    assert workers.ThreadingMixIn.block_on_close is True
    assert workers.StreamRequestHandler.rbufsize == -1
    assert workers.StreamRequestHandler.wbufsize == 0
    assert workers.StreamRequestHandler.timeout is None
    assert workers.StreamRequestHandler.disable_nagle_algorithm is False
    if HAS_FORK:
        assert workers.ForkingMixIn.max_children == 40
        assert workers.ForkingMixIn.active_children is None
        assert workers.ForkingMixIn.block_on_close is True
    assert workers.ThreadingUDPServer.__mro__[1:3] == (workers.ThreadingMixIn, workers.UDPServer)

"""The cluster end to end: real masters, real sockets, real signals."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import (
    read_line,
    stream_roundtrip,
    tcp_connect,
    udp_roundtrip,
    unix_connect,
    unix_dgram_roundtrip,
)
from tests.procs import alive, children, state, tcp_listener, wait_for, zombies_of
from workers.runtime import modes

pytestmark = pytest.mark.timeout(60)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


MODES = list(modes.names())


@pytest.mark.parametrize("mode", MODES)
def test_echo_on_all_four_transports(start_cluster, tmp_path: Path, mode: str) -> None:
    stream_path, dgram_path = str(tmp_path / "s.sock"), str(tmp_path / "d.sock")
    cluster = start_cluster(
        "echo", "-w", "2", "-k", mode, "-b", "tcp://127.0.0.1:0", "-b", "udp://127.0.0.1:0",
        "-b", f"unix:{stream_path}", "-b", f"unix-dgram:{dgram_path}",
    )  # fmt: skip
    payload = os.urandom(100_000)
    assert stream_roundtrip(tcp_connect(cluster.address("tcp")), payload) == payload
    assert udp_roundtrip(cluster.address("udp"), b"datagram") == b"datagram"
    assert stream_roundtrip(unix_connect(stream_path), payload) == payload
    client = str(tmp_path / "client.sock")
    assert unix_dgram_roundtrip(dgram_path, b"unix datagram", client) == b"unix datagram"
    assert cluster.address("tcp")[1] != 0  # port 0 resolved in the log line
    assert f"ready: 2 workers ({mode})" in cluster.log


@pytest.mark.skipif(not has_ipv6(), reason="this machine has no IPv6 loopback")
def test_echo_on_ipv6_loopback(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "1", "-b", "[::1]:0", "-b", "udp://[::1]:0")
    assert cluster.uris[0].startswith("tcp://[::1]:")
    assert stream_roundtrip(tcp_connect(cluster.address("tcp")), b"six") == b"six"
    assert udp_roundtrip(cluster.address("udp"), b"six") == b"six"


def test_each_datagram_is_taken_by_exactly_one_worker(start_cluster) -> None:
    cluster = start_cluster("testapps:Pid", "-w", "2", "-b", "udp://127.0.0.1:0")
    family_address = cluster.address("udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for _ in range(50):
            sock.sendto(b"x", family_address)
        replies = [sock.recvfrom(100)[0] for _ in range(50)]
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # exactly 50 replies: no datagram served twice
            sock.recvfrom(100)
    assert {int(r) for r in replies} <= set(cluster.workers())


def test_two_workers_serve_two_slow_requests_at_once(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "2", "-b", "127.0.0.1:0")
    first, second = tcp_connect(cluster.address()), tcp_connect(cluster.address())
    with first, second:
        started = [read_line(first), read_line(second)]  # both start before either finishes
        pids = {int(line.split()[1]) for line in started}
        assert len(pids) == 2 and pids <= set(cluster.workers())
        for sock in (first, second):
            sock.sendall(b"finish\n")
            assert read_line(sock).startswith(b"done")


def test_killed_worker_is_replaced_and_reaped(start_cluster) -> None:
    cluster = start_cluster("testapps:Pid", "-w", "2", "-b", "127.0.0.1:0")
    before = set(cluster.workers())
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replaced = wait_for(lambda: len(set(cluster.workers()) - before) == 1 and len(cluster.workers()) == 2,
                        timeout=2.0, what="a new worker")  # fmt: skip
    assert replaced
    new_pid = (set(cluster.workers()) - before).pop()
    served: set[int] = set()
    while new_pid not in served:  # the new worker really serves
        served.add(int(stream_roundtrip(tcp_connect(cluster.address()), b"")))
        assert time.monotonic() - killed_at < 10
    assert not zombies_of(cluster.pid)
    assert state(victim) is None
    cluster.wait_log(rf"worker {victim} \(slot \d\) died: killed by SIGKILL")


@pytest.mark.parametrize("mode", MODES)
def test_term_lets_the_in_flight_request_finish(start_cluster, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "master.pid"
    cluster = start_cluster(
        "testapps:Gate", "-w", "2", "-k", mode, "-b", "127.0.0.1:0", "--pidfile", str(pidfile)
    )
    assert pidfile.read_text().strip() == str(cluster.pid)
    with tcp_connect(cluster.address()) as sock:
        assert read_line(sock).startswith(b"started")
        workers = cluster.workers()  # in fork mode, the request's child too
        cluster.signal(signal.SIGTERM)
        cluster.wait_log("graceful stop")
        assert alive(cluster.pid)
        sock.sendall(b"finish\n")
        assert read_line(sock).startswith(b"done")
    assert cluster.wait_exit() == 0
    assert not any(alive(pid) for pid in workers)
    assert not pidfile.exists()


@pytest.mark.parametrize("mode", MODES)
def test_int_stops_quickly_even_with_a_request_in_flight(start_cluster, mode: str) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "2", "-k", mode, "-b", "127.0.0.1:0")
    with tcp_connect(cluster.address()) as sock:
        assert read_line(sock).startswith(b"started")
        workers = cluster.workers()
        started = time.monotonic()
        cluster.signal(signal.SIGINT)
        assert cluster.wait_exit(timeout=5) == 0
        assert time.monotonic() - started < 3
        assert sock.recv(100) in (b"",)  # the worker is gone, its connection closed
    assert not any(alive(pid) for pid in workers)


def test_quit_stops_quickly(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0")
    workers = cluster.workers()
    cluster.signal(signal.SIGQUIT)
    assert cluster.wait_exit(timeout=5) == 0
    assert not any(alive(pid) for pid in workers)


def test_stdlib_and_http_server_handlers_run_unchanged(start_cluster) -> None:
    cluster = start_cluster(
        "testapps:StdlibUpper", "-w", "1", "-b", "127.0.0.1:0",
        "-b", "127.0.0.1:0=testapps:StdlibHTTP",
    )  # fmt: skip
    upper_uri, http_uri = cluster.uris
    upper = ("127.0.0.1", int(upper_uri.rsplit(":", 1)[1]))
    web = ("127.0.0.1", int(http_uri.rsplit(":", 1)[1]))
    assert stream_roundtrip(tcp_connect(upper), b"shout\n") == b"SHOUT\n"
    conn = http.client.HTTPConnection(*web, timeout=10)
    try:
        for path in ("/a", "/b"):  # two requests on one kept-alive connection
            conn.request("GET", path)
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, f"path={path}".encode())
    finally:
        conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_handler_error_is_logged_and_the_worker_serves_on(start_cluster, mode: str) -> None:
    cluster = start_cluster("testapps:Boom", "-w", "1", "-k", mode, "-b", "127.0.0.1:0")
    worker = cluster.workers()
    with tcp_connect(cluster.address()) as sock:
        sock.sendall(b"boom\n")
        client_port = sock.getsockname()[1]
        assert sock.recv(10) == b""  # the failed request is closed
    cluster.wait_log(rf"127\.0\.0\.1', {client_port}\)")
    cluster.wait_log("RuntimeError: boom requested by the client")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"again\n") == b"again\n"
    assert set(worker) <= set(cluster.workers())  # same worker, it did not die


def test_http_hello_keeps_alive(start_cluster) -> None:
    cluster = start_cluster("http-hello", "-w", "1", "-b", "127.0.0.1:0")
    conn = http.client.HTTPConnection(*cluster.address(), timeout=10)
    try:
        ports = set()
        for _ in range(3):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"Hello, world!\n")
            assert response.getheader("Connection") is None
            ports.add(conn.sock.getsockname()[1])
        assert len(ports) == 1  # all three on one kept-alive connection
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.getheader("Connection") == "close" and response.read() == b"Hello, world!\n"
        assert conn.sock is None  # the client saw the close, as the server asked
    finally:
        conn.close()


def test_process_titles(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--name", "titled")
    with open(f"/proc/{cluster.pid}/cmdline", "rb") as fh:
        assert fh.read().startswith(b"cluster: master [titled]")
    (worker,) = cluster.workers()
    with open(f"/proc/{worker}/cmdline", "rb") as fh:
        assert fh.read().startswith(b"cluster: worker [titled] sync")


def test_workers_hold_only_their_own_fds(start_cluster) -> None:
    """A worker closes the master's private fds and its siblings' pipes: every worker holds the
    same fds whatever its place in the fork order, one epoll (its own) and one listener."""
    cluster = start_cluster("echo", "-w", "3", "-b", "127.0.0.1:0")
    held = {}
    for worker in cluster.workers():
        fd_dir = f"/proc/{worker}/fd"
        held[worker] = sorted(os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir))
    counts = {len(targets) for targets in held.values()}
    assert len(counts) == 1, held
    for targets in held.values():
        assert sum(t == "anon_inode:[eventpoll]" for t in targets) == 1, targets
        assert sum(t.startswith("socket:") for t in targets) == 1, targets


def test_no_zombies_after_many_worker_deaths(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0")
    for _ in range(5):
        victim = cluster.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda v=victim: state(v) is None and len(children(cluster.pid)) == 2, 5, "respawn"
        )
    assert not zombies_of(cluster.pid)


def test_a_saturated_listener_does_not_starve_another(start_cluster) -> None:
    """One sync worker, two listeners, a backlog queued on both: it takes from them in turn."""
    # No waiting room, no TCP_DEFER_ACCEPT: the silent blocker below must hold the one worker.
    cluster = start_cluster("testapps:Sequence", "-w", "1", "-b", "127.0.0.1:0",
                            "-b", "127.0.0.1:0", "--no-waiting-room", "--no-defer-accept")  # fmt: skip
    first, second = (("127.0.0.1", int(uri.rsplit(":", 1)[1])) for uri in cluster.uris)
    blocker = tcp_connect(first)  # sends nothing yet: the only worker waits on it
    wait_for(lambda: cluster.workers() and accept_queue_empty(first), 5, "the blocker accepted")
    queued = [(name, tcp_connect(address)) for _ in range(3)
              for name, address in (("a", first), ("b", second))]  # fmt: skip
    for _, sock in queued:
        sock.sendall(b"x\n")
    blocker.sendall(b"x\n")
    assert read_line(blocker) == b"0\n"
    blocker.close()
    order = {}
    for name, sock in queued:
        with sock:
            order[int(read_line(sock))] = name
    taken = [order[n] for n in sorted(order)]
    assert sorted(order) == [1, 2, 3, 4, 5, 6]
    assert taken[:4].count("a") == 2 and taken[:4].count("b") == 2, taken


def accept_queue_empty(address: tuple[str, int]) -> bool:
    """No connection waits in the accept queue of our listener on 127.0.0.1:PORT."""
    found = tcp_listener(address[1])
    return found is not None and found[0] == 0

"""Supervision: hung-request kills, recycling, boot failures, crash loops, orphans, idle cost."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.apps.testapps import Gate
from tests.conftest import read_line, stream_roundtrip, tcp_connect
from tests.procs import (
    alive,
    descendants,
    gone,
    holds_for,
    own_cpu,
    request_children,
    wait_for,
)
from workers.runtime import modes

pytestmark = pytest.mark.timeout(90)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_hung_worker_is_dumped_and_replaced(start_cluster, mode: str) -> None:
    cluster = start_cluster("testapps:Hang", "-w", "2", "-k", mode, "--timeout", "1",
                            "-b", "127.0.0.1:0")  # fmt: skip
    before = set(cluster.workers())
    hung = tcp_connect(cluster.address())
    hung.sendall(b"hang\n")
    client = f"127.0.0.1:{hung.getsockname()[1]}"
    started = time.monotonic()
    # Meanwhile the other worker keeps serving.
    assert stream_roundtrip(tcp_connect(cluster.address()), b"fine\n") == b"fine\n"
    match = cluster.wait_log(
        r"worker (\d+) \(slot \d\): request from (\S+) has made no progress", timeout=6
    )
    victim = int(match.group(1))
    assert victim in before and match.group(2) == client
    wait_for(lambda: not alive(victim) and len(set(cluster.workers()) - before) == 1, 6,
             "the hung worker replaced")  # fmt: skip
    assert time.monotonic() - started < 3.5  # timeout, a scan, the KILL grace, and slack
    cluster.wait_log("in hang_forever")  # faulthandler's dump names the handler's function
    with hung:
        hung.settimeout(5)
        try:
            assert hung.recv(10) == b""  # the client sees its connection closed
        except ConnectionResetError:
            pass
    assert stream_roundtrip(tcp_connect(cluster.address()), b"after\n") == b"after\n"


@pytest.mark.slow
def test_fork_mode_kills_the_hung_child_not_the_worker(start_cluster) -> None:
    cluster = start_cluster("testapps:Hang", "-w", "1", "-k", "fork", "--timeout", "1",
                            "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    hung = tcp_connect(cluster.address())
    hung.sendall(b"hang\n")
    child = wait_for(lambda: request_children(worker), 5, "the request child")[0]
    cluster.wait_log(
        rf"request child {child} \(client \('127\.0\.0\.1', \d+\)\) made no progress", timeout=6
    )
    wait_for(lambda: child not in request_children(worker), 6, "the hung child killed")
    cluster.wait_log("in hang_forever")
    with hung:
        hung.settimeout(5)
        assert hung.recv(10) == b""
    assert alive(worker) and cluster.workers() == [worker]
    assert stream_roundtrip(tcp_connect(cluster.address()), b"next\n") == b"next\n"


def test_idle_workers_are_never_killed(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "2", "--timeout", "1", "-b", "127.0.0.1:0")
    workers = sorted(cluster.workers())
    holds_for(lambda: sorted(cluster.workers()) == workers, 2.5, "the same two workers")
    assert "timeout" not in cluster.log.lower() and "died" not in cluster.log


def test_max_requests_recycles_exactly(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "1", "--max-requests", "10", "--max-requests-jitter",
                            "0", "-b", "127.0.0.1:0")  # fmt: skip
    for n in range(35):
        payload = b"request %d" % n
        assert stream_roundtrip(tcp_connect(cluster.address()), payload) == payload
    recycles = lambda: cluster.log.count("recycling after 10 requests")  # noqa: E731
    wait_for(lambda: recycles() == 3, 10, "three recycles")
    wait_for(lambda: cluster.log.count("exited with code 0 after 10 requests") == 3, 10,
             "the three recycled workers' exits")  # fmt: skip
    assert recycles() == 3 and "died" not in cluster.log


def test_worker_boot_failure_stops_with_exit_3(start_cluster) -> None:
    started = time.monotonic()
    cluster = start_cluster("bootfail:Handler", "-w", "2", "--log-level", "debug",
                            "-b", "127.0.0.1:0", wait=False)  # fmt: skip
    assert cluster.wait_exit(timeout=10) == 3
    assert time.monotonic() - started < 10
    assert cluster.log.count("spawned worker") <= 5
    assert "this app cannot boot in a worker" in cluster.log
    assert "workers cannot boot" in cluster.log


@pytest.mark.slow
def test_crash_loop_forks_at_a_bounded_rate(start_cluster) -> None:
    cluster = start_cluster("testapps:Crash", "-w", "1", "--log-level", "debug",
                            "-b", "127.0.0.1:0")  # fmt: skip
    deadline = time.monotonic() + 3
    requests = 0
    while time.monotonic() < deadline:  # bounded in time: 3 s of requests, each one a crash
        try:
            with tcp_connect(cluster.address(), timeout=0.5) as sock:
                sock.sendall(b"x")
                sock.recv(10)
        except OSError:
            pass
        requests += 1
    forks = cluster.log.count("spawned worker")
    assert requests > forks  # the client tried much more often than the master forked
    assert forks <= 10, forks  # backoff: a few forks per second at most
    stop = time.monotonic()
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit(timeout=10) == 0
    assert time.monotonic() - stop < 5  # responsive to TERM throughout


@pytest.mark.parametrize("mode", list(modes.names()))
def test_kill_9_of_the_master_leaves_no_process(start_cluster, mode: str) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "2", "-k", mode, "-b", "127.0.0.1:0")
    with tcp_connect(cluster.address()) as sock:
        assert read_line(sock).startswith(b"started")  # a live request (a child in fork mode)
        everyone = descendants(cluster.pid)
        # fork mode: the child serving our request too
        assert len(everyone) == (3 if mode == "fork" else 2)
        os.kill(cluster.pid, signal.SIGKILL)
        cluster.wait_exit(timeout=5)
        wait_for(lambda: all(gone(pid) for pid in everyone), 2.0, "every worker and child gone")


def test_kill_9_of_the_master_ends_a_stopped_worker_too(start_cluster) -> None:
    """A worker stopped (SIGSTOP) when the master dies is killed all the same: it would
    otherwise hold the listeners until someone continued it."""
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0")
    stopped, other = cluster.workers()
    os.kill(stopped, signal.SIGSTOP)
    os.kill(cluster.pid, signal.SIGKILL)
    cluster.wait_exit(timeout=5)
    wait_for(lambda: gone(stopped) and gone(other), 3.0, "both workers gone")


def test_scoreboard_shows_busy_then_idle() -> None:
    from cluster import PreforkTCPServer

    server = PreforkTCPServer(("127.0.0.1", 0), Gate, workers=1)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    pids: list[int] = []
    try:
        assert server.wait_ready(20)
        pids = server.worker_pids
        (entry,) = server.status()["workers"]
        assert (entry["state"], entry["requests"], entry["request_age"]) == ("idle", 0, None)
        sock = tcp_connect(server.server_address)
        assert read_line(sock).startswith(b"started")
        first = server.status()["workers"][0]
        assert first["state"] == "busy" and first["client"] == f"127.0.0.1:{sock.getsockname()[1]}"
        wait_for(lambda: server.status()["workers"][0]["request_age"] > first["request_age"] + 0.1,
                 5, "the request's age to grow")  # fmt: skip
        sock.sendall(b"finish\n")
        assert read_line(sock).startswith(b"done")
        sock.close()
        wait_for(lambda: server.status()["workers"][0]["state"] == "idle", 5, "idle again")
        after = server.status()["workers"][0]
        assert after["requests"] == 1 and after["request_age"] is None
    finally:
        server.shutdown()
        thread.join(20)
        server.server_close()
        for pid in pids:
            assert gone(pid) or not alive(pid)


def test_idle_master_barely_uses_cpu(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0")
    before, started = own_cpu(cluster.pid), time.monotonic()
    holds_for(lambda: alive(cluster.pid), 2, "the master")
    used = own_cpu(cluster.pid) - before
    assert used / (time.monotonic() - started) < 0.02  # generous; the tight figure: bench


def test_worker_out_of_fds_pauses_instead_of_spinning_and_recovers(start_cluster) -> None:
    cluster = start_cluster("fdlimit:Handler", "-w", "1", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    sock = tcp_connect(cluster.address())
    sock.sendall(b"queued meanwhile")
    cluster.wait_log("cannot accept on .*Too many open files")
    before, started = own_cpu(worker), time.monotonic()
    holds_for(lambda: alive(worker), 1.0, "the worker")
    assert (own_cpu(worker) - before) / (time.monotonic() - started) < 0.2  # no spin
    assert cluster.log.count("cannot accept") == 1  # said once, not per attempt
    os.kill(worker, signal.SIGWINCH)  # the app lifts its fd limit again
    assert stream_roundtrip(sock, b"") == b"queued meanwhile"  # served once fds are back
    cluster.wait_log(f"worker {worker} accepting again")

"""fork mode's fork server under the faults an operator or an attacker brings: what each
costs (the requests in flight, at most their worker) and what it must never cost (a worker
left waiting for children that are gone, a process left behind)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import (
    closed_unanswered,
    read_all,
    stream_roundtrip,
    tcp_connect,
    unix_dgram_roundtrip,
)
from tests.procs import (
    alive,
    children,
    gone,
    is_fork_server,
    request_children,
    wait_for,
)
from tests.test_forkserver import boom_logging_to_a_file, fork_server_of
from tests.test_modes import finish, started_pid

pytestmark = pytest.mark.timeout(60)


def test_a_full_worker_whose_fork_server_is_killed_stops_at_once(start_cluster) -> None:
    """Every lane busy when the fork server dies: its children died with it, so the worker
    has nothing to wait for and stops now, not at the watchdog's or the graceful timeout's
    end (30 s here), and the master replaces it."""
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", "fork", "--max-children", "2",
                            "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    busy = [tcp_connect(cluster.address()) for _ in range(2)]
    kids = [started_pid(sock) for sock in busy]
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: all(gone(pid) for pid in kids), 5, "its children, gone with it")
    wait_for(lambda: gone(worker), 5, "the worker stopped at once")
    cluster.wait_log(rf"worker {worker} \(slot 0\) died: exited with code 66 .*\(killed\); "
                     "replacing it now")  # fmt: skip
    assert "made no progress" not in cluster.log  # no --timeout on the dead children
    (replacement,) = wait_for(lambda: [pid for pid in cluster.workers() if pid != worker], 10,
                              "a new worker")  # fmt: skip
    with tcp_connect(cluster.address()) as sock:
        started_pid(sock)
        finish(sock)
    assert alive(replacement)
    for sock in busy:
        sock.close()


def test_a_full_worker_whose_fork_server_is_stopped_kills_it_and_is_replaced(
    start_cluster,
) -> None:
    """SIGSTOP on the fork server while the worker's one lane is busy: that request ends, but
    a stopped fork server cannot reap it nor say so, and the worker, full, would wait for its
    lane for good (heartbeating, so no watchdog helps). It asks the fork server whether it
    still answers; after --timeout (2 s) of silence it kills it and stops, and the client
    waiting meanwhile in the listen queue is served by the replacement."""
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", "fork", "--max-children", "1",
                            "--timeout", "2", "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    with tcp_connect(cluster.address()) as first:
        started_pid(first)
        os.kill(server, signal.SIGSTOP)
        finish(first)
    with tcp_connect(cluster.address(), timeout=15) as waiting:
        cluster.wait_log(rf"its fork server {server} did not answer within 2s \(killed\)")
        wait_for(lambda: gone(server) and gone(worker), 5, "the fork server and its worker")
        assert started_pid(waiting) != 0
        finish(waiting)


def test_a_worker_that_cannot_fork_its_fork_server_forks_its_children_itself(
    pids_cgroup: Path,  # first: the cgroup outlives the cluster
    start_cluster,
) -> None:
    """The master in a pids cgroup with room for it and one worker: the replacement of a
    killed worker cannot fork its fork server (EAGAIN). It says so in one line, no
    traceback, and serves, forking its request children itself: refused while the cap
    holds (one line), served once it is raised."""
    cluster = start_cluster("echo", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    (pids_cgroup / "cgroup.procs").write_text(str(cluster.pid))
    used = int((pids_cgroup / "pids.current").read_text())
    (pids_cgroup / "pids.max").write_text(str(used + 1))  # one worker more, no fork server
    os.kill(worker, signal.SIGKILL)
    cluster.wait_log(r"worker (\d+) cannot fork its fork server: Resource temporarily "
                     r"unavailable; it forks its request children itself")  # fmt: skip
    (replacement,) = wait_for(lambda: [pid for pid in cluster.workers() if pid != worker], 10,
                              "the replacement")  # fmt: skip
    assert closed_unanswered(cluster.address(), b"refused")
    cluster.wait_log(rf"worker {replacement} cannot fork for a request")
    (pids_cgroup / "pids.max").write_text("max")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"served") == b"served"
    assert alive(replacement) and not [pid for pid in children(replacement)
                                       if is_fork_server(pid)]  # fmt: skip
    assert "Traceback" not in cluster.log
    assert cluster.log.count("cannot fork its fork server") == 1


def test_usr1_reaches_the_running_children_of_a_worker_without_fork_server(
    pids_cgroup: Path,  # first: the cgroup outlives the cluster
    start_cluster,
    tmp_path: Path,
) -> None:
    """A worker that forks its request children itself (it could not fork its fork server)
    passes USR1 on to them as a fork server does: a child forked before the log rotation
    writes its error to the new file."""
    cluster, main, port = boom_logging_to_a_file(start_cluster, tmp_path)
    (worker,) = cluster.workers()
    (pids_cgroup / "cgroup.procs").write_text(str(cluster.pid))
    used = int((pids_cgroup / "pids.current").read_text())
    (pids_cgroup / "pids.max").write_text(str(used + 1))  # one worker more, no fork server
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: "it forks its request children itself" in main.read_text(), 20,
             "the replacement, without a fork server")  # fmt: skip
    (replacement,) = wait_for(lambda: [pid for pid in cluster.workers() if pid != worker], 10,
                              "the replacement")  # fmt: skip
    (pids_cgroup / "pids.max").write_text("max")
    with tcp_connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"bo")  # half its line: its child is forked, and waits for the rest
        wait_for(lambda: children(replacement), 10, "its request child")
        main.rename(tmp_path / "main.log.1")
        cluster.signal(signal.SIGUSR1)
        wait_for(lambda: main.exists() and f"worker {replacement} reopened" in main.read_text(),
                 10, "the worker's reopen")  # fmt: skip
        sock.sendall(b"om\n")
        assert read_all(sock) == b""  # the handler raised: the connection ends
    wait_for(lambda: "RuntimeError: boom" in main.read_text(), 10, "the child's error, new file")
    assert "RuntimeError" not in (tmp_path / "main.log.1").read_text()


def test_datagrams_with_nowhere_to_answer_cost_no_traceback(start_cluster, tmp_path: Path) -> None:
    """unix-dgram senders that never bound a name (no address to answer), or that are gone
    by the time the reply goes out: each is the client's problem; the echo child says
    nothing about it, and the next client is answered."""
    path = str(tmp_path / "d.sock")
    cluster = start_cluster("echo", "-w", "1", "-k", "fork", "-b", f"unix-dgram:{path}")
    (worker,) = cluster.workers()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
        for _ in range(3):
            unbound.sendto(b"nowhere", path)
    gone_path = str(tmp_path / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as leaving:
        leaving.bind(gone_path)
        leaving.sendto(b"gone", path)
    os.unlink(gone_path)
    reply = unix_dgram_roundtrip(path, b"next", str(tmp_path / "client.sock"))
    assert reply == b"next"
    wait_for(lambda: not request_children(worker), 5, "every child done (its log written)")
    assert "Traceback" not in cluster.log

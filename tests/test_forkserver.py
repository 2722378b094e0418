"""fork mode's fork server (``workers.runtime.forkserver``) and the fork it uses
(``workers.runtime.quickfork``): who forks the request children, what a child still gets
from the interpreter, and what a failing fork server costs (its worker, never the service)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    closed_unanswered,
    cluster_env,
    read_all,
    stream_roundtrip,
    tcp_connect,
)
from tests.procs import alive, children, gone, is_fork_server, request_children, state, wait_for
from tests.test_modes import finish, started_pid

pytestmark = pytest.mark.timeout(60)


def fork_server_of(worker: int) -> int:
    found = wait_for(lambda: [pid for pid in children(worker) if is_fork_server(pid)], 10,
                     f"worker {worker}'s fork server")  # fmt: skip
    return found[0]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_request_children_are_forked_by_the_worker_s_fork_server(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    assert children(worker) == [server]
    with tcp_connect(cluster.address()) as first, tcp_connect(cluster.address()) as second:
        pids = [started_pid(first), started_pid(second)]
        assert [parent_of(pid) for pid in pids] == [server, server]
        assert sorted(request_children(worker)) == sorted(pids)
        finish(first)
        finish(second)
    wait_for(lambda: not request_children(worker), 10, "both children reaped")
    assert state(server) == "S" and children(worker) == [server]


def test_a_killed_fork_server_stops_its_worker_and_the_master_replaces_it(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    busy = tcp_connect(cluster.address())
    child = started_pid(busy)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: gone(child), 5, "its request child, gone with it (parent-death signal)")
    wait_for(lambda: gone(worker), 10, "the worker stopped")
    cluster.wait_log(rf"worker {worker}: its fork server {server} .*; stopping")
    # A kill from outside, as for a killed worker: replaced at once, no backoff.
    cluster.wait_log(rf"worker {worker} \(slot 0\) died: exited with code 66 \(its fork "
                     r"server was killed\) after \d+ requests, [\d.]+s old \(killed\); "
                     "replacing it now")  # fmt: skip
    (replacement,) = wait_for(lambda: [pid for pid in cluster.workers() if pid != worker], 10,
                              "a new worker")  # fmt: skip
    assert fork_server_of(replacement) != server
    with tcp_connect(cluster.address()) as sock:
        assert parent_of(started_pid(sock)) == fork_server_of(replacement)
        finish(sock)
    with busy:
        busy.settimeout(5)
        assert busy.recv(100) == b""  # the killed request's client hears the end


def test_a_stopped_fork_server_is_killed_and_its_worker_replaced(start_cluster) -> None:
    """SIGSTOP: the worker waits for its fork server's answer at most --timeout (here 2 s),
    then kills it and stops; that request is closed, the next ones are served."""
    cluster = start_cluster("echo", "-w", "1", "-k", "fork", "--timeout", "2",
                            "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    os.kill(server, signal.SIGSTOP)
    assert closed_unanswered(cluster.address(), b"lost\n")  # after --timeout: 2 s
    cluster.wait_log(rf"its fork server {server} did not answer within 2s \(killed\); stopping")
    wait_for(lambda: gone(server) and gone(worker), 10, "the stopped fork server and its worker")
    # Put down by its worker, not killed from outside: a failure, with the backoff of one.
    cluster.wait_log(rf"worker {worker} \(slot 0\) died: exited with code 1 after .*\(crashed\)")
    assert stream_roundtrip(tcp_connect(cluster.address(), timeout=10), b"next\n") == b"next\n"


def test_a_refused_fork_closes_that_request_and_the_worker_serves_on_once_it_can(
    pids_cgroup: Path,  # first: the cgroup outlives the cluster
    start_cluster,
) -> None:
    """The fork server alone in a pids cgroup capped at 1 process: its forks fail with
    EAGAIN. That request's client sees its connection closed, one line says so, and once the
    cap is raised the next request is served and one line says that too."""
    cluster = start_cluster("echo", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    (pids_cgroup / "pids.max").write_text("1")
    (pids_cgroup / "cgroup.procs").write_text(str(fork_server_of(worker)))
    for n in range(3):
        assert closed_unanswered(cluster.address(), b"refused %d" % n)
    cluster.wait_log(
        rf"worker {worker} cannot fork for a request: Resource temporarily unavailable"
    )
    assert cluster.log.count("cannot fork for a request") == 1  # one line for the episode
    (pids_cgroup / "pids.max").write_text("10")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"served") == b"served"
    cluster.wait_log(rf"worker {worker} forks for requests again")
    assert children(cluster.pid) == [worker] and alive(worker)


def boom_logging_to_a_file(start_cluster, tmp_path: Path) -> tuple[object, Path, int]:
    """A fork-mode cluster of ``testapps:Boom`` logging to ``main.log``: (it, the file, port)."""
    main = tmp_path / "main.log"
    cluster = start_cluster("testapps:Boom", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0",
                            "--log-file", str(main), wait=False)  # fmt: skip
    wait_for(lambda: main.exists() and "ready: 1 worker" in main.read_text(), 20, "ready")
    port = int(next(line for line in main.read_text().splitlines()
                    if "listening on" in line).rsplit(":", 1)[1])  # fmt: skip
    return cluster, main, port


def test_usr1_reaches_the_fork_server_s_children(start_cluster, tmp_path: Path) -> None:
    """Log rotation: a request child forked after the reopen writes to the new file."""
    cluster, main, port = boom_logging_to_a_file(start_cluster, tmp_path)
    main.rename(tmp_path / "main.log.1")
    cluster.signal(signal.SIGUSR1)
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    wait_for(lambda: main.exists() and f"worker {server} reopened" in main.read_text(), 10,
             "the fork server's reopen")  # fmt: skip
    assert stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"boom\n") == b""
    wait_for(lambda: "RuntimeError: boom" in main.read_text(), 10, "the child's error, new file")
    assert "RuntimeError" not in (tmp_path / "main.log.1").read_text()


def test_usr1_reaches_the_children_already_running(start_cluster, tmp_path: Path) -> None:
    """Log rotation with a request under way (a kept-alive connection, say): its child,
    forked before the reopen, writes its lines to the new file too, and says nothing of it."""
    cluster, main, port = boom_logging_to_a_file(start_cluster, tmp_path)
    (worker,) = cluster.workers()
    server = fork_server_of(worker)
    with tcp_connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"bo")  # half its line: its child is forked, and waits for the rest
        (child,) = wait_for(lambda: request_children(worker), 10, "its request child")
        main.rename(tmp_path / "main.log.1")
        cluster.signal(signal.SIGUSR1)
        wait_for(lambda: main.exists() and f"worker {server} reopened" in main.read_text(), 10,
                 "the fork server's reopen")  # fmt: skip
        sock.sendall(b"om\n")
        assert read_all(sock) == b""  # the handler raised: the connection ends
    wait_for(lambda: "RuntimeError: boom" in main.read_text(), 10, "the child's error, new file")
    assert "RuntimeError" not in (tmp_path / "main.log.1").read_text()
    assert f"worker {child} reopened" not in main.read_text()


# ------------------------------------------------------------------------------ quickfork
QUICKFORK_PROBE = """
import os, random, sys, threading
from workers.runtime.quickfork import fork

hooks = []
os.register_at_fork(after_in_child=lambda: hooks.append("ran"))
if sys.argv[1] == "thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait).start()
draws = []
for _ in range(2):
    read, write = os.pipe()
    pid = fork()
    if pid == 0:
        os.write(write, repr((random.random(), hooks)).encode())
        os._exit(0)
    os.close(write)
    draws.append(os.read(read, 200).decode())
    os.waitpid(pid, 0)
print(repr(random.random()), *draws, sep="\\n")
if sys.argv[1] == "thread":
    stop.set()
"""


def quickfork_probe(threads: str) -> tuple[str, list[tuple[float, list[str]]]]:
    done = subprocess.run([sys.executable, "-c", QUICKFORK_PROBE, threads], cwd=ROOT,
                          env=cluster_env(), capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    parent, *kids = done.stdout.splitlines()
    return parent, [eval(line) for line in kids]  # noqa: S307 - our own probe's reprs


def test_quick_fork_skips_the_at_fork_hooks_but_reseeds_random() -> None:
    parent, kids = quickfork_probe("one")
    assert [hooks for _, hooks in kids] == [[], []]  # no interpreter repairs: one thread
    draws = {draw for draw, _ in kids} | {float(parent)}
    assert len(draws) == 3  # each child draws its own numbers, none the parent's next


def test_quick_fork_is_os_fork_once_there_is_a_second_thread() -> None:
    _, kids = quickfork_probe("thread")
    assert [hooks for _, hooks in kids] == [["ran"], ["ran"]]

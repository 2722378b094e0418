"""fork mode's worker, which forks its request children itself, and the fork it uses
(``workers.runtime.quickfork``): who forks and reaps the children, what a child still gets
from the interpreter, and what a refused fork, a full worker's hung child or a log rotation
costs (that request at most, never the worker)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    closed_unanswered,
    cluster_env,
    read_all,
    read_line,
    stream_roundtrip,
    tcp_connect,
    unix_dgram_roundtrip,
)
from tests.procs import alive, children, gone, request_children, state, wait_for
from tests.test_modes import finish, started_pid

pytestmark = pytest.mark.timeout(60)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_request_children_are_forked_and_reaped_by_their_worker(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    assert children(worker) == []  # no helper process: the worker forks for itself
    with tcp_connect(cluster.address()) as first, tcp_connect(cluster.address()) as second:
        pids = [started_pid(first), started_pid(second)]
        assert [parent_of(pid) for pid in pids] == [worker, worker]
        assert sorted(children(worker)) == sorted(pids)
        finish(first)
        finish(second)
    wait_for(lambda: not children(worker), 10, "both children reaped (no zombie left)")
    assert state(worker) == "S"


def test_a_refused_fork_closes_that_request_and_the_worker_serves_on_once_it_can(
    pids_cgroup: Path,  # first: the cgroup outlives the cluster
    start_cluster,
) -> None:
    """The worker alone in a pids cgroup capped at 1 process: its forks fail with EAGAIN.
    That request's client sees its connection closed, one line says so, and once the cap is
    raised the next request is served and one line says that too."""
    cluster = start_cluster("echo", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    (pids_cgroup / "pids.max").write_text("1")
    (pids_cgroup / "cgroup.procs").write_text(str(worker))
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
    assert "Traceback" not in cluster.log


def test_a_full_worker_puts_down_its_hung_child_and_serves_on(start_cluster) -> None:
    """Every lane busy (``--max-children 1``) with a request that hangs: the worker, waiting
    for a free lane, still applies ``--timeout`` to the child, and the connection queued
    behind it is served by the same worker."""
    cluster = start_cluster("testapps:Hang", "-w", "1", "-k", "fork", "--max-children", "1",
                            "--timeout", "2", "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    hung = tcp_connect(cluster.address())
    hung.sendall(b"hang\n")
    (child,) = wait_for(lambda: children(worker), 5, "the hung request's child")
    queued = tcp_connect(cluster.address(), timeout=20)
    queued.sendall(b"queued\n")
    cluster.wait_log(rf"request child {child} \(client .*\) made no progress", timeout=8)
    wait_for(lambda: gone(child), 8, "the hung child put down")
    with queued:
        assert read_line(queued) == b"queued\n"
    with hung:
        hung.settimeout(5)
        assert read_all(hung) == b""
    assert alive(worker) and cluster.workers() == [worker]


def test_a_graceful_stop_puts_down_a_hung_child_past_timeout(start_cluster) -> None:
    """TERM while a request child hangs: the worker, waiting for its children to finish,
    still applies ``--timeout``, so the stop ends once the hung child is put down, long
    before ``--graceful-timeout``."""
    cluster = start_cluster("testapps:Hang", "-w", "1", "-k", "fork", "--timeout", "2",
                            "--graceful-timeout", "60", "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    with tcp_connect(cluster.address()) as hung:
        hung.sendall(b"hang\n")
        (child,) = wait_for(lambda: children(worker), 5, "the hung request's child")
        cluster.signal(signal.SIGTERM)
        assert cluster.wait_exit(timeout=20) is not None
    assert f"request child {child} " in cluster.log
    assert "stop timed out" not in cluster.log


def boom_logging_to_a_file(start_cluster, tmp_path: Path) -> tuple[object, Path, int]:
    """A fork-mode cluster of ``testapps:Boom`` logging to ``main.log``: (it, the file, port)."""
    main = tmp_path / "main.log"
    cluster = start_cluster("testapps:Boom", "-w", "1", "-k", "fork", "-b", "127.0.0.1:0",
                            "--log-file", str(main), wait=False)  # fmt: skip
    wait_for(lambda: main.exists() and "ready: 1 worker" in main.read_text(), 20, "ready")
    port = int(next(line for line in main.read_text().splitlines()
                    if "listening on" in line).rsplit(":", 1)[1])  # fmt: skip
    return cluster, main, port


def test_usr1_reaches_the_children_forked_after_it(start_cluster, tmp_path: Path) -> None:
    """Log rotation: a request child forked after the reopen writes to the new file."""
    cluster, main, port = boom_logging_to_a_file(start_cluster, tmp_path)
    main.rename(tmp_path / "main.log.1")
    cluster.signal(signal.SIGUSR1)
    (worker,) = cluster.workers()
    wait_for(lambda: main.exists() and f"worker {worker} reopened" in main.read_text(), 10,
             "the worker's reopen")  # fmt: skip
    assert stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"boom\n") == b""
    wait_for(lambda: "RuntimeError: boom" in main.read_text(), 10, "the child's error, new file")
    assert "RuntimeError" not in (tmp_path / "main.log.1").read_text()


def test_usr1_reaches_the_children_already_running(start_cluster, tmp_path: Path) -> None:
    """Log rotation with a request under way (a kept-alive connection, say): its child,
    forked before the reopen, writes its lines to the new file too, and says nothing of it."""
    cluster, main, port = boom_logging_to_a_file(start_cluster, tmp_path)
    (worker,) = cluster.workers()
    with tcp_connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"bo")  # half its line: its child is forked, and waits for the rest
        (child,) = wait_for(lambda: request_children(worker), 10, "its request child")
        main.rename(tmp_path / "main.log.1")
        cluster.signal(signal.SIGUSR1)
        wait_for(lambda: main.exists() and f"worker {worker} reopened" in main.read_text(), 10,
                 "the worker's reopen")  # fmt: skip
        sock.sendall(b"om\n")
        assert read_all(sock) == b""  # the handler raised: the connection ends
    wait_for(lambda: "RuntimeError: boom" in main.read_text(), 10, "the child's error, new file")
    assert "RuntimeError" not in (tmp_path / "main.log.1").read_text()
    assert f"worker {child} reopened" not in main.read_text()


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

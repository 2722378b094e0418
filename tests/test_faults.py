"""Faults that must never take the service down: forks the kernel refuses, workers killed from
outside, hung idle workers, kept-alive clients, signal bursts, stale code."""

from __future__ import annotations

import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import Events, LoadConfig, run
from tests.conftest import Cluster, stream_roundtrip, tcp_connect
from tests.procs import alive, children, every, sample_until, wait_for

pytestmark = pytest.mark.timeout(120)

PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")


def limited(script: str, *args: str) -> list[str]:
    """The command of a process that first runs ``script`` (lowering its own limits), then
    execs ``python -m cluster run ARGS``."""
    run_line = (
        f"os.execv(sys.executable, [sys.executable, '-m', 'cluster', 'run', *{list(args)!r}])"
    )
    return [sys.executable, "-c", f"import os, resource, sys\n{script}\n{run_line}"]


@pytest.fixture
def ended() -> Iterator[list[Cluster]]:
    """Clusters started by hand; each is ended by pid at teardown."""
    started: list[Cluster] = []
    yield started
    for cluster in started:
        cluster.end()


def test_fd_limit_fork_failures_are_survived_and_the_pool_fills_later(ended) -> None:
    """RLIMIT_NOFILE 12: the master has room for a worker or two, then pidfd_open fails
    (EMFILE) after the fork. It kills that child, logs one line, keeps serving, retries with
    backoff, and fills the pool once the limit is raised again."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = f"resource.setrlimit(resource.RLIMIT_NOFILE, (12, {hard}))"
    cluster = Cluster([], command=limited(script, "echo", "-w", "1", "-b", "127.0.0.1:0"))
    ended.append(cluster)
    cluster.wait_ready()
    for _ in range(4):
        cluster.signal(signal.SIGTTIN)
    cluster.wait_log("cannot start a worker: Too many open files; .* retrying in")
    assert alive(cluster.pid)
    assert stream_roundtrip(tcp_connect(cluster.address()), b"still serving") == b"still serving"
    running = len(children(cluster.pid))
    assert 1 <= running < 5
    resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE, (1024, hard))  # the fds are back
    wait_for(lambda: len(children(cluster.pid)) == 5, 15, "the pool filled to 5")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"full") == b"full"
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0
    assert cluster.lines[-1].endswith("exiting (code 0)")


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A pids cgroup of this test's own (cgroup v1, as root), removed at the end."""
    if os.geteuid() != 0 or not (PIDS_CGROUPS / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup v1 pids controller to cap a process tree")
    group = PIDS_CGROUPS / f"prefork-test-{os.getpid()}-{random.randrange(1 << 30)}"
    group.mkdir()
    try:
        yield group
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text().split(), 10,
                 "the cgroup to empty")  # fmt: skip
        group.rmdir()


def test_process_limit_fork_failures_are_survived_and_the_pool_fills_later(
    ended, pids_cgroup: Path
) -> None:
    """A pids cgroup of 3 processes (the master and 2 workers): a third worker's fork fails
    with EAGAIN. The master logs it, serves on, and fills the pool once the cap is raised."""
    (pids_cgroup / "pids.max").write_text("3")
    script = f"open({str(pids_cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))"
    cluster = Cluster([], command=limited(script, "echo", "-w", "2", "-b", "127.0.0.1:0"))
    ended.append(cluster)
    cluster.wait_ready()
    cluster.signal(signal.SIGTTIN)
    cluster.wait_log("cannot start a worker: Resource temporarily unavailable; 2 of 3 running")
    assert alive(cluster.pid) and len(children(cluster.pid)) == 2
    assert stream_roundtrip(tcp_connect(cluster.address()), b"still serving") == b"still serving"
    (pids_cgroup / "pids.max").write_text("10")
    wait_for(lambda: len(children(cluster.pid)) == 3, 15, "the third worker")
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0


def test_workers_killed_from_outside_are_replaced_at_once(start_cluster) -> None:
    """20 kill -9s, 0.2 s apart, of any worker, under load with 4 workers: sampled every
    50 ms, the pool is never below 3 live workers for more than 0.5 s, and only requests in
    flight on a killed worker fail."""
    cluster = start_cluster("echo", "-w", "4", "-b", "127.0.0.1:0")
    target = 4
    short_since: list[float] = []  # when the pool fell below target - 1, if it is there now
    longest = [0.0]
    done = threading.Event()

    def sample() -> None:
        now = time.monotonic()
        if len(children(cluster.pid)) < target - 1:
            short_since.append(short_since[-1] if short_since else now)
            longest[0] = max(longest[0], now - short_since[-1])
        else:
            short_since.clear()

    results = []
    config = LoadConfig(cluster.uris[0], duration=6.0, concurrency=4, connect="per-request",
                        timeout=5.0)  # fmt: skip
    load = threading.Thread(target=lambda: results.append(run(config, events=Events())))
    load.start()
    sampler = sample_until(done, sample)
    rng = random.Random(7)
    try:
        every(0.2, 20, lambda n: _kill_one(rng, children(cluster.pid)))
    finally:
        load.join(60)
        done.set()
        sampler.join()
    assert longest[0] <= 0.5, f"below {target - 1} live workers for {longest[0]:.2f}s"
    result = results[0]
    assert result.requests > 1000
    assert result.error_count <= 20, result.errors  # at most one request in flight per kill
    assert cluster.log.count("(killed); replacing it now") >= 15
    assert "respawn in" not in cluster.log  # no backoff for kills from outside
    wait_for(lambda: len(children(cluster.pid)) == target, 5, "a full pool")


def _kill_one(rng: random.Random, pids: list[int]) -> None:
    if pids:
        try:
            os.kill(rng.choice(pids), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_crashing_slot_backs_off_while_the_others_serve(start_cluster) -> None:
    """A worker that fails on its own backs off its own slot only: the other worker is
    untouched and serves every request meanwhile."""
    cluster = start_cluster("testapps:Crash", "-w", "2", "-b", "127.0.0.1:0",
                            "-b", "127.0.0.1:0=echo")  # fmt: skip
    crash, echo = cluster.address(), cluster.uris[1]
    host, port = echo.rsplit("/", 1)[1].rsplit(":", 1)
    for _ in range(6):  # each one crashes whichever worker takes it
        try:
            with tcp_connect(crash, timeout=2) as sock:
                sock.sendall(b"x")
                sock.recv(10)
        except OSError:
            pass
    cluster.wait_log(r"\(crashed\); respawn in \d")
    for n in range(20):
        payload = b"%d" % n
        assert stream_roundtrip(tcp_connect((host, int(port))), payload) == payload
    assert alive(cluster.pid)

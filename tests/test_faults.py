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

from cluster.procfs import stat_state
from loadtest import Events, LoadConfig, run
from tests.conftest import Cluster, read_all, read_line, stream_roundtrip, tcp_connect
from tests.procs import (
    accept_queue_length,
    alive,
    children,
    every,
    holds_for,
    sample_until,
    state,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)


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
    for target in range(2, 6):  # one at a time: a burst would be merged by the kernel
        cluster.signal(signal.SIGTTIN)
        cluster.wait_log(f"pool target is now {target} workers")
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


@pytest.mark.slow
def test_workers_killed_from_outside_are_replaced_at_once(start_cluster) -> None:
    """20 kill -9s, 0.2 s apart, of any worker, under load with 4 workers: sampled every
    10 ms, the pool is never below 3 live workers for more than 0.5 s, and only requests in
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
    config = LoadConfig(cluster.uris[0], duration=4.3, concurrency=4, connect="per-request",
                        timeout=5.0)  # fmt: skip
    load = threading.Thread(target=lambda: results.append(run(config, events=Events())))
    load.start()
    sampler = sample_until(done, sample, period=0.01)
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


def test_a_stopped_idle_worker_is_found_dumped_and_replaced(start_cluster) -> None:
    """SIGSTOP the only worker: its heartbeat stops; within the watchdog interval
    (--timeout 1) plus a scan and the KILL grace, it is named, killed and replaced."""
    cluster = start_cluster("echo", "-w", "1", "--timeout", "1", "-b", "127.0.0.1:0")
    (stopped,) = cluster.workers()
    os.kill(stopped, signal.SIGSTOP)
    started = time.monotonic()
    match = cluster.wait_log(rf"worker {stopped} \(slot 0\): no heartbeat for [\d.]+s while "
                             r"idle \(watchdog interval 1s\); dumping its stack", timeout=10)  # fmt: skip
    assert match
    wait_for(lambda: (w := cluster.workers()) and stopped not in w, 10, "a new worker")
    assert time.monotonic() - started < 1 + 0.25 + 1 + 2  # interval, scan, grace, slack
    assert stream_roundtrip(tcp_connect(cluster.address()), b"back") == b"back"


def all_asleep(pid: int) -> bool:
    """Every thread of ``pid`` blocked in a system call (state S): an echo worker whose
    client sent nothing more sits in its handler's read."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(stat_state(f"/proc/{pid}/task/{tid}/stat") == "S" for tid in tasks)


@pytest.mark.parametrize("mode", ["sync", "thread"])
def test_a_worker_stopped_while_its_request_waits_for_the_client_is_replaced(
    start_cluster, mode
) -> None:
    """SIGSTOP a worker whose request is waiting for its client's next bytes: that wait is
    progress to the scoreboard, and a stopped worker beats no heartbeat, so only the kernel
    tells (state T). Within the watchdog interval (--timeout 1) and a scan, it is named,
    killed and replaced, and a new client is served."""
    cluster = start_cluster("echo", "-w", "1", "-k", mode, "--timeout", "1",
                            "-b", "127.0.0.1:0")  # fmt: skip
    (stopped,) = cluster.workers()
    held = tcp_connect(cluster.address())
    held.sendall(b"first")
    assert held.recv(5) == b"first"  # echoed, and the connection open: its handler reads again
    wait_for(lambda: all_asleep(stopped), 5, "the handler back in its read")
    os.kill(stopped, signal.SIGSTOP)
    started = time.monotonic()
    cluster.wait_log(rf"worker {stopped} \(slot 0\): stopped \(SIGSTOP\) for [\d.]+s in the "
                     r"middle of a request", timeout=10)  # fmt: skip
    wait_for(lambda: (w := cluster.workers()) and stopped not in w, 10, "a new worker")
    assert time.monotonic() - started < 1 + 0.5 + 1 + 2  # interval, scan, grace, slack
    held.close()
    assert stream_roundtrip(tcp_connect(cluster.address()), b"back") == b"back"


def test_a_busy_worker_under_load_is_not_taken_for_silent(start_cluster) -> None:
    """Under steady load a sync worker goes from request to request without the idle wait
    that beats its heartbeat; its moving request count keeps the watchdog quiet."""
    cluster = start_cluster("echo", "-w", "1", "--timeout", "1", "-b", "127.0.0.1:0")
    workers = cluster.workers()
    config = LoadConfig(cluster.uris[0], duration=1.5, concurrency=4, connect="per-request")
    result = run(config, events=Events())
    assert result.requests > 1000 and result.error_count == 0
    assert cluster.workers() == workers and "no heartbeat" not in cluster.log


# ------------------------------------------------------------------ --timeout and keep-alive
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def read_http_reply(sock) -> bytes:
    """One HTTP/1.1 reply with a Content-Length body, or b"" at end-of-file."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("mode", ["sync", "thread", "fork"])
def test_timeout_spares_a_kept_alive_client_that_keeps_asking(start_cluster, mode: str) -> None:
    """--timeout 1, and one connection with a request every 10 ms for 1.5 s: every reply
    comes, the worker is never taken for hung (each reply takes microseconds; the rest is
    waiting for the client). Before, the connection's age was the request's."""
    cluster = start_cluster("http-hello", "-w", "1", "-k", mode, "--timeout", "1",
                            "-b", "127.0.0.1:0")  # fmt: skip
    workers = children(cluster.pid)
    replies = []

    def ask(n: int) -> None:
        sock.sendall(HTTP_REQUEST)
        replies.append(read_http_reply(sock))

    with tcp_connect(cluster.address()) as sock:
        every(0.01, 150, ask)  # one request every 10 ms, on one connection, for 1.5 s
    assert len(replies) == 150 and all(r.endswith(b"Hello, world!\n") for r in replies)
    assert "no progress" not in cluster.log and children(cluster.pid) == workers


@pytest.mark.slow
def test_a_spinning_handler_is_still_dumped_and_killed(start_cluster) -> None:
    cluster = start_cluster("testapps:Hang", "-w", "1", "--timeout", "1", "-b", "127.0.0.1:0")
    (worker,) = cluster.workers()
    with tcp_connect(cluster.address()) as sock:
        sock.sendall(b"spin\n")
        cluster.wait_log(rf"worker {worker} \(slot 0\): request from \S+ has made no progress",
                         timeout=8)  # fmt: skip
        cluster.wait_log("in spin_forever")
    wait_for(lambda: (w := cluster.workers()) and worker not in w, 10, "a new worker")


@pytest.mark.parametrize(("app", "mode"), [("http-hello", "sync"), ("http-hello", "thread"),
                                           ("http-hello", "fork"), ("testapps:StdlibHTTP", "sync"),
                                           ("testapps:StdlibHTTP", "thread")])  # fmt: skip
def test_term_with_a_kept_alive_client_ends_promptly(start_cluster, app: str, mode: str) -> None:
    """A client that had its reply and keeps the connection open is only waiting between
    requests: TERM closes it (it reads end-of-file) and the master exits 0 long before
    --graceful-timeout."""
    cluster = start_cluster(app, "-w", "1", "-k", mode, "--graceful-timeout", "30",
                            "-b", "127.0.0.1:0")  # fmt: skip
    with tcp_connect(cluster.address(), timeout=20) as sock:
        sock.sendall(HTTP_REQUEST)
        assert b"200" in read_http_reply(sock).split(b"\r\n")[0]
        started = time.monotonic()
        cluster.signal(signal.SIGTERM)
        assert cluster.wait_exit(timeout=20) == 0
        assert time.monotonic() - started < 5
        assert sock.recv(10) == b""  # closed by the server, not reset


def test_keep_alive_closes_a_connection_idle_between_requests(start_cluster) -> None:
    cluster = start_cluster("http-hello", "-w", "1", "--keep-alive", "1", "-b", "127.0.0.1:0")
    with tcp_connect(cluster.address(), timeout=20) as sock:
        sock.sendall(HTTP_REQUEST)
        assert read_http_reply(sock)
        started = time.monotonic()
        assert sock.recv(10) == b""  # the server closed it...
        assert 1 <= time.monotonic() - started < 1 + 2  # ...past --keep-alive, within a scan
    assert stream_roundtrip(tcp_connect(cluster.address()), HTTP_REQUEST).startswith(b"HTTP/1.1")


def test_thread_mode_request_cut_at_the_graceful_timeout_is_logged_and_exits_1(
    start_cluster,
) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", "thread", "--graceful-timeout",
                            "1", "-b", "127.0.0.1:0")  # fmt: skip
    with tcp_connect(cluster.address()) as sock:
        assert sock.recv(100).startswith(b"started")  # waiting for "finish": never idle
        cluster.signal(signal.SIGTERM)
        assert cluster.wait_exit(timeout=15) == 1
    assert ("requests still running after --graceful-timeout 1s; cutting them" in cluster.log
            or "stop timed out: killing workers" in cluster.log)  # fmt: skip


# ------------------------------------------------------------------ a full worker holds nothing
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["thread", "fork"])
def test_a_killed_full_worker_resets_no_client_it_had_not_started(start_cluster, mode) -> None:
    """A worker whose threads (or children) are all busy leaves the next connection in the
    listen queue, also while it drains on TERM: killed, it resets only what it was serving,
    and the replacement serves the one that waited."""
    size = "--threads" if mode == "thread" else "--max-children"
    cluster = start_cluster("testapps:Gate", "-w", "1", "-k", mode, size, "2",
                            "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    port = cluster.address()[1]
    busy = [tcp_connect(("127.0.0.1", port), timeout=20) for _ in range(2)]
    for sock in busy:
        assert sock.recv(100).startswith(b"started")
    waiting = tcp_connect(("127.0.0.1", port), timeout=20)
    wait_for(lambda: accept_queue_length(port) == 1, 5, "the third connection queued")
    os.kill(worker, signal.SIGTERM)  # it drains: the queued one must stay queued
    holds_for(lambda: accept_queue_length(port) == 1, 0.5, "the third connection queued")
    os.kill(worker, signal.SIGKILL)
    with waiting:
        line = read_line(waiting)
        assert line.startswith(b"started"), line  # served by the replacement, not reset
        assert int(line.split()[1]) != worker
        waiting.sendall(b"finish\n")
        assert read_line(waiting).startswith(b"done")
    for sock in busy:
        sock.close()


# ------------------------------------------------------------------ signals and stale code
def test_ttins_delivered_one_by_one_each_count(start_cluster) -> None:
    """Five TTINs, each sent once the kernel no longer holds the last one pending: five more
    workers (the master reads the signal numbers off its wakeup pipe, one byte per signal)."""
    cluster = start_cluster("echo", "-w", "1", "--max-workers", "8", "-b", "127.0.0.1:0")
    for _ in range(5):
        cluster.signal(signal.SIGTTIN)
        wait_for(lambda: not pending_signals(cluster.pid) & (1 << (signal.SIGTTIN - 1)), 5,
                 "the TTIN delivered")  # fmt: skip
    wait_for(lambda: len(children(cluster.pid)) == 6, 10, "six workers")
    # The log comes through a pipe the test reads on a thread: the last line may lag.
    wait_for(lambda: cluster.log.count("command: incr 1 (from SIGTTIN)") >= 5, 5, "five incrs")
    assert cluster.log.count("command: incr 1 (from SIGTTIN)") == 5


def test_a_burst_the_kernel_merges_is_one_signal_and_one_command(start_cluster) -> None:
    """The limit of counting: a signal still pending when the same one comes again is kept
    once by the kernel (standard signals do not queue). Five HUPs to a stopped master are one
    pending HUP, so one reload; a burst sent faster than the master is scheduled merges the
    same way. (TTIN and TTOU sent to a stopped master are even dropped by the kernel when it
    continues, as every stop signal is at SIGCONT.) ``incr N`` says N exactly."""
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0")
    os.kill(cluster.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state(cluster.pid) in ("T", "t"), 5, "the master stopped")
        for _ in range(5):
            os.kill(cluster.pid, signal.SIGHUP)
        assert pending_signals(cluster.pid) & (1 << (signal.SIGHUP - 1))
    finally:
        os.kill(cluster.pid, signal.SIGCONT)
    cluster.wait_log("reload complete: generation 2 ")
    holds_for(lambda: "generation 3" not in cluster.log, 0.5, "one reload only")
    assert cluster.log.count("command: reload (from SIGHUP)") == 1


def pending_signals(pid: int) -> int:
    """The process's pending signal mask (its own and its thread group's)."""
    mask = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return mask


def write_atomically(path: Path, text: str) -> None:
    """A new version of an app file that no import can catch half-written."""
    staged = path.with_suffix(".staged")
    staged.write_text(text)
    os.replace(staged, path)


HELD_VERSION = """
import os
from setproctitle import getproctitle
from workers import BaseRequestHandler
from tests.procs import wait_for

HOLD = {hold!r}
if getproctitle().startswith("cluster: worker"):
    wait_for(lambda: not os.path.exists(HOLD), 60, "the test to let the boot go on")


class Handler(BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"{version}")
"""


def test_hups_during_a_boot_fold_into_one_reload_with_the_latest_code(
    start_cluster, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    app = tmp_path / "held.py"
    app.write_text(HELD_VERSION.format(hold=str(hold), version="v1"))
    cluster = start_cluster("held:Handler", "-w", "1", "-b", "127.0.0.1:0", cwd=tmp_path)
    ask = lambda: stream_roundtrip(tcp_connect(cluster.address()), b"")  # noqa: E731
    hold.write_text("held")
    write_atomically(app, HELD_VERSION.format(hold=str(hold), version="v2"))
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload: starting generation 2")
    write_atomically(app, HELD_VERSION.format(hold=str(hold), version="v3"))
    for _ in range(5):
        cluster.signal(signal.SIGHUP)
    cluster.wait_log("folding this reload into one that starts after it")
    assert ask() == b"v1"  # generation 1 serves while 2 boots
    hold.unlink()
    cluster.wait_log("reload complete: generation 3 ", timeout=20)
    assert {ask() for _ in range(5)} == {b"v3"}
    assert "generation 4" not in cluster.log  # the folded HUPs made one reload, not five


PACKAGE_INIT = """
from workers import BaseRequestHandler
from pkgapp import version


class Handler(BaseRequestHandler):
    def handle(self):
        self.request.sendall(version.VERSION)
"""


@pytest.mark.parametrize("preload", [False, True])
def test_hup_reloads_the_whole_app_package(start_cluster, tmp_path: Path, preload: bool) -> None:
    """A package app whose handler reads a submodule: after the submodule changes, a HUP
    serves the new code. Without --preload the master never imports the app (workers do);
    with it, a HUP re-executes the master, as USR2 does."""
    package = tmp_path / "pkgapp"
    package.mkdir()
    (package / "__init__.py").write_text(PACKAGE_INIT)
    (package / "version.py").write_text('VERSION = b"one"\n')
    flags = ["--preload"] if preload else []
    cluster = start_cluster("pkgapp:Handler", "-w", "2", "-b", "127.0.0.1:0", *flags,
                            cwd=tmp_path)  # fmt: skip
    ask = lambda: stream_roundtrip(tcp_connect(cluster.address()), b"")  # noqa: E731
    assert ask() == b"one"
    (package / "version.py").write_text('VERSION = b"two"\n')
    cluster.signal(signal.SIGHUP)
    if preload:
        new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
        cluster.adopt(new_pid)
        assert cluster.wait_exit(timeout=20) == 0  # the old master handed over and left
        cluster.adopt(new_pid)
    else:
        cluster.wait_log("reload complete: generation 2")
    assert {ask() for _ in range(6)} == {b"two"}


def master_fds_and_rss(pid: int) -> tuple[int, int]:
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
               if line.startswith("VmRSS:"))  # fmt: skip
    return len(os.listdir(f"/proc/{pid}/fd")), rss


@pytest.mark.slow
def test_a_thousand_worker_restarts_leave_the_master_flat(start_cluster) -> None:
    """--max-requests 1: every request recycles its worker. After 50 restarts to warm up and
    1000 more, the master holds the same fds and at most 1 MiB more memory. (Both measures
    are taken when the master is not in the middle of a spawn: once, one was taken between a
    fork and its pidfd_open, and the test saw a leak that was not there.) The count is the
    property's: the master's RSS grows by some 500 KiB over its first 500 restarts and then
    stays (measured to 2000), so a leak of 1 KiB a restart stands out past the 1 MiB bound only
    over about a thousand."""
    cluster = start_cluster("echo", "-w", "2", "--max-requests", "1", "-b", "127.0.0.1:0")
    address = cluster.address()

    def restarts(count: int) -> None:
        for n in range(count):
            payload = b"%d" % n
            assert stream_roundtrip(tcp_connect(address), payload) == payload

    def settled() -> bool:
        """Two workers, and the master holds the pidfd of each: not in the middle of a spawn
        (a worker just forked has no pidfd yet; a measure taken then is one fd short)."""
        workers = sorted(str(pid) for pid in children(cluster.pid))
        return len(workers) == 2 and sorted(pidfds_of(cluster.pid).values()) == workers

    def fd_names() -> list[str]:
        names = []
        for fd in sorted(os.listdir(f"/proc/{cluster.pid}/fd"), key=int):
            try:
                names.append(f"{fd}:{os.readlink(f'/proc/{cluster.pid}/fd/{fd}')}")
            except OSError:
                names.append(f"{fd}:(gone)")
        return names

    def quiet_baseline() -> tuple[int, int, list[str]]:
        """The master's fds and RSS when settled, its fewest fds over five settled looks: one
        look once caught a fd more than both before and after (a transient one, whatever it
        was), and the test then waited for a count that would never come back."""
        looks = []
        for _ in range(5):
            wait_for(settled, 10, "two workers, each with its pidfd in the master")
            looks.append((*master_fds_and_rss(cluster.pid), fd_names()))
        return min(looks)

    restarts(50)
    fds, rss, before = quiet_baseline()
    restarts(1000)
    wait_for(settled, 10, "two workers, each with its pidfd in the master")
    try:
        wait_for(lambda: master_fds_and_rss(cluster.pid)[0] == fds, 5, "the fds back")
    except AssertionError:
        raise AssertionError(
            f"{before} -> {fd_names()}; {pidfds_of(cluster.pid)}; children "
            f"{[(c, state(c)) for c in children(cluster.pid)]}\n"
            f"{cluster.log[-3000:]}"
        ) from None
    assert master_fds_and_rss(cluster.pid)[1] - rss <= 1024, (rss, master_fds_and_rss(cluster.pid))
    wait_for(lambda: cluster.log.count("recycling after 1 requests") >= 1050, 5, "1050 recycles")


def pidfds_of(pid: int) -> dict[int, str]:
    """The master's pidfds, fd -> the pid each one names (for a failure's message)."""
    found: dict[int, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "pidfd" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    found[int(fd)] = fh.read().split("Pid:")[1].split()[0]
        except (OSError, IndexError):
            continue
    return found


# ------------------------------------------------------------------ found by the adversary run
def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hup_and_usr2_without_a_free_fd_are_refused_and_the_master_serves_on(
    start_cluster,
) -> None:
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE, (fds_of(cluster.pid), hard))
    try:
        cluster.signal(signal.SIGHUP)
        cluster.wait_log("reload failed: cannot check the app: no pipe")
        cluster.signal(signal.SIGUSR2)
        cluster.wait_log("upgrade refused: cannot open the handover pipe")
        assert alive(cluster.pid)
        assert stream_roundtrip(tcp_connect(cluster.address()), b"on") == b"on"
    finally:
        resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE, (1024, hard))
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload complete: generation 2")


def test_a_graceful_stop_under_steady_load_serves_what_was_queued_and_ends(start_cluster) -> None:
    """Clients that keep connecting during the stop would keep the queue from ever emptying;
    the workers serve what was queued when the TERM came, then leave: exit 0, well before
    --graceful-timeout."""
    cluster = start_cluster("echo", "-w", "2", "--graceful-timeout", "10", "-b", "127.0.0.1:0")
    config = LoadConfig(cluster.uris[0], duration=2.0, concurrency=4, connect="per-request",
                        timeout=5.0)  # fmt: skip
    load = threading.Thread(target=lambda: run(config, events=Events()))
    load.start()
    try:
        holds_for(lambda: alive(cluster.pid), 0.5, "the master, under load")
        started = time.monotonic()
        cluster.signal(signal.SIGTERM)
        assert cluster.wait_exit(timeout=15) == 0
        assert time.monotonic() - started < 3
        assert "stop timed out" not in cluster.log
    finally:
        load.join(30)


def test_kept_alive_http_clients_see_no_error_across_a_reload(start_cluster) -> None:
    """A client that sends request after request on one connection, and reconnects when a
    reply says ``Connection: close``: a reload closes the old workers' connections with such
    a reply (or while they sit idle), never under a request in flight."""
    import http.client

    cluster = start_cluster("http-hello", "-w", "2", "-k", "thread", "-b", "127.0.0.1:0")
    host, port = cluster.address()
    errors, replies, reconnects = [], [0], [0]
    done = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while not done.is_set():
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                response.read()
                replies[0] += 1
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    reconnects[0] += 1
            except (OSError, http.client.HTTPException) as err:
                errors.append(repr(err))
                conn.close()

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: replies[0] > 200, 10, "replies flowing")
        cluster.signal(signal.SIGHUP)
        cluster.wait_log("reload complete: generation 2", timeout=20)
        before = replies[0]
        wait_for(lambda: replies[0] > before + 200, 10, "replies from the new generation")
    finally:
        done.set()
        for thread in clients:
            thread.join(20)
    assert errors == [] and reconnects[0] >= 2, (errors, reconnects)


def test_a_master_out_of_fds_pauses_its_health_and_metrics_accepts_with_one_line(
    start_cluster,
) -> None:
    """Out of fds, the master's listening sockets stay readable: accepting again at every turn
    of its loop spun it and logged ~40000 lines a second. It pauses them, says so once per
    server, and answers the waiting clients once the fds are back."""
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", "--metrics", "tcp://127.0.0.1:0")  # fmt: skip
    health = int(cluster.wait_log(r"health on tcp://127\.0\.0\.1:(\d+)").group(1))
    metrics = int(cluster.wait_log(r"metrics on tcp://127\.0\.0\.1:(\d+)").group(1))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE, (fds_of(cluster.pid), hard))
    try:
        clients = [tcp_connect(("127.0.0.1", port)) for port in (health, metrics)]
        for sock in clients:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        cluster.wait_log(r"health: cannot accept: Too many open files; retrying every")
        cluster.wait_log(r"metrics: cannot accept: Too many open files; retrying every")
        holds_for(lambda: cluster.log.count("cannot accept") == 2, 0.5, "one line per server")
    finally:
        resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE, (1024, hard))
    for sock in clients:
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")
    cluster.wait_log("health: accepting again")
    cluster.wait_log("metrics: accepting again")
    assert "Traceback" not in cluster.log


EXITING_HANDLER = """
import socketserver, sys

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        if self.rfile.readline().startswith(b"exit"):
            sys.exit(3)
        self.wfile.write(b"served\\n")
"""


def test_a_thread_mode_handler_calling_sys_exit_stops_its_worker_in_one_line(
    start_cluster, tmp_path: Path
) -> None:
    """sys.exit() in a handler ended its thread alone, in silence: a worker lost its lanes
    one by one and nobody saw it. It ends the worker now, as in sync mode, named in one line;
    the master replaces it."""
    (tmp_path / "exiting.py").write_text(EXITING_HANDLER)
    cluster = start_cluster("exiting:Handler", "-k", "thread", "--threads", "2", "-w", "1",
                            "-b", "127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    (worker,) = cluster.workers()
    assert stream_roundtrip(tcp_connect(cluster.address()), b"exit\n") == b""
    cluster.wait_log(rf"worker {worker}: a handler raised SystemExit\(3\) serving 127\.0\.0\.1:")
    cluster.wait_log(rf"worker {worker} \(slot 0\) died: exited with code 1")
    with tcp_connect(cluster.address()) as sock:
        sock.sendall(b"hi\n")
        assert read_line(sock) == b"served\n"
    assert "Traceback" not in cluster.log

"""Lifecycle under load: reloads, rolling reloads, scaling, upgrade, and lossless stops."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loadtest import Events, LoadConfig, Result, run
from tests.conftest import cluster_env, read_all, read_line, stream_roundtrip, tcp_connect
from tests.procs import alive, children, every, holds_for, sample_until, tcp_listener, wait_for

pytestmark = pytest.mark.timeout(120)


def load_in_background(
    config: LoadConfig, events: Events, flowing: threading.Event | None = None
) -> tuple[threading.Thread, list[Result]]:
    """Run the load test in a thread; ``flowing`` is set once requests are being served."""
    results: list[Result] = []

    def progress(now: object) -> None:
        if flowing is not None and now.requests > 0:  # type: ignore[attr-defined]
            flowing.set()

    thread = threading.Thread(
        target=lambda: results.append(run(config, events=events, progress=progress))
    )
    thread.start()
    return thread, results


def assert_no_errors(result: Result) -> None:
    assert result.requests > 100, result
    assert result.error_count == 0, (result.errors, result.error_examples)


TARGETS = {
    "tcp-persistent": (["-k", "thread", "--threads", "4", "-b", "127.0.0.1:0"], "persistent"),
    "tcp-per-request": (["-b", "127.0.0.1:0"], "per-request"),
    "udp": (["-b", "udp://127.0.0.1:0"], "persistent"),
    "unix": (["-b", "unix:{tmp}/lc.sock"], "per-request"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_ten_hups_under_load_lose_nothing(start_cluster, tmp_path: Path, name: str) -> None:
    """Ten HUPs 0.3 s apart under load, from its first second to 1 s before its end. Each one
    starts a generation of its own: on 2 cores busy with three copies of this test, all ten
    did, none folded into the next (at 0.2 s apart some do)."""
    flags, connect = TARGETS[name]
    flags = [f.format(tmp=tmp_path) for f in flags]
    cluster = start_cluster("echo", "-w", "2", "--graceful-timeout", "30", *flags)
    uri = cluster.uris[0]
    first = set(cluster.workers())
    events, flowing = Events(), threading.Event()
    load, results = load_in_background(
        LoadConfig(uri, duration=4.7, concurrency=4, connect=connect, timeout=5.0), events, flowing
    )
    assert flowing.wait(10), "the load never started"

    def hup(n: int) -> None:
        cluster.signal(signal.SIGHUP)
        events.mark(f"HUP {n + 1}")

    every(0.3, 10, hup)
    load.join(60)
    assert_no_errors(results[0])
    assert len(results[0].events) == 10
    # Once the load's connections are closed, only new workers remain; the master is the same.
    wait_for(lambda: not (set(cluster.workers()) & first) and len(cluster.workers()) == 2, 30,
             "every old worker gone")  # fmt: skip
    assert alive(cluster.pid) and cluster.log.count("reload: starting generation") >= 5


VERSIONED = """
from workers import BaseRequestHandler

VERSION = b"{version}"


class Handler(BaseRequestHandler):
    def handle(self):
        self.request.sendall(VERSION)
"""


WAITING = """
from workers import StreamRequestHandler


class Handler(StreamRequestHandler):
    speaks_first = True  # a connection that says nothing yet still holds its worker

    def handle(self):
        if self.rfile.readline().strip() == b"wait":  # held until the client's next line
            self.rfile.readline()
        self.wfile.write(b"v1")
"""


def test_after_a_refused_reload_max_requests_waits_until_new_code_boots(
    start_cluster, tmp_path: Path
) -> None:
    """A reload refused because the app on disk does not import: any worker forked now
    would import it and fail, so none recycles at --max-requests (one after another the
    pool emptied, before) until a reload with code that imports; that generation recycles."""
    app = tmp_path / "versioned.py"
    app.write_text(VERSIONED.format(version="v1"))
    cluster = start_cluster("versioned:Handler", "-w", "2", "--max-requests", "5",
                            "--max-requests-jitter", "0", "-b", "127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    ask = lambda: stream_roundtrip(tcp_connect(cluster.address()), b"")  # noqa: E731
    workers = sorted(cluster.workers())
    app.write_text("this is not python(\n")
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload failed: cannot import app 'versioned:Handler'")
    cluster.wait_log(r"generation 1: recycling \(--max-requests\) held until a new worker boots: "
                     "the app on disk does not import")  # fmt: skip
    assert [ask() for _ in range(20)] == [b"v1"] * 20  # twice the two workers' 5 each
    cluster.wait_log(r"recycling held at 5 requests \(--max-requests\)")
    assert sorted(cluster.workers()) == workers and "recycling after" not in cluster.log
    app.write_text(VERSIONED.format(version="v2"))
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload complete: generation 2")
    assert [ask() for _ in range(12)] == [b"v2"] * 12
    cluster.wait_log("recycling after 5 requests")  # the new generation recycles as before


def test_a_replacement_that_cannot_boot_holds_the_others_recycling(
    start_cluster, tmp_path: Path
) -> None:
    """New code on disk and no reload: a worker recycles, its replacement fails to boot, and
    the other worker serves on past --max-requests instead of leaving the pool empty; once
    the code imports again, a respawn boots and the held worker recycles."""
    app = tmp_path / "waiting.py"
    app.write_text(WAITING)
    cluster = start_cluster("waiting:Handler", "-w", "2", "--max-requests", "3",
                            "--max-requests-jitter", "0", "-b", "127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    app.write_text("this is not python(\n")
    with tcp_connect(cluster.address()) as held:  # the first in the queue: one worker's
        held.sendall(b"wait\n")
        for _ in range(3):  # the other worker's 3: it recycles, its replacement cannot boot
            assert stream_roundtrip(tcp_connect(cluster.address()), b"go\n") == b"v1"
        cluster.wait_log(r"recycling \(--max-requests\) held until a new worker boots: "
                         r"worker \d+ did not boot")  # fmt: skip
        held.sendall(b"done\n")
        assert read_all(held) == b"v1"
    served = [stream_roundtrip(tcp_connect(cluster.address(), timeout=10), b"go\n")
              for _ in range(6)]  # fmt: skip
    assert served == [b"v1"] * 6  # the held worker, past its 3
    cluster.wait_log(r"recycling held at \d+ requests \(--max-requests\)")
    app.write_text(WAITING)  # fixed: the slot's next respawn boots, and the hold ends
    cluster.wait_log(r"booted: the workers of generation 1 recycle again", timeout=20)
    for _ in range(4):  # the held worker is past its 3: its next request is its last
        assert stream_roundtrip(tcp_connect(cluster.address(), timeout=10), b"go\n") == b"v1"
    # Its count is past 3 (the held request and 6 more, at least); a new worker's would be 3.
    past = lambda: [n for n in re.findall(r"recycling after (\d+) requests", cluster.log)  # noqa: E731
                    if int(n) > 3]  # fmt: skip
    wait_for(past, 10, "the held worker's recycling, past its --max-requests")


def test_broken_app_keeps_the_old_generation_and_a_fixed_one_loads(
    start_cluster, tmp_path: Path
) -> None:
    app = tmp_path / "versioned.py"
    app.write_text(VERSIONED.format(version="v1"))
    cluster = start_cluster("versioned:Handler", "-w", "2", "-b", "127.0.0.1:0", cwd=tmp_path)
    ask = lambda: stream_roundtrip(tcp_connect(cluster.address()), b"")  # noqa: E731
    assert ask() == b"v1"
    old = sorted(cluster.workers())
    app.write_text("this is not python(\n")
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload failed: cannot import app 'versioned:Handler'")
    assert sorted(cluster.workers()) == old and ask() == b"v1"
    app.write_text(VERSIONED.format(version="v2"))
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload complete: generation 2")
    new = sorted(cluster.workers())
    assert not set(new) & set(old) and len(new) == 2
    assert {ask() for _ in range(10)} == {b"v2"}


def test_new_generation_that_cannot_boot_is_abandoned(start_cluster, tmp_path: Path) -> None:
    """The health gate: the app imports in the master but its workers die before ready."""
    app = tmp_path / "gated.py"
    app.write_text(VERSIONED.format(version="v1"))
    cluster = start_cluster("gated:Handler", "-w", "2", "-b", "127.0.0.1:0", cwd=tmp_path)
    old = sorted(cluster.workers())
    app.write_text(
        "from setproctitle import getproctitle\n"
        "if getproctitle().startswith('cluster: worker'):\n"
        "    raise RuntimeError('no boot in workers')\n" + VERSIONED.format(version="v2")
    )
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload failed: worker \\d+ of the new generation")
    wait_for(lambda: sorted(cluster.workers()) == old, 10, "only the old workers")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"") == b"v1"


def test_rolling_reload_stays_between_n_and_n_plus_1(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "3", "--reload-strategy", "rolling", "-b", "127.0.0.1:0")
    old = set(cluster.workers())
    counts: list[int] = []
    done = threading.Event()

    sampler = sample_until(done, lambda: counts.append(len(children(cluster.pid))))
    try:
        cluster.signal(signal.SIGHUP)
        cluster.wait_log("reload complete: generation 2", timeout=30)
    finally:
        done.set()
        sampler.join()
    assert min(counts) >= 3 and max(counts) <= 4, sorted(set(counts))
    assert 4 in counts  # it did overlap, one at a time
    assert not set(cluster.workers()) & old


def test_ttin_ttou_within_max_workers(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "2", "--max-workers", "4", "-b", "127.0.0.1:0")
    count = lambda: len(children(cluster.pid))  # noqa: E731
    for expected in (3, 4, 4):
        cluster.signal(signal.SIGTTIN)
        wait_for(lambda e=expected: count() == e, 10, f"{expected} workers")
    cluster.wait_log("refused: the pool cannot grow past --max-workers 4")
    for expected in (3, 2):
        cluster.signal(signal.SIGTTOU)
        wait_for(lambda e=expected: count() == e, 10, f"{expected} workers")
    cluster.wait_log("pool target is now 2 workers")
    assert count() == 2


@pytest.mark.slow
def test_adaptive_pool_grows_under_a_burst_and_shrinks_after(start_cluster) -> None:
    """A burst of 2 slow requests: the pool grows past them (1 -> 2 -> 4, a step a second),
    then, with no request left, retires one idle worker a second. (Each step costs a
    second: a burst of 4 took 7 s to go up to 6 and back down to 2.)"""
    cluster = start_cluster("testapps:Gate", "-w", "1", "--min-spare", "1", "--max-spare", "1",
                            "--max-workers", "6", "-b", "127.0.0.1:0")  # fmt: skip
    count = lambda: len(children(cluster.pid))  # noqa: E731
    held = []
    try:
        for _ in range(2):  # a burst of slow requests, each holding a worker
            sock = tcp_connect(cluster.address(), timeout=20)
            held.append(sock)
            assert read_line(sock).startswith(b"started")
        wait_for(lambda: count() >= 3, 15, "the pool to grow past the burst")
    finally:
        for sock in held:
            sock.sendall(b"finish\n")
            read_line(sock)
            sock.close()
    wait_for(lambda: count() <= 2, 20, "the pool to shrink back")
    assert "adaptive:" in cluster.log


@pytest.mark.slow
def test_usr2_upgrade_under_load(start_cluster, tmp_path: Path) -> None:
    pidfile = tmp_path / "m.pid"
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0", "--pidfile", str(pidfile))
    events = Events()
    flowing = threading.Event()
    load, results = load_in_background(
        LoadConfig(cluster.uris[0], duration=4.0, concurrency=4, connect="per-request"),
        events,
        flowing,
    )
    assert flowing.wait(10), "the load never started"
    cluster.signal(signal.SIGUSR2)
    events.mark("USR2 sent")
    match = cluster.wait_log(r"upgrade: started new master (\d+)")
    new_pid = int(match.group(1))
    cluster.adopt(new_pid)
    assert cluster.wait_exit(timeout=30) == 0  # the old master retired itself
    cluster.adopt(new_pid)  # again: its workers exist by now
    load.join(60)
    assert_no_errors(results[0])
    # The upgrade happened under load: requests were served before and after it.
    (usr2,) = results[0].events
    seconds = [entry for entry in results[0].timeline if entry["requests"]]
    started = results[0].started_at
    assert any(started + e["second"] < usr2.time for e in seconds)
    assert any(started + e["second"] > usr2.time + 0.5 for e in seconds)
    assert alive(new_pid) and pidfile.read_text().strip() == str(new_pid)
    assert not Path(str(pidfile) + ".oldbin").exists()
    assert stream_roundtrip(tcp_connect(cluster.address()), b"new") == b"new"
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not alive(new_pid), 10, "the new master to stop")


def test_failed_upgrade_leaves_the_old_master_serving(start_cluster, tmp_path: Path) -> None:
    app = tmp_path / "upgr.py"
    app.write_text(VERSIONED.format(version="v1"))
    pidfile = tmp_path / "m.pid"
    cluster = start_cluster("upgr:Handler", "-w", "1", "-b", "127.0.0.1:0", "--pidfile",
                            str(pidfile), cwd=tmp_path)  # fmt: skip
    app.write_text("broken(\n")  # the new master cannot load the app: exit 3
    cluster.signal(signal.SIGUSR2)
    match = cluster.wait_log(r"upgrade: started new master (\d+)")
    cluster.adopt(int(match.group(1)))
    cluster.wait_log(r"upgrade failed: new master \d+ exited with code 3; still serving")
    assert alive(cluster.pid) and pidfile.read_text().strip() == str(cluster.pid)
    assert stream_roundtrip(tcp_connect(cluster.address()), b"") == b"v1"


def test_term_serves_every_queued_connection(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "2", "--backlog", "128", "-b", "127.0.0.1:0")
    busy = [tcp_connect(cluster.address()) for _ in range(2)]
    for sock in busy:
        assert read_line(sock).startswith(b"started")  # both workers are now busy
    queued = []
    for _ in range(50):  # these wait in the kernel's backlog: no worker is free
        sock = tcp_connect(cluster.address(), timeout=30)
        sock.sendall(b"finish\n")
        queued.append(sock)
    cluster.signal(signal.SIGTERM)
    cluster.wait_log("graceful stop")
    for sock in busy:
        sock.sendall(b"finish\n")
    for sock in busy:
        with sock:
            assert read_line(sock).startswith(b"done")
    for sock in queued:  # every queued connection got its full reply, none was reset
        with sock:
            assert read_line(sock).startswith(b"started")
            assert read_line(sock).startswith(b"done")
    assert cluster.wait_exit() == 0


def test_graceful_timeout_kills_and_exits_non_zero(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "1", "--graceful-timeout", "1",
                            "-b", "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    with tcp_connect(cluster.address()) as sock:
        assert read_line(sock).startswith(b"started")
        cluster.signal(signal.SIGTERM)
        assert cluster.wait_exit(timeout=10) == 1
    assert f"stop timed out: killing workers {worker}" in cluster.log


def test_second_term_switches_to_a_quick_stop(start_cluster) -> None:
    cluster = start_cluster("testapps:Gate", "-w", "1", "-b", "127.0.0.1:0")
    with tcp_connect(cluster.address()) as sock:
        assert read_line(sock).startswith(b"started")
        cluster.signal(signal.SIGTERM)
        cluster.wait_log("graceful stop")
        started = time.monotonic()
        cluster.signal(signal.SIGTERM)
        cluster.wait_log("quick stop")
        assert cluster.wait_exit(timeout=10) == 0
        assert time.monotonic() - started < 5


def test_reload_opens_and_closes_binds(start_cluster, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('workers = 1\nbind = ["127.0.0.1:0"]\n')
    cluster = start_cluster("echo", "--config", str(config))
    (first,) = cluster.uris
    config.write_text(f'workers = 1\nbind = ["udp://127.0.0.1:0", "unix:{tmp_path}/added.sock"]\n')
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload complete: generation 2")
    cluster.wait_log(f"closed {first}")
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(f"{tmp_path}/added.sock")
    assert stream_roundtrip(sock, b"added") == b"added"
    port = int(first.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_ten_hups_leak_no_fd_and_no_thread_in_the_master(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0", "-b", "udp://127.0.0.1:0")
    fds = lambda: sorted(os.listdir(f"/proc/{cluster.pid}/fd"))  # noqa: E731
    threads = lambda: len(os.listdir(f"/proc/{cluster.pid}/task"))  # noqa: E731
    before_fds, before_threads = fds(), threads()
    for generation in range(2, 12):
        cluster.signal(signal.SIGHUP)
        cluster.wait_log(f"reload complete: generation {generation} ")
    wait_for(lambda: len(children(cluster.pid)) == 2, 10, "two workers")
    assert fds() == before_fds
    assert threads() == before_threads == 1


def test_systemd_socket_activation(tmp_path: Path) -> None:
    """LISTEN_FDS/LISTEN_PID: the master adopts fd 3 for the first --bind and binds nothing."""
    import sys

    from tests.conftest import Cluster

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    # What systemd does between its fork and exec: the socket at fd 3, our pid in LISTEN_PID.
    script = (
        f"import os, sys; os.dup2({listener.fileno()}, 3); os.environ['LISTEN_FDS'] = '1'; "
        "os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, '-m', 'cluster', 'run', 'echo', '-w', '1', "
        "'-b', '127.0.0.1:0'])"
    )
    cluster = Cluster([], command=[sys.executable, "-c", script], pass_fds=(listener.fileno(),))
    listener.close()  # the master holds it now
    try:
        cluster.wait_ready()
        assert cluster.uris == [f"tcp://127.0.0.1:{port}"]  # the inherited socket, not port 0
        assert stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"socket activated") == (
            b"socket activated"
        )
    finally:
        cluster.end()


def masters_serving(port: int) -> list[int]:
    """Pids of the cluster masters that hold a listener on 127.0.0.1:``port``."""
    found = tcp_listener(port)
    inode = found[1] if found else None
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read()
            if not title.startswith(b"cluster: master"):
                continue
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if f"socket:[{inode}]" in links:
            found.append(pid)
    return found


def test_term_to_the_old_master_before_the_new_one_is_ready(start_cluster, tmp_path: Path) -> None:
    """The operator stops the old master while the new one still boots: the old one stops
    gracefully and leaves the new one, which then serves; a client that came meanwhile waits
    in the listener's queue and is answered."""
    hold = tmp_path / "hold"
    cluster = start_cluster("slowboot:Handler", "-w", "1", "-b", "127.0.0.1:0",
                            env={"SLOWBOOT_HOLD": str(hold)})  # fmt: skip
    port = cluster.address()[1]
    hold.write_text("held")  # the new master's workers cannot finish booting
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    wait_for(lambda: new_pid in masters_serving(port), 10, "the new master to hold the listener")
    cluster.signal(signal.SIGTERM)
    cluster.wait_log(f"stopping during the upgrade: leaving the new master {new_pid} to take over")
    assert cluster.wait_exit(timeout=15) == 0
    waiting = tcp_connect(("127.0.0.1", port), timeout=30)  # queued: nobody accepts yet
    waiting.sendall(b"queued while the new master boots")
    cluster.adopt(new_pid)
    hold.unlink()
    assert stream_roundtrip(waiting, b"") == b"queued while the new master boots"
    assert masters_serving(port) == [new_pid]
    assert stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"after") == b"after"
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not alive(new_pid), 10, "the new master to stop")


def test_term_to_the_old_master_after_the_new_one_is_ready(start_cluster) -> None:
    """The new master said ready and the old one is draining a long request when the operator
    sends TERM: the stop stays graceful (the request finishes), and the new master serves."""
    cluster = start_cluster("testapps:Gate", "-w", "1", "-b", "127.0.0.1:0")
    port = cluster.address()[1]
    busy = tcp_connect(("127.0.0.1", port), timeout=30)
    assert read_line(busy).startswith(b"started")  # the old worker is in a request
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    cluster.wait_log(rf"upgrade: the new master {new_pid} is ready; stopping gracefully")
    cluster.signal(signal.SIGTERM)
    cluster.wait_log("already stopping gracefully after the handover")
    with tcp_connect(("127.0.0.1", port)) as fresh:  # served by the new master's worker
        assert read_line(fresh).startswith(b"started")
        fresh.sendall(b"finish\n")
        assert read_line(fresh).startswith(b"done")
    busy.sendall(b"finish\n")
    assert read_line(busy).startswith(b"done")  # the old worker finished its request
    busy.close()
    assert cluster.wait_exit(timeout=15) == 0
    cluster.adopt(new_pid)
    assert masters_serving(port) == [new_pid]
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not alive(new_pid), 10, "the new master to stop")


HELD_IMPORT = """
import os
from setproctitle import getproctitle
from cluster.apps.echo import EchoHandler as Handler
from tests.procs import wait_for

if os.path.exists("hold") and not getproctitle().startswith("cluster: worker"):
    with open(f"checking.{os.getpid()}", "w"):  # the master's check of the app is here
        pass
    wait_for(lambda: not os.path.exists("hold"), 60, "the test to let the import go on")
"""


def test_a_reload_whose_app_imports_slowly_leaves_the_master_serving(
    start_cluster, tmp_path: Path
) -> None:
    """A HUP checks the app in a throwaway process; the master waited for it, so an app whose
    import takes seconds stopped its loop that long: no health answers, no respawns. The
    check now runs beside the loop; a stop during it ends the check too."""
    (tmp_path / "held.py").write_text(HELD_IMPORT)
    cluster = start_cluster("held:Handler", "-w", "2", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    health = int(cluster.wait_log(r"health on tcp://127\.0\.0\.1:(\d+)").group(1))
    hold = tmp_path / "hold"
    hold.touch()
    cluster.signal(signal.SIGHUP)
    first = wait_for(lambda: list(tmp_path.glob("checking.*")), 10, "the app's check to begin")
    workers = lambda: set(cluster.workers()) - {int(first[0].suffix[1:])}  # noqa: E731
    with tcp_connect(("127.0.0.1", health), timeout=1.0) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_line(sock).startswith(b"HTTP/1.1 200 ")
    victim = min(workers())
    os.kill(victim, signal.SIGKILL)
    cluster.wait_log(rf"worker {victim} \(slot \d\) died: killed by SIGKILL", timeout=2)
    wait_for(lambda: len(workers() - {victim}) == 2, 2,
             "the killed worker replaced during the check")  # fmt: skip
    hold.unlink()
    cluster.wait_log("reload complete: generation 2")
    for marker in tmp_path.glob("checking.*"):
        marker.unlink()
    hold.touch()
    cluster.signal(signal.SIGHUP)
    check = int(wait_for(lambda: list(tmp_path.glob("checking.*")), 10, "a second check")[0]
                .suffix[1:])  # fmt: skip
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit(timeout=10) == 0
    assert "reload abandoned: stopping during the app's check" in cluster.log
    wait_for(lambda: not alive(check), 2, "the check's process gone with the master")


def test_a_killed_app_check_fails_that_reload_alone_and_holds_no_recycling(
    start_cluster, tmp_path: Path
) -> None:
    """The reload's check killed from outside: one line that says so, the old generation
    serves on, and --max-requests goes on as before (nothing says the app is broken)."""
    (tmp_path / "held.py").write_text(HELD_IMPORT)
    cluster = start_cluster("held:Handler", "-w", "1", "--max-requests", "100", "-b",
                            "127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    hold = tmp_path / "hold"
    hold.touch()
    cluster.signal(signal.SIGHUP)
    marker = wait_for(lambda: list(tmp_path.glob("checking.*")), 10, "the app's check")[0]
    os.kill(int(marker.suffix[1:]), signal.SIGKILL)
    cluster.wait_log("reload failed: cannot check the app: the check was killed by SIGKILL; "
                     "still serving generation 1")  # fmt: skip
    cluster.signal(signal.SIGTTIN)  # a later line: had a hold been logged, it would be before
    cluster.wait_log(r"command: incr")
    assert "held until a new worker boots" not in cluster.log
    hold.unlink()
    assert alive(cluster.pid)


HALF_BROKEN = """
import os, re
from setproctitle import getproctitle
from cluster.apps.echo import EchoHandler as Handler

title = re.search(r"slot=(\\d+) gen=(\\d+)", getproctitle())
if title and os.path.exists("broken"):
    slot, generation = int(title[1]), int(title[2])
    if not (generation == 2 and slot < 2):  # only the first two new workers boot
        raise RuntimeError(f"cannot boot slot {slot} of generation {generation}")
"""


def test_a_rolling_reload_failing_half_way_keeps_the_pool_whole(
    start_cluster, tmp_path: Path
) -> None:
    """A rolling reload had retired two old workers for two new ones when the third new one
    failed; the abort killed the two new ones, and the old generation's replacements import
    the app from disk too, the same broken code: 2 of 4 workers served until it was fixed.
    The ready new workers now serve on until the old generation is whole again."""
    (tmp_path / "halfbroken.py").write_text(HALF_BROKEN)
    cluster = start_cluster("halfbroken:Handler", "-w", "4", "--reload-strategy", "rolling",
                            "-b", "127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    (tmp_path / "broken").touch()
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload failed: worker \\d+ of the new generation")
    cluster.wait_log(r"reload failed: 2 ready workers of the new generation serve on until")
    standing = [pid for pid in cluster.workers() if b"gen=2" in title_of(pid)]
    assert len(standing) == 2
    holds_for(lambda: all(alive(pid) for pid in standing), 0.3, "the new workers serving on")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"on") == b"on"
    (tmp_path / "broken").unlink()
    for pid in standing:
        cluster.wait_log(rf"retiring worker {pid} \(slot \d\): generation 1 is whole again")
    cluster.wait_log("reload complete: generation 1 serving with 4 workers")
    wait_for(lambda: not any(alive(pid) for pid in standing), 5, "the new workers gone")


def title_of(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def test_a_late_new_master_is_one_failed_upgrade_in_the_log(start_cluster, tmp_path: Path) -> None:
    """A new master not ready within --graceful-timeout is killed; its exit then said
    "upgrade failed" a second time, for the same failure."""
    hold = tmp_path / "hold"
    cluster = start_cluster("slowboot:Handler", "-w", "1", "-b", "127.0.0.1:0",
                            "--graceful-timeout", "1", env={"SLOWBOOT_HOLD": str(hold)})  # fmt: skip
    hold.write_text("held")  # the new master's workers cannot finish booting
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    cluster.wait_log(rf"upgrade failed: new master {new_pid} not ready within 1s; killing it")
    cluster.wait_log(rf"upgrade: the new master {new_pid} killed by SIGKILL")
    assert cluster.log.count("upgrade failed") == 1
    hold.unlink()
    assert stream_roundtrip(tcp_connect(cluster.address()), b"still") == b"still"


def test_a_new_master_killed_after_the_handover_hands_the_host_back_to_the_old_one(
    start_cluster, tmp_path: Path
) -> None:
    """The new master said ready, the old one drains a long request, and the new one is
    killed: nothing would serve once the old one exited. The old one takes the host back
    instead (an error line says why): new workers serve, the stopping one finishes its
    request, and the pidfile, the control socket and the health endpoint are its own again."""
    pidfile, control = tmp_path / "m.pid", tmp_path / "m.ctl"
    cluster = start_cluster("testapps:Gate", "-w", "1", "-b", "127.0.0.1:0", "--pidfile",
                            str(pidfile), "--control", str(control), "--health",
                            "tcp://127.0.0.1:0")  # fmt: skip
    health = int(cluster.wait_log(r"health on tcp://127\.0\.0\.1:(\d+)").group(1))
    busy = tcp_connect(cluster.address(), timeout=30)
    assert read_line(busy).startswith(b"started")  # the old worker is in a request
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    cluster.wait_log(rf"upgrade: the new master {new_pid} is ready; stopping gracefully")
    os.kill(new_pid, signal.SIGKILL)
    cluster.wait_log(rf"\[ERROR\] upgrade: the new master {new_pid} killed by SIGKILL after "
                     r"the handover; taking the host back")  # fmt: skip
    fresh = tcp_connect(cluster.address(), timeout=30)  # a new worker of the old master
    assert read_line(fresh).startswith(b"started")
    fresh.sendall(b"finish\n")
    assert read_line(fresh).startswith(b"done")
    fresh.close()
    busy.sendall(b"finish\n")
    assert read_line(busy).startswith(b"done")  # the stopping worker finished its request
    busy.close()
    assert pidfile.read_text().strip() == str(cluster.pid)
    assert not Path(str(pidfile) + ".oldbin").exists()
    status = subprocess.run([sys.executable, "-m", "cluster", "ctl", "--control", str(control),
                             "status"], env=cluster_env(), capture_output=True, text=True,
                            timeout=20, stdin=subprocess.DEVNULL)  # fmt: skip
    assert status.returncode == 0 and str(cluster.pid) in status.stdout, status
    with tcp_connect(("127.0.0.1", health), timeout=10) as sock:  # ours again, not dropped
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.split()[1] == b"200" and json.loads(body)["pid"] == cluster.pid, (head, body)
    assert alive(cluster.pid)
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit(timeout=15) == 0


def test_a_scaling_signal_to_a_new_master_still_booting_waits_for_its_handlers(
    start_cluster, tmp_path: Path
) -> None:
    """A TTIN to the new master of an upgrade (its pid is in the log, soon in the pidfile)
    before it had installed its handlers took the default action: the kernel stopped it,
    and the upgrade failed a --graceful-timeout later. It waits now, blocked from the exec
    on, and the new master handles it once it can (HUP, USR1 and USR2 killed it so)."""
    hold = tmp_path / "hold"
    cluster = start_cluster("slowboot:Handler", "-w", "1", "-b", "127.0.0.1:0",
                            "--graceful-timeout", "5", env={"SLOWBOOT_CHECK_HOLD": str(hold)})  # fmt: skip
    hold.write_text("held")  # the new master's check of the app cannot finish
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    wait_for(lambda: children(new_pid), 10, "the new master's check of the app")
    os.kill(new_pid, signal.SIGTTIN)
    hold.unlink()
    cluster.wait_log(rf"\[{new_pid}\] \[INFO\] command: incr 1 \(from SIGTTIN\)")
    cluster.wait_log(rf"upgrade: the new master {new_pid} is ready; stopping gracefully")
    assert cluster.wait_exit(timeout=15) == 0
    cluster.adopt(new_pid)
    wait_for(lambda: len(children(new_pid)) == 2, 10, "the new master's two workers")
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not alive(new_pid), 10, "the new master to stop")


ROUGH_IMPORT = """
import os
from setproctitle import getproctitle
from cluster.apps.echo import EchoHandler as Handler
from tests.procs import wait_for

if not getproctitle().startswith("cluster: worker"):  # the master's check of the app
    if os.path.exists("close"):  # closes fds it does not know, the check's pipe among them
        os.closerange(3, 1024)
        open(f"closed.{os.getpid()}", "w").close()
        wait_for(lambda: not os.path.exists("close"), 60, "the test to let the import go on")
    if os.path.exists("helper") and os.fork() == 0:  # a helper that outlives the import
        open(f"helper.{os.getpid()}", "w").close()
        wait_for(lambda: not os.path.exists("helper"), 60, "the test to end the helper")
        os._exit(0)
"""


def test_the_app_check_ends_with_its_process_not_its_pipe(start_cluster, tmp_path: Path) -> None:
    """An import that closed the check's pipe blocked the master in waitpid until it ended
    (no health answer); one that forked a helper, which kept the pipe open, failed the
    reload after 30s ("importing it took over 30s") though the app imported."""
    (tmp_path / "rough.py").write_text(ROUGH_IMPORT)
    cluster = start_cluster("rough:Handler", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    health = int(cluster.wait_log(r"health on tcp://127\.0\.0\.1:(\d+)").group(1))
    (tmp_path / "close").touch()
    cluster.signal(signal.SIGHUP)
    wait_for(lambda: list(tmp_path.glob("closed.*")), 10, "the check to close its fds")
    with tcp_connect(("127.0.0.1", health), timeout=2.0) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_line(sock).startswith(b"HTTP/1.1 200 ")
    (tmp_path / "close").unlink()
    cluster.wait_log("reload complete: generation 2", timeout=5)
    (tmp_path / "helper").touch()
    cluster.signal(signal.SIGHUP)
    helper = int(wait_for(lambda: list(tmp_path.glob("helper.*")), 10, "the helper")[0]
                 .suffix[1:])  # fmt: skip
    try:
        cluster.wait_log("reload complete: generation 3", timeout=5)
        assert alive(helper)
    finally:
        (tmp_path / "helper").unlink()
        os.kill(helper, signal.SIGKILL)


def test_the_start_s_app_check_ends_with_its_process_not_its_pipe(
    start_cluster, tmp_path: Path
) -> None:
    """The same at start: an import that forks a helper keeping the check's pipe open made
    the start wait for the helper (or fail it after 30 s), though the app imported."""
    (tmp_path / "rough.py").write_text(ROUGH_IMPORT)
    (tmp_path / "helper").touch()
    cluster = start_cluster("rough:Handler", "-w", "1", "-b", "127.0.0.1:0", cwd=tmp_path,
                            wait=False)  # fmt: skip
    helper = int(wait_for(lambda: list(tmp_path.glob("helper.*")), 10, "the helper")[0]
                 .suffix[1:])  # fmt: skip
    try:
        cluster.wait_log(r"ready: 1 worker", timeout=10)
        assert alive(helper)  # still holding the pipe: the start did not wait for it
    finally:
        (tmp_path / "helper").unlink()
        os.kill(helper, signal.SIGKILL)


def test_the_app_check_dies_with_a_killed_master(start_cluster, tmp_path: Path) -> None:
    """kill -9 of the master during a reload's app check left the check running as long as
    its import did, titled like a second master."""
    (tmp_path / "held.py").write_text(HELD_IMPORT)
    cluster = start_cluster("held:Handler", "-w", "1", "-b", "127.0.0.1:0", cwd=tmp_path)
    (tmp_path / "hold").touch()
    cluster.signal(signal.SIGHUP)
    marker = wait_for(lambda: list(tmp_path.glob("checking.*")), 10, "the app's check")[0]
    check = int(marker.suffix[1:])
    assert title_of(check).startswith(b"cluster: app check of master %d" % cluster.pid)
    os.kill(cluster.pid, signal.SIGKILL)
    wait_for(lambda: not alive(check), 2, "the check gone with its master")

"""Generations: a reload may change the mode and the thread count, and each generation's
workers run with a scoreboard of their own; the library's scale(), reload() and status()."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from loadtest import Events, LoadConfig, run
from tests.conftest import read_line, tcp_connect
from tests.procs import children, wait_for

pytestmark = pytest.mark.timeout(120)

SLOW = 0.5  # seconds each of the concurrent requests works


def slow_requests(address: tuple[str, int], count: int) -> list[bytes]:
    """``count`` requests of SLOW seconds each, all at once; their replies, in order."""
    replies: list[bytes] = [b""] * count
    socks = [tcp_connect(address, timeout=20) for _ in range(count)]

    def one(n: int) -> None:
        with socks[n] as sock:
            sock.sendall(b"%g\n" % SLOW)
            replies[n] = read_line(sock)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return replies


def load_in_background(uri: str, seconds: float) -> tuple[threading.Thread, list]:
    """Echo load on ``uri`` for ``seconds``, in a thread; the result lands in the list."""
    results: list = []
    config = LoadConfig(uri, duration=seconds, concurrency=2, connect="per-request", timeout=10)
    thread = threading.Thread(target=lambda: results.append(run(config, events=Events())))
    thread.start()
    return thread, results


def handler_threads(pid: int) -> int:
    """Threads of a worker besides its main one."""
    return len(os.listdir(f"/proc/{pid}/task")) - 1


@pytest.mark.slow
def test_hup_moves_sync_to_thread_16_and_back_under_load(start_cluster, tmp_path: Path) -> None:
    """A real HUP with a config file whose mode and threads change: the new generation's
    scoreboard has the lanes its mode needs, so 16 concurrent requests on a 16-thread
    worker all get their reply (a scoreboard sized for sync would fail 15 of them)."""
    config = tmp_path / "c.toml"
    binds = 'bind = ["127.0.0.1:0", "127.0.0.1:0=echo"]'
    config.write_text(f'workers = 2\nworker_class = "sync"\n{binds}\n')
    cluster = start_cluster("testapps:Slow", "--config", str(config))
    slow, echo = cluster.address(), cluster.uris[1]
    load, results = load_in_background(echo, 4.0)  # the three reloads take 2-3 s
    steps = [('worker_class = "thread"\nthreads = 16', 16), ('worker_class = "thread"\nthreads = 4', 4),
             ('worker_class = "sync"', 0)]  # fmt: skip
    for generation, (settings, threads) in enumerate(steps, start=2):
        config.write_text(f"workers = 2\n{settings}\n{binds}\n")
        cluster.signal(signal.SIGHUP)
        cluster.wait_log(f"reload complete: generation {generation} ", timeout=30)
        pids = wait_for(lambda: len(w := cluster.workers()) == 2 and w, 10, "two workers")
        assert [handler_threads(pid) for pid in pids] == [threads, threads]
        replies = slow_requests(slow, max(threads, 1))
        assert all(reply.startswith(b"done ") for reply in replies), replies
    load.join(60)
    assert results[0].requests > 100 and results[0].error_count == 0, results[0].errors
    assert "Traceback" not in cluster.log and "IndexError" not in cluster.log


def busy_lanes_reach(server, lanes: int) -> int:
    """Poll status() until its workers show ``lanes`` busy lanes in all; return the count."""

    def busy() -> int:
        count = sum(w["busy_lanes"] for w in server.status()["workers"])
        return count if count >= lanes else 0

    return wait_for(busy, 10, f"{lanes} busy lanes")


def lanes_by_generation(server) -> dict[int, tuple[str, int]]:
    return {w["generation"]: (w["mode"], w["lanes"]) for w in server.status()["workers"]}


@pytest.mark.slow
def test_library_reload_changes_mode_and_status_shows_each_generations_lanes(
    served, tmp_path: Path
) -> None:
    from cluster import PreforkTCPServer
    from tests.apps.testapps import Slow

    config = tmp_path / "lib.toml"
    config.write_text('worker_class = "sync"\n')
    server = served(PreforkTCPServer(("127.0.0.1", 0), Slow, workers=2, config=str(config)))
    assert lanes_by_generation(server) == {1: ("sync", 1)}
    for generation, (settings, mode, lanes) in enumerate(
        [('worker_class = "thread"\nthreads = 16', "thread", 16),
         ('worker_class = "thread"\nthreads = 4', "thread", 4),
         ('worker_class = "sync"', "sync", 1)], start=2,
    ):  # fmt: skip
        config.write_text(settings + "\n")
        reply = server.reload()
        assert reply == {"ok": True, "generation": generation}
        wait_for(lambda g=generation: set(lanes_by_generation(server)) == {g}, 20,
                 f"only generation {generation} left")  # fmt: skip
        assert lanes_by_generation(server) == {generation: (mode, lanes)}
        busy: list[int] = []
        prober = threading.Thread(
            target=lambda n=lanes, seen=busy: seen.append(busy_lanes_reach(server, n))
        )
        prober.start()
        replies = slow_requests(server.server_address, lanes)
        prober.join(15)
        assert all(reply.startswith(b"done ") for reply in replies), replies
        assert busy and busy[0] >= lanes  # the requests did run at once, one per lane
        summary = {g["number"]: g for g in server.status()["generations"]}
        assert summary[generation]["lanes"] == lanes


def test_library_scale_and_reload(served) -> None:
    from cluster import PreforkTCPServer
    from tests.apps.testapps import Pid

    server = served(PreforkTCPServer(("127.0.0.1", 0), Pid, workers=2, max_workers=4))

    def count() -> int:
        """Workers the master reports that are also real children of this process."""
        return len(set(server.worker_pids) & set(children(os.getpid())))

    assert server.scale(3) == {"ok": True, "target": 3}
    wait_for(lambda: count() == 3, 10, "3 workers")
    assert server.scale(1) == {"ok": True, "target": 1}
    wait_for(lambda: count() == 1, 10, "1 worker")
    refused = server.scale(5)
    assert refused["ok"] is False and "max-workers 4" in refused["error"]
    zero = server.scale(0)
    assert zero["ok"] is False and "at least 1" in zero["error"]
    assert server.scale(2)["ok"]
    before = set(wait_for(lambda: count() == 2 and server.worker_pids, 10, "2 workers"))
    assert server.reload()["ok"]
    wait_for(lambda: count() == 2 and not set(server.worker_pids) & before, 20,
             "every worker replaced")  # fmt: skip
    assert server.status()["generation"] == 2
    with socket.create_connection(server.server_address, timeout=5) as sock:
        assert int(read_line(sock)) in server.worker_pids


def test_library_status_and_commands_when_not_serving() -> None:
    from cluster import PreforkTCPServer
    from tests.apps.testapps import Pid

    server = PreforkTCPServer(("127.0.0.1", 0), Pid, workers=1)
    try:
        assert server.status() is None and server.scale(2) is None
        assert server.reload() is None and server.worker_pids == []
    finally:
        server.server_close()


def test_library_config_file_may_not_name_a_bind(tmp_path: Path) -> None:
    from cluster import PreforkTCPServer
    from tests.apps.testapps import Pid

    config = tmp_path / "bad.toml"
    config.write_text('bind = "127.0.0.1:9"\n')
    with pytest.raises(ValueError, match="'bind' is not for the library"):
        PreforkTCPServer(("127.0.0.1", 0), Pid, config=str(config))


def test_status_reports_listeners_uptime_and_slots(served) -> None:
    from cluster import PreforkTCPServer
    from tests.apps.testapps import Pid

    server = served(PreforkTCPServer(("127.0.0.1", 0), Pid, workers=2))
    started = time.monotonic()
    status = server.status()
    host, port = server.server_address
    assert status["listeners"] == [f"tcp://{host}:{port}"]
    assert status["pid"] == os.getpid() and 0 <= status["uptime"] < 60
    assert sorted(w["slot"] for w in status["workers"]) == [0, 1]
    assert {w["state"] for w in status["workers"]} == {"idle"}
    assert all(0 <= w["heartbeat_age"] < time.monotonic() - started + 5 for w in status["workers"])

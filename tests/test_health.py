"""Health for load balancers: ``--health`` (HTTP 200/503 and HAProxy's agent-check),
``--drain-delay`` on TERM, and ``ctl drain`` / ``undrain``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster import health
from cluster.health import DOWN, DRAINING, READY, STARTING, STOPPING, Health, state_of
from tests.conftest import ROOT, cluster_env, read_all, stream_roundtrip, tcp_connect
from tests.procs import wait_for

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ pure decisions
def test_state_of_ranks_stop_over_drain_over_boot() -> None:
    assert state_of(ready=True, drained=False, delaying=False, stopping=False) == READY
    assert state_of(ready=False, drained=False, delaying=False, stopping=False) == STARTING
    assert state_of(ready=True, drained=True, delaying=False, stopping=False) == DRAINING
    assert state_of(ready=True, drained=False, delaying=True, stopping=False) == DRAINING
    assert state_of(ready=False, drained=True, delaying=False, stopping=False) == DRAINING
    assert state_of(ready=True, drained=True, delaying=True, stopping=True) == STOPPING
    # ready once, and now no worker serves (none can boot): down, unless draining or stopping
    assert state_of(ready=True, drained=False, delaying=False, stopping=False,
                    serving=False) == DOWN  # fmt: skip
    assert state_of(ready=True, drained=True, delaying=False, stopping=False,
                    serving=False) == DRAINING  # fmt: skip
    assert state_of(ready=False, drained=False, delaying=False, stopping=False,
                    serving=False) == STARTING  # fmt: skip


def test_weight_is_the_idle_share_and_never_zero_in_rotation() -> None:
    assert health.weight(health.idle_share(2, 2)) == 100
    assert health.weight(health.idle_share(1, 4)) == 25
    assert health.weight(health.idle_share(0, 4)) == 1  # all busy: a place to queue, not a drain
    assert health.weight(health.idle_share(0, 0)) == 1
    assert health.weight(health.idle_share(9, 4)) == 100


def test_the_weight_follows_the_load_not_one_look() -> None:
    owner = Health()
    assert owner.weigh(1.0, now=10.0) == 100  # the first look is all there is
    assert 70 < owner.weigh(0.0, now=10.5) < 85  # one busy look half a second later
    for n in range(40):  # busy for 4 seconds, looked at ten times a second
        settled = owner.weigh(0.0, now=10.5 + (n + 1) / 10)
    assert settled < 15
    assert health.smoothed(0.5, 0.0, 1.0) == 0.5  # no time passed: no change


def test_agent_lines_follow_haproxys_grammar() -> None:
    assert health.agent_line({"state": READY, "weight": 75}) == b"ready 75%\n"
    assert health.agent_line({"state": DRAINING, "weight": 75}) == b"drain\n"
    assert health.agent_line({"state": STARTING, "weight": 1}) == b"maint\n"
    assert health.agent_line({"state": STOPPING, "weight": 1}) == b"maint\n"
    assert health.agent_line({"state": DOWN, "weight": 1}) == b"down\n"


def test_http_reply_is_200_only_when_ready_but_live_always() -> None:
    ready = {"state": READY, "weight": 100}
    draining = {"state": DRAINING, "weight": 100}
    assert health.http_reply(ready, b"GET / HTTP/1.1").startswith(b"HTTP/1.1 200 OK\r\n")
    assert health.http_reply(draining, b"GET /ready HTTP/1.1").startswith(b"HTTP/1.1 503 ")
    assert health.http_reply(draining, b"GET /live?x=1 HTTP/1.0").startswith(b"HTTP/1.1 200 ")
    head, _, body = health.http_reply(draining, b"GET / HTTP/1.1").partition(b"\r\n\r\n")
    assert json.loads(body) == draining and b"Content-Length: %d" % len(body) in head
    assert health.http_reply(ready, b"HEAD / HTTP/1.1").endswith(b"\r\n\r\n")


def test_a_drain_counts_against_the_drain_delay() -> None:
    owner = Health()
    assert owner.delay_left(10, now=100.0) == 10
    assert owner.drain(100.0) and not owner.drain(104.0)  # the first drain is the one
    assert owner.delay_left(10, now=106.0) == 4
    assert owner.delay_left(10, now=130.0) == 0
    assert owner.undrain() and not owner.undrain()
    carried = Health.from_environ({"CLUSTER_DRAINED": "7.5"}, now=50.0)
    assert carried.drained_since == 42.5
    assert Health.from_environ({"CLUSTER_DRAINED": "junk"}, now=50.0).drained_since is None


# ------------------------------------------------------------------ helpers
def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, dict]:
    """One HTTP health check: its status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def agent(port: int, timeout: float = 5.0) -> bytes:
    """What HAProxy's agent-check reads: it connects and says nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return read_all(sock)


def health_port(cluster) -> int:
    return int(cluster.wait_log(r"health on tcp://127\.0\.0\.1:(\d+)").group(1))


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", "ctl", "--control", str(path), *args],
                          cwd=ROOT, env=cluster_env({"COLUMNS": "200"}), capture_output=True,
                          text=True, timeout=20, stdin=subprocess.DEVNULL)  # fmt: skip


# ------------------------------------------------------------------ a real master
BROKEN = "this is not python(\n"


def test_a_host_whose_workers_died_and_cannot_boot_is_down_until_one_does(
    start_cluster, tmp_path: Path
) -> None:
    """Its one worker killed, and the code on disk broken: every replacement fails to boot,
    so nobody serves, and --health says so (503, agent ``down``) instead of ready; once the
    code imports again a replacement boots and the host is ready again."""
    app = tmp_path / "hello.py"
    good = "from workers import BaseRequestHandler\n\n\nclass Handler(BaseRequestHandler):\n" \
           "    def handle(self):\n        self.request.sendall(b'hi')\n"  # fmt: skip
    app.write_text(good)
    cluster = start_cluster("hello:Handler", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", cwd=tmp_path)  # fmt: skip
    port = health_port(cluster)
    assert get(port)[0] == 200
    (worker,) = cluster.workers()
    app.write_text(BROKEN)
    os.kill(worker, signal.SIGKILL)
    cluster.wait_log("boot failure")
    code, body = wait_for(lambda: (r := get(port))[0] == 503 and r, 10, "the host down")
    assert body["state"] == "down" and body["workers"] == 0
    assert agent(port) == b"down\n"
    app.write_text(good)
    wait_for(lambda: get(port)[0] == 200, 20, "a replacement booted: ready again")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"") == b"hi"


def test_ready_drain_and_undrain(start_cluster, tmp_path: Path) -> None:
    path = tmp_path / "c.ctl"
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", "--control", str(path))  # fmt: skip
    port = health_port(cluster)
    code, body = get(port)
    assert code == 200
    assert body["state"] == "ready" and body["generation"] == 1 and body["pid"] == cluster.pid
    assert body["workers"] == 2 and body["idle_workers"] == 2 and body["weight"] == 100
    assert agent(port) == b"ready 100%\n"

    drained = ctl(path, "drain")
    assert drained.returncode == 0 and "out of rotation" in drained.stdout, drained.stderr
    assert get(port)[0] == 503 and get(port)[1]["state"] == "draining"
    assert agent(port) == b"drain\n"
    assert get(port, "/live")[0] == 200  # liveness: a drained host must not be restarted
    assert stream_roundtrip(tcp_connect(cluster.address()), b"still served") == b"still served"
    status = ctl(path, "status")
    assert "draining (ctl drain)" in status.stdout, status.stdout

    assert ctl(path, "undrain").returncode == 0
    assert get(port)[0] == 200
    assert agent(port) == b"ready 100%\n"


def test_503_while_the_workers_boot_and_no_drain_delay_before_ready(start_cluster,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    hold = tmp_path / "hold"
    hold.write_text("held")
    cluster = start_cluster("slowboot:Handler", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", "--drain-delay", "60", wait=False,
                            env={"SLOWBOOT_HOLD": str(hold)})  # fmt: skip
    port = health_port(cluster)
    code, body = get(port)
    assert code == 503 and body["state"] == "starting" and body["workers"] == 0
    assert agent(port) == b"maint\n"
    cluster.signal(signal.SIGTERM)  # no balancer sends here yet: nothing to drain
    cluster.wait_log(r"graceful stop \(SIGTERM\)")
    hold.unlink()
    assert cluster.wait_exit(timeout=15) == 0
    assert "draining for" not in cluster.log
    assert "ready:" not in cluster.log  # the worker's boot ended during the stop: not ready


def test_drain_delay_reports_draining_while_serving_then_stops(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", "--drain-delay", "1.5")  # fmt: skip
    port = health_port(cluster)
    termed = time.monotonic()
    cluster.signal(signal.SIGTERM)
    wait_for(lambda: get(port)[0] == 503, 5, "health to say draining")
    assert get(port)[1]["state"] == "draining" and agent(port) == b"drain\n"
    for n in range(5):  # the delay: still served, by the same workers
        payload = b"during the delay %d" % n
        assert stream_roundtrip(tcp_connect(cluster.address()), payload) == payload
    assert cluster.wait_exit(timeout=15) == 0
    assert time.monotonic() - termed >= 1.5
    cluster.wait_log(r"graceful stop \(SIGTERM, after the drain delay\)")


def test_during_the_drain_delay_term_cuts_it_short_and_int_is_quick(start_cluster) -> None:
    first = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--drain-delay", "60")
    second = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--drain-delay", "60")
    for cluster in (first, second):
        cluster.signal(signal.SIGTERM)
        cluster.wait_log("draining for 60s before the graceful stop")
    first.signal(signal.SIGTERM)
    second.signal(signal.SIGINT)
    assert first.wait_exit(timeout=10) == 0 and second.wait_exit(timeout=10) == 0
    first.wait_log("drain delay cut short")
    assert "quick stop" in second.log


def test_health_stays_up_across_hup_and_usr2(start_cluster, tmp_path: Path) -> None:
    """Polled without pause through a reload and an upgrade: never refused, never 503; an
    operator's drain outlives the upgrade."""
    path = tmp_path / "c.ctl"
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0", "--control", str(path))  # fmt: skip
    port = health_port(cluster)
    answers: list[object] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                answers.append(get(port)[0] if len(answers) % 2 else agent(port))
            except (OSError, ValueError) as err:
                answers.append(err)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        cluster.signal(signal.SIGHUP)
        cluster.wait_log("reload complete: generation 2")
        cluster.signal(signal.SIGUSR2)
        new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
        cluster.adopt(new_pid)
        assert cluster.wait_exit(timeout=20) == 0
        cluster.adopt(new_pid)
        wait_for(lambda: len(answers) > 20 and get(port)[1]["pid"] == new_pid, 10,
                 "the new master to answer")  # fmt: skip
    finally:
        done.set()
        poller.join(10)
    bad = [a for a in answers if a not in (200, b"ready 100%\n")]
    assert not bad, f"{len(bad)} of {len(answers)} health checks failed: {bad[:5]}"

    assert ctl(path, "drain").returncode == 0
    upgraded = json.loads(ctl(path, "--json", "upgrade").stdout)
    cluster.adopt(upgraded["new_master"])
    wait_for(lambda: get(port)[1]["pid"] == upgraded["new_master"], 20, "the next new master")
    assert get(port)[0] == 503 and agent(port) == b"drain\n"


def test_a_silent_or_slow_health_client_blocks_nobody(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--health",
                            "tcp://127.0.0.1:0")  # fmt: skip
    port = health_port(cluster)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"GET / HT")  # and nothing more
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            started = time.monotonic()
            for _ in range(5):
                assert get(port)[0] == 200
            assert time.monotonic() - started < 2
            assert read_all(silent) == b"ready 100%\n"  # taken for an agent
        assert read_all(slow) == b""  # dropped at its deadline, answered nothing
    for garbage in (b"\x00\xff junk\n", b"x" * 9000):  # an agent-send line; over the bound
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(garbage)
            assert read_all(sock) in (b"ready 100%\n", b"HTTP/1.1 400 Bad Request\r\n"
                                      b"Content-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 405 ")
    assert stream_roundtrip(tcp_connect(cluster.address()), b"fine") == b"fine"


@pytest.mark.parametrize("server", ["health", "metrics"])
def test_a_flood_of_half_sent_checks_does_not_crowd_out_the_next_one(
    start_cluster, server: str
) -> None:
    """128 clients that send half a request filled the health server for their second of
    grace, and every real check meanwhile got a 400 (one attacker thread failed half of a
    balancer's checks): a full health (or metrics) server drops its oldest client for the
    new one."""
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", f"--{server}",
                            "tcp://127.0.0.1:0")  # fmt: skip
    port = int(cluster.wait_log(rf"{server} on tcp://127\.0\.0\.1:(\d+)").group(1))
    flood = []
    try:
        for _ in range(130):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            flood[-1].sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
        with socket.create_connection(("127.0.0.1", port), timeout=5) as check:
            check.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert read_all(check).startswith(b"HTTP/1.1 200 ")
        # The oldest made room (or, on a slow machine, had been taken for a silent agent
        # before its half request came, and answered as one).
        assert read_all(flood[0]) in (b"", b"ready 100%\n")
    finally:
        for sock in flood:
            sock.close()


@pytest.mark.parametrize("args, named", [
    (["--health", "udp://127.0.0.1:0"], "udp://127.0.0.1:0"),
    (["--health", "nonsense"], "nonsense"),
    (["--health", "tcp://127.0.0.1:0=echo"], "tcp://127.0.0.1:0=echo"),
    (["--drain-delay", "-1"], "-1"),
])  # fmt: skip
def test_bad_health_flags_exit_2_naming_the_value(args: list[str], named: str) -> None:
    result = subprocess.run([sys.executable, "-m", "cluster", "run", "-b", "127.0.0.1:0", *args],
                            cwd=ROOT, env=cluster_env(), capture_output=True, text=True,
                            timeout=20)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr, result.stderr


def test_the_library_drains_and_undrains_through_the_same_commands(served) -> None:
    from cluster.apps.echo import EchoHandler
    from cluster.library import PreforkTCPServer

    server = served(PreforkTCPServer(("127.0.0.1", 0), EchoHandler, workers=1,
                                     health="tcp://127.0.0.1:0"))  # fmt: skip
    assert server.status()["health"]["state"] == "ready"
    assert server.drain()["health"]["state"] == "draining"
    assert server.status()["health"]["drained"] is True
    assert server.undrain()["health"]["state"] == "ready"

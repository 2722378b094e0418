"""The benchmark's own parts: its cost accounting from /proc, the targets' budgets, and the
no-framework reference loops it measures beside the real servers."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from cluster.procfs import Usage, parse_usage, stat_fields, tree_usage
from tests.conftest import ROOT, cluster_env, stream_roundtrip, tcp_connect, udp_roundtrip
from tests.procs import descendants, gone, kill_all, wait_for

sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402  (a script, importable once scripts/ is on the path)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ /proc accounting
def test_parse_usage_reads_times_and_faults_after_an_awkward_command_name(tmp_path) -> None:
    # comm may hold spaces and parentheses; fields count from the last ")".
    # state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    path = tmp_path / "stat"
    path.write_text("42 (a (b) c) S 1 42 42 0 -1 4194560 100 20 0 0 300 100 50 50 20 0 1 0\n")
    fields = stat_fields(str(path))
    assert fields is not None and fields[0] == "S"
    ticks = os.sysconf("SC_CLK_TCK")
    assert parse_usage(fields) == Usage(cpu=500 / ticks, faults=120)
    assert stat_fields(str(tmp_path / "gone")) is None


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; teardown kills them and their descendants by pid."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        kill_all(descendants(proc.pid) + [proc.pid])
        proc.wait(10)


def test_tree_usage_keeps_the_cpu_of_a_child_collected_during_the_window(started) -> None:
    """A request child that burns CPU and is reaped inside the window still counts: the
    kernel moves its time into its parent's totals, and tree_usage reads those."""
    script = textwrap.dedent("""
        import os, sys, time
        sys.stdin.readline()
        pid = os.fork()
        if pid == 0:
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass
            os._exit(0)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    started.append(proc)
    assert proc.stdin is not None and proc.stdout is not None
    before = tree_usage(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "reaped\n"
    used = tree_usage(proc.pid) - before
    assert descendants(proc.pid) == []  # the child is gone: only the parent's totals have it
    assert used.cpu >= 0.25
    assert used.faults > 0


# ------------------------------------------------------------------ budgets and verdicts
def test_budget_is_what_the_cores_leave_after_the_client() -> None:
    # 2 cores at 1000 req/s: 2000 us of CPU per request, minus the client's 100 us.
    assert bench.server_budget(1000, 100, 2) == pytest.approx(1900)
    assert bench.server_budget(400_000, 6, 2) < 0  # the client alone needs more than 2 cores


TARGET = bench.Target("cluster fork", "w", "stdlib ForkingTCPServer", 1.5, bench.BARE_FORK)


@pytest.mark.parametrize(
    ("reached", "budget", "ours", "floor", "expected"),
    [
        (1.6, 900.0, 800.0, 700.0, "met"),
        (1.0, -5.0, 800.0, 700.0, "out of reach here: the client alone"),
        (1.0, 900.0, 1500.0, 1000.0, "out of reach here: even the bare fork-per-request loop"),
        (1.0, 900.0, 1500.0, 800.0, "missed: ours spends 600 us per request over the budget"),
        (1.2, 900.0, 850.0, 800.0, "missed by 20%, within the CPU budget"),
    ],
)
def test_verdict_names_what_stands_between_a_target_and_this_machine(
    reached: float, budget: float, ours: float, floor: float, expected: str
) -> None:
    assert bench.verdict(reached, TARGET, budget, ours, floor).startswith(expected)


def test_budgets_table_is_computed_from_the_measured_cells() -> None:
    def cell(rps: float, server: float, client: float) -> bench.Cell:
        return bench.Cell([rps], 0, [server], [client], [0.0])

    workload = "http conn-per-request"
    results = {
        ("cluster fork", workload): cell(1000, 1800, 60),
        ("stdlib ForkingTCPServer", workload): cell(1100, 1500, 70),
        (bench.BARE_FORK, workload): cell(1300, 1400, 60),
    }
    rows = [bench.Row(name, lambda kind: None, frozenset()) for name, _ in results]  # type: ignore[arg-type, return-value]
    table = bench.budgets(rows, results, cores=2)
    # 1.5 x 1100 = 1650 req/s; 2 cores leave 1212 us, minus the cheapest client's 60 us.
    line = next(line for line in table.splitlines() if "1.5x stdlib ForkingTCPServer" in line)
    assert "1,650 req/s" in line and "0.91x" in line and "1152.1 us" in line
    assert "out of reach here: even the bare fork-per-request loop spends 1400 us" in line


# ------------------------------------------------------------------ the reference loops
def start_bare(started: list[subprocess.Popen], *args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bare_server.py"), *args],
                            env=cluster_env(), stderr=subprocess.PIPE, text=True)  # fmt: skip
    started.append(proc)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.startswith("listening on "), line
    wait_for(lambda: len(descendants(proc.pid)) >= 2, what="the two serving processes")
    return proc, int(line.rsplit(":", 1)[1])


def http_get(port: int) -> bytes:
    with tcp_connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("mode", ["prefork", "fork"])
def test_bare_loops_serve_the_handler_and_end_whole_on_term(started, mode: str) -> None:
    proc, port = start_bare(started, mode, "tcp", "http-hello")
    servers = descendants(proc.pid)
    for _ in range(20):
        assert http_get(port).endswith(b"Hello, world!\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGKILL  # killpg took the group, the parent included
    for pid in servers:
        wait_for(lambda pid=pid: gone(pid), what=f"serving process {pid} to end")


def test_bare_loop_survives_clients_that_reset(started) -> None:
    """A handler error drops that one connection: the serving processes live on (else a
    benchmark's later rounds would measure one process, or none)."""
    proc, port = start_bare(started, "prefork", "tcp", "echo")
    servers = sorted(descendants(proc.pid))
    for _ in range(6):
        sock = tcp_connect(("127.0.0.1", port))
        sock.sendall(b"x")
        assert sock.recv(16) == b"x"  # the handler now waits in recv()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST: that recv() raises ConnectionResetError
    for _ in range(6):
        with tcp_connect(("127.0.0.1", port)) as sock:
            assert stream_roundtrip(sock, b"still here") == b"still here"
    assert sorted(descendants(proc.pid)) == servers


def test_bare_prefork_loop_echoes_datagrams(started) -> None:
    proc, port = start_bare(started, "prefork", "udp", "echo")
    for n in range(20):
        payload = b"datagram %d" % n
        assert udp_roundtrip(("127.0.0.1", port), payload) == payload
    assert proc.poll() is None

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
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import procfs
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


def test_budgets_judge_the_lean_issue_fork_targets_against_the_loop_carrying_our_imports() -> None:
    """Fork mode at 1.0x the stdlib and 0.9x the bare loop: the reference for what is within
    reach is the bare loop carrying our fork-mode worker's imports (the size every fork copies)."""

    def cell(rps: float, server: float, client: float) -> bench.Cell:
        return bench.Cell([rps], 0, [server], [client], [0.0])

    workload = bench.CONN_PER_REQUEST
    results = {
        ("cluster fork", workload): cell(900, 2000, 60),
        ("stdlib ForkingTCPServer", workload): cell(1000, 1800, 60),
        (bench.BARE_FORK, workload): cell(1200, 1550, 60),
        (bench.BARE_FORK_CARRYING, workload): cell(1100, 1770, 60),
    }
    rows = [bench.Row(name, lambda kind: None, frozenset()) for name, _ in results]  # type: ignore[arg-type, return-value]
    lines = bench.budgets(rows, results, cores=2).splitlines()
    stdlib = next(line for line in lines if "1x stdlib ForkingTCPServer" in line)
    # 1.0 x 1000 req/s leaves 2,000 - 60 us: the carrying loop (1,770) fits, ours does not.
    assert "0.90x" in stdlib and "1940.0 us" in stdlib and "| 1770.0 us |" in stdlib
    assert "missed: ours spends 60 us per request over the budget" in stdlib
    bare = next(line for line in lines if f"0.9x {bench.BARE_FORK}" in line)
    # 0.9 x 1200 = 1080 req/s leaves 1,852 - 60 = 1,792 us: the carrying loop fits too.
    assert "1,080 req/s" in bare and "0.75x" in bare and "1791.9 us" in bare
    assert "missed: ours spends 208 us per request over the budget" in bare
    slower = dict(results)
    slower[bench.BARE_FORK_CARRYING, workload] = cell(1000, 1900, 60)
    line = next(line for line in bench.budgets(rows, slower, cores=2).splitlines()
                if f"0.9x {bench.BARE_FORK}" in line)  # fmt: skip
    assert f"out of reach here: even the {bench.BARE_FORK_CARRYING} spends 1900 us" in line


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


def test_bare_fork_loop_carrying_imports_loads_them_and_serves(started) -> None:
    """``--carry``: the modules are imported in the forking process (its children, forked
    from it, have them loaded), and the loop serves as before."""

    def maps(proc: subprocess.Popen) -> list[str]:
        return [Path(f"/proc/{pid}/maps").read_text() for pid in descendants(proc.pid)]

    plain, _ = start_bare(started, "fork", "tcp", "http-hello")
    proc, port = start_bare(started, "fork", "tcp", "http-hello", "--carry", "decimal,json")
    assert not any("_decimal" in text for text in maps(plain))
    assert all("_decimal" in text for text in maps(proc))  # decimal's C part, where forks happen
    for _ in range(5):
        assert http_get(port).endswith(b"Hello, world!\n")


def test_bare_loop_refuses_a_module_it_cannot_carry() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bare_server.py"), "fork",
                           "tcp", "http-hello", "--carry", "no_such_module_here"],
                          env=cluster_env(), capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "bare_server: cannot carry no_such_module_here: No module named 'no_such_module_here'"
    )


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


# ------------------------------------------------------------------ memory and CPU from /proc
def test_parse_rollup_counts_private_pages_as_uss() -> None:
    text = ("55d0-7ffd ---p 00000000 00:00 0    [rollup]\nRss:  1768 kB\nPss:  203 kB\n"
            "Pss_Dirty:  116 kB\nShared_Clean:  1612 kB\nPrivate_Clean:  40 kB\n"
            "Private_Dirty:  116 kB\n")  # fmt: skip
    assert procfs.parse_rollup(text) == procfs.Memory(rss=1768 * 1024, pss=203 * 1024,
                                                      uss=156 * 1024)  # fmt: skip


def test_memory_of_this_process_and_of_a_gone_one(started) -> None:
    mine = procfs.memory(os.getpid())
    assert mine is not None and 0 < mine.uss <= mine.rss and 0 < mine.pss <= mine.rss
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procfs.memory(proc.pid) is None


def test_run_time_counts_every_live_thread_at_nanosecond_resolution() -> None:
    burnt, leave = threading.Event(), threading.Event()

    def burn() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
        burnt.set()
        leave.wait(10)  # alive while measured: a thread gone takes its schedstat along

    before = procfs.run_time(os.getpid())
    thread = threading.Thread(target=burn)
    thread.start()
    try:
        assert burnt.wait(10)
        used = procfs.run_time(os.getpid()) - before
    finally:
        leave.set()
        thread.join()
    assert 0.05 <= used < 5
    assert procfs.run_time(2**22 + 12345) == 0.0  # no such pid


# ------------------------------------------------------------------ the scale tables
@pytest.mark.parametrize(
    ("counts", "ratio"), [([100, 100, 100], 1.0), ([50, 100], 0.5), ([0, 10], 0.0), ([], 0.0)]
)
def test_fairness_ratio_is_least_over_most(counts: list[int], ratio: float) -> None:
    assert bench.fairness_ratio(counts) == ratio


def test_connections_are_shared_out_at_least_one_per_listener() -> None:
    assert [bench.split_connections(16, n) for n in (1, 8, 32)] == [16, 2, 1]


def test_scale_tables_render_each_measure() -> None:
    hup = bench.Measured(5000.0, 0, 12345)
    rows = [bench.WorkersScale(64, 0.54, 0.3, 4 * bench.MiB, 300 * bench.MiB, 0.05, 0.83, hup),
            bench.WorkersScale(128, 0.92, 0.6, 4 * bench.MiB, 600 * bench.MiB, 0.2, None, hup)]  # fmt: skip
    lines = bench.workers_table(rows).splitlines()
    assert lines[2] == ("| 64 | 0.54 s | 0.30 s | 4.0 MiB | 300.0 MiB | 0.05% | 0.83 s "
                        "| 0 of 12,345 requests |")  # fmt: skip
    assert "not within the load" in lines[3]
    listeners = bench.listeners_table([bench.ListenersScale(2, [900.0, 1100.0], [450, 550], 3)])
    assert listeners.splitlines()[2] == "| 2 | 900 | 2,000 | 450..550 | 0.82 | 3 |"


def test_document_keeps_the_sections_not_rerun_and_replaces_the_others() -> None:
    previous = ("# old header\n\n" + bench.marked("throughput", "old table") + "\n\n"
                + bench.marked("scale", "old scale") + "\nold notes\n")  # fmt: skip
    text = bench.document("# Benchmarks", {"scale": "new scale", "profiles": "new profiles"},
                          previous)  # fmt: skip
    assert text.startswith("# Benchmarks\n\n<!-- bench:throughput -->\nold table\n")
    assert "old scale" not in text and "old header" not in text and "old notes" not in text
    sections = dict(bench.MARK.findall(text))
    assert sections == {"throughput": "old table", "scale": "new scale",
                        "profiles": "new profiles"}  # fmt: skip
    assert list(sections) == ["throughput", "scale", "profiles"]  # the order of SECTIONS


def test_document_keeps_the_memory_section_that_memory_py_wrote() -> None:
    previous = bench.marked("scale", "old scale") + "\nold notes\n\n## Memory\n\nthe table\n"
    text = bench.document("# Benchmarks", {"scale": "new scale"}, previous)
    assert text.endswith("\n## Memory\n\nthe table\n") and text.count("## Memory") == 1


# ------------------------------------------------------------------ the profiles
RAW = (
    'process 7:"cluster: worker";_run (<frozen runpy>);run (workers/runtime/entry.py);'
    "serve (sync.py);AcceptLoop.wait (workers/runtime/accept.py) 60\n"
    "_run (<frozen runpy>);run (workers/runtime/entry.py);serve (sync.py);"
    "handle (h.py);ClientSocket.sendall (workers/runtime/client.py) 30\n"
    "_run (<frozen runpy>);run (workers/runtime/entry.py);serve (sync.py);"
    "handle (h.py) 10\n"
    "Thread._bootstrap (threading.py);Thread.run (threading.py);"
    "ThreadPool._work (workers/runtime/modes/thread.py) 100\n"
    "garbage line\n"
)


def test_collapsed_stacks_drop_process_frames_and_split_waits_from_work() -> None:
    stacks = bench.parse_collapsed(RAW)
    assert len(stacks) == 4 and stacks[0][0][0] == "_run (<frozen runpy>)"
    working, waiting = bench.split_waits(stacks)
    assert waiting == {"AcceptLoop.wait": 60, "ThreadPool._work": 100}
    own, total = bench.self_and_total(bench.below_entries(working))
    assert own == {"ClientSocket.sendall (workers/runtime/client.py)": 30, "handle (h.py)": 10}
    # the entry frames and the serve loop every stack shares are gone; handle is in both
    assert total == {"handle (h.py)": 40, "ClientSocket.sendall (workers/runtime/client.py)": 30}


def test_profile_summary_and_table_give_shares_of_the_samples_at_work() -> None:
    stacks = bench.parse_collapsed(RAW)
    summary = bench.profile_summary(stacks)
    assert "200 samples (of every thread), 40 at work" in summary
    assert "waiting for work (an idle handler thread): 50.0% of the samples" in summary
    assert "   75.0%  ClientSocket.sendall" in summary
    found = bench.Profile("sync", 1.0, stacks, bench.Measured(1234.0, 0, 1234), cpu=42.0)
    table = bench.profile_table(found)
    assert table.startswith("**sync**: 1,234 req/s during the profile, the worker at 42% of a "
                            "core; 200 samples of its threads, 20% at work; waiting for")  # fmt: skip
    assert "| 75.0% | `ClientSocket.sendall (workers/runtime/client.py)` |" in table


# ------------------------------------------------------------------ the scale runs, tiny
def test_scale_workers_measures_a_reload_under_load_without_errors() -> None:
    row = bench.scale_workers(2, idle_seconds=0.2, load_seconds=2.0, warm_up=0)
    assert 0 < row.boot_s < row.ready_s < 20
    assert 0 < row.uss and row.pss > 2 * row.uss  # master and two workers, shared pages too
    assert 0 <= row.idle_cpu < 50
    assert row.hup_s is not None and 0 < row.hup_s < 2.0  # within the load
    assert row.hup.requests > 0 and row.hup.errors == 0


def test_scale_listeners_counts_each_listeners_accepts() -> None:
    row = bench.scale_listeners(2, duration=1.0)
    assert len(row.rps) == 2 and all(rate > 0 for rate in row.rps)
    assert len(row.counts) == 2 and min(row.counts) > 0 and row.errors == 0


def test_a_ratio_divides_rounds_measured_together_not_medians_of_different_minutes() -> None:
    """The machine drifts: here the peer's first round ran slow. Median over median divides
    our middle round by the peer's (130 / 200); each round's own ratio is 0.5, 0.93, 0.97."""

    def cell(*rps: float) -> bench.Cell:
        return bench.Cell(list(rps), 0, [], [], [])

    ours, peer = cell(100, 130, 300), cell(200, 140, 310)
    assert bench.median(ours) / bench.median(peer) == pytest.approx(0.65)
    assert bench.paired_ratio(ours, peer) == pytest.approx(130 / 140)
    # Rounds that do not pair up (a row missing one) fall back to median over median.
    assert bench.paired_ratio(cell(100, 130), peer) == pytest.approx(115 / 200)
    assert bench.paired_ratio(ours, cell(0, 0, 0)) == 0.0


def test_rounds_alternate_the_order_of_the_rows() -> None:
    rows = [bench.Row(name, lambda kind: None, frozenset()) for name in "abc"]  # type: ignore[arg-type, return-value]
    orders = ["".join(row.name for row in bench.round_order(rows, n)) for n in range(3)]
    assert orders == ["abc", "cba", "abc"]

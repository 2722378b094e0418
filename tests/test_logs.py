"""Logs: JSON lines, the access log (a line per request, an http.server handler's status),
and reopening the log files on USR1 in the master and in the workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, stream_roundtrip, tcp_connect
from tests.procs import children, wait_for

pytestmark = pytest.mark.timeout(60)

GET = b"GET /%d HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def write_after_reopen(cluster, port: int, main: Path) -> None:  # noqa: ANN001
    """After a reopen: the master and both workers said so in the new ``main`` log, each
    worker's next error lands there too (whichever worker takes the requests), and the
    cluster then stops cleanly."""
    wait_for(lambda: sum("reopened" in line for line in lines(main)) == 3, 10,
             "the master's reopen and both workers'")  # fmt: skip
    for workers in range(2):
        stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"boom\n")
        stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"after %d\n" % workers)
    wait_for(lambda: sum("RuntimeError: boom" in line for line in lines(main)) == 2, 10,
             "the workers' errors in the new file")  # fmt: skip
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_json_logs_parse_line_by_line_with_role_and_generation(start_cluster) -> None:
    cluster = start_cluster("testapps:Boom", "-w", "1", "--log-format", "json",
                            "-b", "127.0.0.1:0", wait=False)  # fmt: skip
    wait_for(lambda: any('"ready: 1 worker (sync)"' in line for line in cluster.lines), 20,
             "ready")  # fmt: skip
    port = next(json.loads(line)["msg"].rsplit(":", 1)[1] for line in cluster.lines
                if "listening on" in line)  # fmt: skip
    stream_roundtrip(tcp_connect(("127.0.0.1", int(port))), b"boom\n")  # a worker logs an error
    wait_for(lambda: any("boom requested" in line for line in cluster.lines), 10, "the error")
    entries = [json.loads(line) for line in cluster.lines if line.startswith("{")]
    assert len(entries) == len([line for line in cluster.lines if line.strip()])  # every line
    assert {"ts", "level", "pid", "role", "generation", "msg"} <= set(entries[0])
    master = {e["role"] for e in entries if e["pid"] == cluster.pid}
    error = next(e for e in entries if "boom requested" in e.get("exc", ""))
    assert master == {"master"} and error["role"] == "worker" and error["generation"] == 1
    assert error["level"] == "error" and error["pid"] in children(cluster.pid)


def test_access_log_has_a_line_per_request(start_cluster, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    cluster = start_cluster("testapps:StdlibHTTP", "-w", "2", "-b", "127.0.0.1:0",
                            "-b", "127.0.0.1:0=echo", "--access-log", str(access))  # fmt: skip
    http, echo = cluster.address(), cluster.uris[1].rsplit("/", 1)[1].rsplit(":", 1)
    for n in range(20):
        assert stream_roundtrip(tcp_connect(http), GET % n).startswith(b"HTTP/1.1 200")
    for n in range(5):
        assert stream_roundtrip(tcp_connect((echo[0], int(echo[1]))), b"x" * n) == b"x" * n
    cluster.signal(signal.SIGTERM)  # the workers write what they gathered as they exit
    assert cluster.wait_exit() == 0
    logged = lines(access)
    assert len(logged) == 25
    http_lines = [line for line in logged if cluster.uris[0] in line]
    assert sorted(int(line.split('"GET /')[1].split()[0]) for line in http_lines) == list(range(20))
    assert all(line.endswith(" 200") and "out=" in line for line in http_lines)
    echo_lines = [line for line in logged if cluster.uris[1] in line]
    assert sorted(int(line.split("in=")[1].split()[0]) for line in echo_lines) == list(range(5))


def test_access_log_lines_of_threads_writing_while_another_flushes_are_all_written(
    tmp_path: Path,
) -> None:
    """Thread mode: handler threads add lines while a leader going idle writes the batch.
    The flush swapped in a new list, and a line added meanwhile to the old one was lost
    (about 2% of them with thread switches forced every microsecond, as here)."""
    from workers.runtime.access import AccessLog

    log = AccessLog(str(tmp_path / "access.log"))
    done = threading.Event()

    def write(count: int) -> None:
        for _ in range(count):
            log.write("127.0.0.1:1", "tcp://127.0.0.1:2", 1, 0.5, 10, 20, "-", "-")

    def flush() -> None:
        while not done.is_set():
            log.flush()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        flusher = threading.Thread(target=flush)
        writers = [threading.Thread(target=write, args=(5000,)) for _ in range(3)]
        flusher.start()
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        done.set()
        flusher.join()
    finally:
        sys.setswitchinterval(interval)
    log.close()
    assert len((tmp_path / "access.log").read_text().splitlines()) == 15000


def test_usr1_reopens_the_logs_in_the_master_and_the_workers(start_cluster, tmp_path: Path) -> None:
    main, access = tmp_path / "main.log", tmp_path / "access.log"
    cluster = start_cluster("testapps:Boom", "-w", "2", "-b", "127.0.0.1:0", "--log-file",
                            str(main), "--access-log", str(access), wait=False)  # fmt: skip
    wait_for(lambda: any("ready: 2 workers" in line for line in lines(main)), 20, "ready")
    port = int(next(line for line in lines(main) if "listening on" in line).rsplit(":", 1)[1])
    stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"before\n")
    wait_for(lambda: len(lines(access)) == 1, 10, "the first line written (the worker idles)")
    main.rename(tmp_path / "main.log.1")
    access.rename(tmp_path / "access.log.1")
    cluster.signal(signal.SIGUSR1)
    write_after_reopen(cluster, port, main)
    assert len(lines(access)) == 4 and len(lines(tmp_path / "access.log.1")) == 1
    assert not any("boom requested" in line for line in lines(tmp_path / "main.log.1"))


def test_bad_log_settings_are_one_line_errors(tmp_path: Path) -> None:
    from tests.test_bad_input import assert_one_line_error, run_cluster

    assert_one_line_error(run_cluster("--log-format", "xml"), 2, "xml")
    assert_one_line_error(run_cluster("--access-log-format", "{nope}"), 2, "nope")
    missing = str(tmp_path / "no" / "dir" / "a.log")
    assert_one_line_error(run_cluster("-b", "127.0.0.1:0", "--log-file", missing), 2, missing)


INTERRUPTING_HANDLER = """
import socketserver

class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        raise KeyboardInterrupt
"""


def test_a_worker_ended_by_a_base_exception_logs_it_as_json_too(
    start_cluster, tmp_path: Path
) -> None:
    """What ends a worker's process from inside (a KeyboardInterrupt out of a sync handler)
    was printed raw to stderr, twenty lines that are not JSON; it is one log record now."""
    (tmp_path / "interrupting.py").write_text(INTERRUPTING_HANDLER)
    cluster = start_cluster("interrupting:Handler", "-w", "1", "--log-format", "json",
                            "-b", "127.0.0.1:0", cwd=tmp_path, wait=False)  # fmt: skip
    wait_for(lambda: any('"ready: 1 worker (sync)"' in line for line in cluster.lines), 20,
             "ready")  # fmt: skip
    port = next(json.loads(line)["msg"].rsplit(":", 1)[1] for line in cluster.lines
                if "listening on" in line)  # fmt: skip
    stream_roundtrip(tcp_connect(("127.0.0.1", int(port))), b"x")
    wait_for(lambda: any("died: exited with code 1" in line for line in cluster.lines), 10,
             "the worker's death")  # fmt: skip
    entries = [json.loads(line) for line in cluster.lines if line.strip()]  # every line
    ended = next(e for e in entries if "ended by KeyboardInterrupt" in e["msg"])
    assert ended["role"] == "worker" and "KeyboardInterrupt" in ended["exc"]


REOPEN_INSIDE_A_FLUSH = """
import os, signal, sys
from workers.runtime.access import ACCESS, AccessLog, reopen_logs

path = sys.argv[1]
ACCESS.log = log = AccessLog(path)
signal.signal(signal.SIGUSR1, lambda signum, frame: reopen_logs())
log.write("127.0.0.1:1", "tcp://127.0.0.1:2", 1, 0.5, 10, 20, "before", "-")
os.rename(path, path + ".1")
with log.lock:  # where flush takes its lines: the USR1 handler can run in there
    signal.raise_signal(signal.SIGUSR1)
log.write("127.0.0.1:1", "tcp://127.0.0.1:2", 1, 0.5, 10, 20, "after", "-")
log.close()
"""


def test_a_reopen_that_interrupts_a_flush_does_not_wait_for_it_and_loses_no_line(
    tmp_path: Path,
) -> None:
    """USR1's handler reopens the access log in the main thread, between two bytecodes of
    whatever ran there: inside ``flush``, it waited for the lock that flush held, forever.
    Found in fork mode (each request child runs flush once, before the interpreter has
    specialized it, and a check for signals falls inside the lock): a child stuck on a futex,
    holding its worker's graceful stop for the whole --graceful-timeout. The test puts the
    signal in that window on purpose."""
    path = tmp_path / "access.log"
    done = subprocess.run([sys.executable, "-c", REOPEN_INSIDE_A_FLUSH, str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=10)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "after" in path.read_text()
    rotated = tmp_path / "access.log.1"
    both = lines(path) + (lines(rotated) if rotated.exists() else [])
    assert len(both) == 2 and "before" in "".join(both)

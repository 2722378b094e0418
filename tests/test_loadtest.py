"""The load-test tool: its pure parts without sockets, then real runs against real clusters and
against tiny misbehaving servers in threads of the test (wrong bytes, HTTP 500, resets, silence).
"""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import loadtest
from loadtest import (
    Event,
    Events,
    LoadConfig,
    Progress,
    Target,
    UsageError,
    append_event,
    check_allowed,
    classify_errno,
    format_summary,
    is_loopback_host,
    make_plan,
    new_histogram,
    parse_events,
    parse_http_response,
    parse_target,
    progress_line,
    result_to_json,
    split_evenly,
    summarize,
)
from tests.procs import alive, children, descendants, kill_all, reap_if_ours, wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "loadtest"]  # as users run it, from the installed package
PERCENTILE_KEYS = ("p50", "p90", "p99", "p99.9", "max")


# ============================================================================ pure parts
@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("tcp://127.0.0.1:8000", Target("tcp://127.0.0.1:8000", "tcp", "127.0.0.1", 8000)),
        ("tcp://[::1]:80", Target("tcp://[::1]:80", "tcp", "::1", 80)),
        ("127.0.0.1:8000", Target("127.0.0.1:8000", "tcp", "127.0.0.1", 8000)),
        ("[::1]:8000", Target("[::1]:8000", "tcp", "::1", 8000)),
        ("udp://localhost:53", Target("udp://localhost:53", "udp", "localhost", 53)),
        ("unix:/run/e.sock", Target("unix:/run/e.sock", "unix", path="/run/e.sock")),
        ("unix:///run/e.sock", Target("unix:///run/e.sock", "unix", path="/run/e.sock")),
        ("unix:rel.sock", Target("unix:rel.sock", "unix", path="rel.sock")),
        ("unix-dgram:/run/d", Target("unix-dgram:/run/d", "unix-dgram", path="/run/d")),
        (
            "http://127.0.0.1:8080/a?b=1",
            Target("http://127.0.0.1:8080/a?b=1", "http", "127.0.0.1", 8080, "/a?b=1"),
        ),
        ("http://[::1]:8080", Target("http://[::1]:8080", "http", "::1", 8080, "/")),
        ("http://localhost/x", Target("http://localhost/x", "http", "localhost", 80, "/x")),
        ("http://[::1]/x", Target("http://[::1]/x", "http", "::1", 80, "/x")),
        ("udp://[::1]:53", Target("udp://[::1]:53", "udp", "::1", 53)),
        ("unix-dgram:///d", Target("unix-dgram:///d", "unix-dgram", path="/d")),
    ],
)
def test_parse_target(uri: str, expected: Target) -> None:
    assert parse_target(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("localhost:", "port must be a number"),
        ("nonsense", "expected HOST:PORT"),
        ("ftp://127.0.0.1:21", "unknown scheme 'ftp'"),
        ("https://127.0.0.1:443/", "TLS"),
        ("tcp://127.0.0.1", "expected HOST:PORT"),
        ("tcp://127.0.0.1:http", "port must be a number"),
        ("tcp://127.0.0.1:70000", "port must be a number from 0 to 65535"),
        ("tcp://::1:80", "expected HOST:PORT"),
        ("tcp://[::1:80", r"\[ADDR\]:PORT"),
        ("unix:", "empty socket path"),
        ("tcp:127.0.0.1:80", "expected HOST:PORT"),
        # what binds but cannot be loaded
        ("tcp://127.0.0.1:0", "port 0"),
        ("127.0.0.1:0", "port 0"),
        ("udp://[::1]:0", "port 0"),
        ("http://127.0.0.1:0/", "port 0"),
        ("fd://3", "fd://N is a listener"),
        ("tcp://127.0.0.1:8000=myapp:Handler", "=myapp:Handler names a listener's handler"),
        ("unix:/run/e.sock=echo", "=echo names a listener's handler"),
        ("tcp://:8000", "no host"),
        ("http://:8080/", "no host"),
        ("http://::1:80/", "expected HOST:PORT"),
        ("http://127.0.0.1:x/", "port must be a number"),
    ],
)
def test_parse_target_rejects(uri: str, message: str) -> None:
    """The bind grammar's errors (``cluster.listeners.parse_bind``), reworded: each names the
    bad target, never the bind."""
    with pytest.raises(UsageError, match=message) as raised:
        parse_target(uri)
    assert str(raised.value).startswith(f"bad target {uri!r}: ")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("192.0.2.1", False),
        ("::", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_remote_host_only_when_named() -> None:
    with pytest.raises(UsageError, match="--allow-remote 192.0.2.1"):
        check_allowed(parse_target("tcp://192.0.2.1:80"), ())
    with pytest.raises(UsageError, match="not loopback"):
        check_allowed(parse_target("tcp://192.0.2.1:80"), ("192.0.2.2",))
    check_allowed(parse_target("tcp://192.0.2.1:80"), ("192.0.2.1",))
    check_allowed(parse_target("http://[2001:db8::1]:80/"), ("[2001:db8::1]",))
    check_allowed(parse_target("http://Example.COM:80/"), ("example.com",))
    check_allowed(parse_target("unix:/x.sock"), ())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"duration": None, "requests": None}, "no bound"),
        ({"duration": 0}, "--duration must be a positive"),
        ({"duration": loadtest.HARD_CAP_SECONDS + 1}, "exceeds the cap"),
        ({"requests": 0}, "--requests must be at least 1"),
        ({"concurrency": 0}, "--concurrency"),
        ({"processes": 0}, "--processes"),
        ({"rate": -5}, "--rate"),
        ({"timeout": 0}, "--timeout"),
        ({"max_errors": -1}, "--max-errors"),
        ({"payload": 0}, "--payload"),
        ({"target": "udp://127.0.0.1:9", "payload": 70000}, "--payload"),
        ({"target": "udp://127.0.0.1:9", "connect": "per-request"}, "stream targets"),
        ({"target": "tcp://203.0.113.9:80"}, "refusing"),
    ],
)
def test_validate_rejects(changes: dict[str, Any], message: str) -> None:
    fields = {"target": "tcp://127.0.0.1:9", "duration": 1.0} | changes
    with pytest.raises(UsageError, match=message):
        make_plan(LoadConfig(**fields), resolve=False)


def test_plan_splits_connections_and_budget() -> None:
    plan = make_plan(
        LoadConfig("tcp://127.0.0.1:9", requests=7, concurrency=5, processes=2), resolve=False
    )
    assert plan.lanes == (3, 2)
    assert plan.budgets == (4, 3)
    assert plan.run_seconds == loadtest.HARD_CAP_SECONDS  # the hard cap bounds a count run
    clamped = make_plan(LoadConfig("unix:/x", duration=2, concurrency=2, processes=8), False)
    assert clamped.processes == 2 and clamped.budgets == (None, None)
    assert clamped.run_seconds == 2


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    assert sum(split_evenly(1_000_003, 7)) == 1_000_003


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ECONNREFUSED, "refused"),
        (errno.ENOENT, "refused"),
        (errno.ECONNRESET, "reset"),
        (errno.EPIPE, "reset"),
        (errno.ETIMEDOUT, "timeout"),
        (errno.EADDRNOTAVAIL, "other"),
        (None, "other"),
    ],
)
def test_classify_errno(code: int | None, kind: str) -> None:
    assert classify_errno(code) == kind


HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nHello, world!\n"


def test_parse_http_response_content_length() -> None:
    response, used = parse_http_response(HELLO + b"HTTP/1.1")  # type: ignore[misc]
    assert (response.status, response.body, response.keep_alive) == (200, b"Hello, world!\n", True)
    assert used == len(HELLO)
    assert response.headers["content-type"] == "text/plain"
    for cut in (10, HELLO.index(b"\r\n\r\n") + 2, len(HELLO) - 1):
        assert parse_http_response(HELLO[:cut]) is None  # incomplete: wait for more


def test_parse_http_response_connection_semantics() -> None:
    close = HELLO.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    assert parse_http_response(close)[0].keep_alive is False  # type: ignore[index]
    old = HELLO.replace(b"HTTP/1.1", b"HTTP/1.0")
    assert parse_http_response(old)[0].keep_alive is False  # type: ignore[index]
    old_kept = old.replace(b"Content-Length", b"Connection: keep-alive\r\nContent-Length")
    assert parse_http_response(old_kept)[0].keep_alive is True  # type: ignore[index]


def test_parse_http_response_chunked_and_until_close() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nHello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
    )
    response, used = parse_http_response(chunked)  # type: ignore[misc]
    assert response.body == b"Hello, world" and used == len(chunked)
    assert parse_http_response(chunked[:-3]) is None
    until_close = b"HTTP/1.0 200 OK\r\n\r\nbody to the end"
    assert parse_http_response(until_close) is None
    response, _ = parse_http_response(until_close, eof=True)  # type: ignore[misc]
    assert response.body == b"body to the end" and not response.keep_alive
    no_body = b"HTTP/1.1 204 No Content\r\n\r\n"
    assert parse_http_response(no_body)[0].body == b""  # type: ignore[index]


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"x" * (loadtest.MAX_HTTP_HEAD + 1),
    ],
)
def test_parse_http_response_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_http_response(data)


def test_parse_http_response_truncated_at_close() -> None:
    with pytest.raises(ValueError, match="closed"):
        parse_http_response(HELLO[:-3], eof=True)


def test_parse_events() -> None:
    text = (
        "# scenario log\n1700000000.5 HUP sent\n\n1700000001 TTIN  x2 \nnonsense here\n1700000002\n"
    )
    events, bad = parse_events(text)
    assert events == [
        Event(1700000000.5, "HUP sent"),
        Event(1700000001.0, "TTIN  x2"),
        Event(1700000002.0, "event"),
    ]
    assert bad == ["nonsense here"]


def test_append_event_round_trips(tmp_path: Path) -> None:
    path = str(tmp_path / "events")
    append_event(path, "HUP\nsent", when=1700000000.25)
    append_event(path, "TERM sent", when=1700000003)
    assert loadtest.read_events(path) == (
        [Event(1700000000.25, "HUP sent"), Event(1700000003.0, "TERM sent")],
        [],
    )
    assert loadtest.read_events(str(tmp_path / "missing")) == ([], [])


def fake_report(seconds: list[tuple[int, list[int], dict[str, int]]], last: float) -> dict:
    """A client process's report as the clients build it: per-second encoded histograms."""
    entries, errors, requests = [], dict.fromkeys(loadtest.ERROR_KINDS, 0), 0
    for second, latencies, errs in seconds:
        hist = new_histogram()
        for value in latencies:
            hist.record_value(value)
        count = len(latencies) + sum(errs.values())
        requests += count
        for kind, n in errs.items():
            errors[kind] += n
        entries.append(
            {
                "second": second,
                "requests": count,
                "errors": errs,
                "hist": hist.encode() if latencies else b"",
            }
        )
    examples = {kind: [f"{kind} example"] for kind, n in errors.items() if n}
    return {
        "requests": requests,
        "errors": errors,
        "examples": examples,
        "seconds": entries,
        "last_completion": last,
        "aborted": False,
    }


def test_summarize_merges_processes() -> None:
    plan = make_plan(LoadConfig("tcp://127.0.0.1:9", duration=2.5, max_errors=1), resolve=False)
    reports = [
        fake_report([(0, [100] * 90, {}), (2, [300] * 10, {"timeout": 1})], 2.5001),
        fake_report([(0, [200] * 10, {"refused": 2}), (1, [], {"refused": 3})], 1.2),
    ]
    result = summarize(plan, reports, started_at=1000.0, events=[Event(1001.5, "HUP sent")])
    assert result.requests == 116 and result.ok == 110
    assert result.errors == {"refused": 5, "reset": 0, "timeout": 1, "wrong reply": 0, "other": 0}
    assert result.error_count == 6 and not result.passed() and result.exit_code() == 1
    assert result.percentiles["p50"] == 100
    assert 199 <= result.percentiles["p90"] <= 201
    assert 299 <= result.percentiles["max"] <= 301
    assert result.duration == pytest.approx(2.5001)
    seconds = [(e["second"], e["requests"], e["errors"], e["span"]) for e in result.timeline]
    assert seconds == [(0, 102, 2, 1.0), (1, 3, 3, 1.0), (2, 11, 1, pytest.approx(0.5001))]
    assert result.timeline[1]["p50_us"] is None  # a second with errors only
    assert result.timeline[2]["time"] == 1002.0
    data = json.loads(json.dumps(result_to_json(result)))
    assert data["totals"]["requests"] == data["totals"]["ok"] + data["totals"]["errors"]
    assert set(PERCENTILE_KEYS) <= set(data["latency_us"])
    assert data["events"] == [{"time": 1001.5, "t": 1.5, "label": "HUP sent"}]
    text = format_summary(result)
    assert "errors      6  (refused 5, timeout 1)" in text
    assert "refused: refused example" in text and "HUP sent" in text
    assert "FAIL (6 errors, max 1)" in text


def test_summarize_empty_run() -> None:
    plan = make_plan(LoadConfig("unix:/x", requests=5), resolve=False)
    result = summarize(plan, [fake_report([], 0.0)], started_at=0.0)
    assert result.requests == 0 and result.timeline == [] and result.percentiles["p99"] == 0
    assert result.passed()


def test_plot_writes_png_with_events(tmp_path: Path) -> None:
    plan = make_plan(LoadConfig("tcp://127.0.0.1:9", duration=3), resolve=False)
    report = fake_report([(0, [100, 120], {}), (1, [], {"reset": 4}), (2, [900], {})], 3.0)
    result = summarize(plan, [report], 50.0, [Event(51.2, "HUP sent"), Event(52.5, "done")])
    path = tmp_path / "plot.png"
    loadtest.plot(result, str(path))
    assert path.read_bytes().startswith(b"\x89PNG")
    empty = summarize(plan, [fake_report([], 0.0)], 0.0)
    loadtest.plot(empty, str(tmp_path / "empty.png"))
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_progress_line() -> None:
    line = progress_line(Progress(elapsed=3.04, requests=123456, errors=2, rate=41000.4))
    assert line == "[   3.0 s] 123456 requests  41000 req/s  2 errors"


# ============================================================================ processes
class Ran:
    """What a loadtest command-line run left: exit code, output, and its JSON if asked for."""

    def __init__(self, code: int, out: str, err: str, json_path: Path | None) -> None:
        self.code, self.out, self.err = code, out, err
        self.json: dict[str, Any] = {}
        if json_path is not None and json_path.exists():
            self.json = json.loads(json_path.read_text())


@pytest.fixture
def loadtest_cli(tmp_path: Path) -> Iterator[Callable[..., Ran]]:
    """``loadtest_cli(args...)`` runs ``python -m loadtest`` to its end; teardown ends, by pid,
    anything of it still running (the tool itself and its client processes)."""
    started: list[subprocess.Popen] = []
    seen: set[int] = set()
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()

    def run(*args: str, json_name: str | None = "result.json", timeout: float = 60) -> Ran:
        json_path = tmp_path / json_name if json_name else None
        extra = ["--json", str(json_path)] if json_path else []
        env = dict(os.environ, TMPDIR=str(tmpdir))
        proc = subprocess.Popen(
            [*COMMAND, *args, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        started.append(proc)
        seen.update(descendants(proc.pid))
        out, err = proc.communicate(timeout=timeout)
        return Ran(proc.returncode, out, err, json_path)

    yield run
    for proc in started:
        pids = set(descendants(proc.pid)) | seen
        kill_all([proc.pid, *pids])
        proc.wait(10)
        for pid in pids:
            reap_if_ours(pid)
    assert list(tmpdir.iterdir()) == [], "client temp dirs left behind"


def run_library(
    config: LoadConfig,
    events: Events | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> loadtest.Result:
    """``loadtest.run`` in this process; afterwards none of its client processes may remain."""
    before = set(children(os.getpid()))
    try:
        return loadtest.run(config, events=events, progress=progress)
    finally:
        left = set(children(os.getpid())) - before
        kill_all(list(left))
        for pid in left:
            reap_if_ours(pid)
        assert not left, f"client processes left running: {left}"


def uri_of(cluster: Any, scheme: str) -> str:
    return next(uri for uri in cluster.uris if uri.split(":", 1)[0] == scheme)


def assert_clean_run(ran: Ran, requests: int) -> None:
    """Exit 0, every request accounted for, no errors, the percentiles in the JSON."""
    assert ran.code == 0, f"{ran.out}\n{ran.err}"
    totals = ran.json["totals"]
    assert totals["requests"] == requests == totals["ok"] + totals["errors"]
    assert totals["errors"] == 0 and sum(ran.json["errors"].values()) == 0
    latency = ran.json["latency_us"]
    assert all(latency[key] > 0 for key in PERCENTILE_KEYS)
    assert latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert sum(entry["requests"] for entry in ran.json["timeline"]) == requests
    assert f"requests    {requests} in" in ran.out and "PASS" in ran.out


TRANSPORTS = {
    "tcp": ("tcp", "persistent"),
    "tcp-per-request": ("tcp", "per-request"),
    "udp": ("udp", "persistent"),
    "unix": ("unix", "persistent"),
    "unix-dgram": ("unix-dgram", "persistent"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_echo_on_each_transport(
    name: str, start_cluster: Callable[..., Any], loadtest_cli: Callable[..., Ran], tmp_path: Path
) -> None:
    scheme, connect = TRANSPORTS[name]
    bind = {
        "tcp": "tcp://127.0.0.1:0",
        "udp": "udp://127.0.0.1:0",
        "unix": f"unix:{tmp_path}/s.sock",
        "unix-dgram": f"unix-dgram:{tmp_path}/d.sock",
    }[scheme]
    cluster = start_cluster("echo", "-b", bind, "-w", "2", "-k", "thread")
    events = tmp_path / "events"
    append_event(str(events), "scenario began")
    plot = tmp_path / "out.png"
    options = f"-n 3000 -d 30 -c 4 -p 2 --connect {connect} --payload 100 --events {events}"
    ran = loadtest_cli(uri_of(cluster, scheme), *options.split(), "--plot", str(plot))
    assert_clean_run(ran, 3000)
    assert ran.json["config"]["connect"] == connect
    assert [e["label"] for e in ran.json["events"]] == ["scenario began"]
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.stat().st_size > 1000


def test_http_hello_over_ipv6(
    start_cluster: Callable[..., Any], loadtest_cli: Callable[..., Ran], tmp_path: Path
) -> None:
    cluster = start_cluster("http-hello", "-b", "tcp://[::1]:0", "-w", "2", "-k", "thread")
    target = uri_of(cluster, "tcp").replace("tcp://", "http://") + "/hello"
    assert target.startswith("http://[::1]:")
    ran = loadtest_cli(
        target, "-n", "3000", "-c", "4", "-p", "2", "--plot", str(tmp_path / "p.png")
    )
    assert_clean_run(ran, 3000)
    assert (tmp_path / "p.png").stat().st_size > 1000
    closing = loadtest_cli(target, "-n", "500", "-c", "2", "--connect", "per-request")
    assert_clean_run(closing, 500)


def test_cli_help() -> None:
    done = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--duration", "--requests", "--rate", "--connect", "--allow-remote", "--plot"):
        assert flag in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tcp://127.0.0.1:9"], "no bound: give --duration SECONDS and/or --requests N"),
        (["tcp://192.0.2.1:80", "-d", "1"], "--allow-remote 192.0.2.1"),
        (["tcp://example.com:80", "-n", "5"], "--allow-remote example.com"),
        (["tcp://127.0.0.1:9", "-d", "x"], "invalid float value"),
        (["tcp://127.0.0.1:9", "-d", "1", "--json", "/nonexistent/dir/x.json"], "no such dir"),
    ],
)
def test_cli_refuses_with_one_line(
    args: list[str], message: str, loadtest_cli: Callable[..., Ran]
) -> None:
    ran = loadtest_cli(*args, json_name=None)
    assert ran.code == 2
    assert ran.err.count("\n") == 1 and message in ran.err and ran.out == ""


def test_library_refuses_before_starting_anything() -> None:
    with pytest.raises(UsageError, match="no bound"):
        run_library(LoadConfig("tcp://127.0.0.1:9"))
    with pytest.raises(UsageError, match="refusing"):
        run_library(LoadConfig("udp://198.51.100.7:9", requests=1))


def closed_port(kind: int) -> int:
    """A loopback port nobody listens on: bind one, note it, close it."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["tcp", "udp", "unix", "unix-dgram", "http"])
def test_target_down_is_refused(kind: str, tmp_path: Path) -> None:
    target = {
        "tcp": f"tcp://127.0.0.1:{closed_port(socket.SOCK_STREAM)}",
        "udp": f"udp://127.0.0.1:{closed_port(socket.SOCK_DGRAM)}",
        "unix": f"unix:{tmp_path}/missing.sock",
        "unix-dgram": f"unix-dgram:{tmp_path}/missing.sock",
        "http": f"http://localhost:{closed_port(socket.SOCK_STREAM)}/",
    }[kind]
    result = run_library(LoadConfig(target, requests=40, concurrency=2, timeout=2))
    assert result.requests == 40
    assert result.errors["refused"] == 40, (result.errors, result.error_examples)
    assert result.ok == 0 and result.exit_code() == 1
    assert [kind for _, kind in result.error_times] == ["refused"] * 40  # each with its time
    times = [when for when, _ in result.error_times]
    assert times == sorted(times) and result.started_at <= times[0]
    assert times[-1] <= result.started_at + result.duration + 0.1


def test_max_errors_sets_the_exit_code(loadtest_cli: Callable[..., Ran], tmp_path: Path) -> None:
    target = f"unix:{tmp_path}/nobody.sock"
    assert loadtest_cli(target, "-n", "10").code == 1
    allowed = loadtest_cli(target, "-n", "10", "--max-errors", "10")
    assert allowed.code == 0 and allowed.json["errors"]["refused"] == 10
    assert [kind for _, kind in allowed.json["error_times"]] == ["refused"] * 10
    assert "PASS (10 errors, max 10)" in allowed.out
    assert loadtest_cli(target, "-n", "10", "--max-errors", "9").code == 1


# ------------------------------------------------------------------ misbehaving servers
class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def serve() -> Iterator[Callable[[type[socketserver.BaseRequestHandler]], str]]:
    """``serve(Handler)`` -> ``127.0.0.1:PORT`` of a threaded server in this process."""
    servers: list[Server] = []

    def start(handler: type[socketserver.BaseRequestHandler]) -> str:
        server = Server(("127.0.0.1", 0), handler)
        servers.append(server)
        # Polling every 20 ms, not socketserver's 0.5 s: shutdown() waits for the next poll.
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        host, port = server.server_address
        return f"{host}:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class WrongEcho(socketserver.BaseRequestHandler):
    """Echoes with the first byte altered."""

    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(bytes([data[0] ^ 0xFF]) + data[1:])


class Http500(socketserver.StreamRequestHandler):
    """Answers every request with a well-formed 500, keeping the connection open."""

    def handle(self) -> None:
        while self.rfile.readline():
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            self.wfile.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\noops")


class Garbage(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        if self.request.recv(65536):
            self.request.sendall(b"SSH-2.0-not-http\r\n\r\n")


class OneThenClose(socketserver.BaseRequestHandler):
    """Echoes one chunk, then closes: every second request on a kept connection breaks."""

    def handle(self) -> None:
        if data := self.request.recv(65536):
            self.request.sendall(data)


class Silent(socketserver.BaseRequestHandler):
    """Reads and never answers."""

    def handle(self) -> None:
        while self.request.recv(65536):
            pass


@pytest.mark.parametrize(
    ("handler", "scheme"), [(WrongEcho, "tcp"), (Http500, "http"), (Garbage, "http")]
)
def test_wrong_reply(handler: type, scheme: str, serve: Callable[..., str]) -> None:
    address = serve(handler)
    path = "/" if scheme == "http" else ""
    result = run_library(LoadConfig(f"{scheme}://{address}{path}", requests=30, concurrency=2))
    assert result.requests == 30 and result.errors["wrong reply"] == 30, result.error_examples
    assert result.exit_code() == 1
    expected = {WrongEcho: "byte 0 differs", Http500: "HTTP status 500", Garbage: "unparseable"}
    assert expected[handler] in result.error_examples["wrong reply"][0]


def test_reset_then_reconnect(serve: Callable[..., str]) -> None:
    result = run_library(LoadConfig(f"tcp://{serve(OneThenClose)}", requests=40, concurrency=1))
    assert result.requests == 40 == result.ok + result.error_count
    assert result.errors["reset"] >= 10, result.error_examples
    assert result.ok >= 10  # each error reconnected, and the new connection served again
    assert result.error_count == result.errors["reset"]


def test_timeout(serve: Callable[..., str]) -> None:
    began = time.monotonic()
    result = run_library(
        LoadConfig(f"tcp://{serve(Silent)}", requests=4, concurrency=2, timeout=0.3)
    )
    assert result.errors["timeout"] == 4 and result.requests == 4
    assert 0.5 < time.monotonic() - began < 10


# ------------------------------------------------------------------ bounds, rate, events
def test_whichever_bound_comes_first(start_cluster: Callable[..., Any]) -> None:
    cluster = start_cluster("echo", "-b", "udp://127.0.0.1:0", "-w", "2")
    target = uri_of(cluster, "udp")
    counted = run_library(LoadConfig(target, requests=500, duration=60, concurrency=2))
    assert counted.requests == 500 and counted.duration < 10
    timed = run_library(LoadConfig(target, requests=10**9, duration=1.0, concurrency=2))
    assert 0 < timed.requests < 10**9 and 1.0 <= timed.duration < 2.0
    assert timed.error_count == 0


def test_hard_cap_stops_a_count_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Given only a request count the run still ends by itself: at the hard cap (made short
    here), whatever is left of the budget."""
    monkeypatch.setattr(loadtest.config, "HARD_CAP_SECONDS", 0.5)  # where make_plan reads it
    began = time.monotonic()
    result = run_library(LoadConfig(f"unix:{tmp_path}/nobody.sock", requests=10**9, rate=200))
    assert 50 <= result.requests <= 150 and result.errors["refused"] == result.requests
    assert 0.4 < result.duration < 1.0 and time.monotonic() - began < 10


def test_a_crashing_client_is_reported_and_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: loadtest.Client) -> None:
        raise RuntimeError("bug in the client loop")

    monkeypatch.setattr(loadtest.Client, "run", broken)
    with pytest.raises(loadtest.ClientCrash, match="bug in the client loop"):
        run_library(LoadConfig("tcp://127.0.0.1:9", requests=10, concurrency=2, processes=2))


def test_open_loop_rate(start_cluster: Callable[..., Any]) -> None:
    cluster = start_cluster("echo", "-b", "tcp://127.0.0.1:0", "-w", "2", "-k", "thread")
    config = LoadConfig(uri_of(cluster, "tcp"), duration=2.0, rate=500, concurrency=4, processes=2)
    result = run_library(config)
    assert result.error_count == 0
    assert 400 <= result.throughput <= 600, result.throughput
    assert 800 <= result.requests <= 1200
    assert "target 500 req/s, achieved" in format_summary(result)


def test_events_in_process_and_from_file(start_cluster: Callable[..., Any], tmp_path: Path) -> None:
    """A chaos thread marks events while the run goes on; another writes the events file."""
    cluster = start_cluster("echo", "-b", "udp://127.0.0.1:0", "-w", "2")
    events, path = Events(), str(tmp_path / "events")
    under_way = threading.Event()  # set by the first progress report, one second in

    def chaos() -> None:
        if under_way.wait(30):
            events.mark("HUP sent")
            append_event(path, "TTIN sent")

    thread = threading.Thread(target=chaos)
    thread.start()
    config = LoadConfig(uri_of(cluster, "udp"), duration=1.6, concurrency=2, events_file=path)
    try:
        result = run_library(config, events=events, progress=lambda _: under_way.set())
    finally:
        under_way.set()
        thread.join(10)
    assert [e.label for e in result.events] == ["HUP sent", "TTIN sent"]
    data = result_to_json(result)
    assert [e["label"] for e in data["events"]] == ["HUP sent", "TTIN sent"]
    assert all(0 < e["t"] < result.duration for e in data["events"])
    assert result.error_count == 0


# ------------------------------------------------------------------ progress on a terminal
def read_pty(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    """Everything written to the terminal until the process exits and the pty drains."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: every writer closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks)


def test_int_stops_a_run_and_reports_it_even_when_the_parent_ignored_int(tmp_path: Path) -> None:
    """INT is how a run ends early (multihost stops its load so): it reports what it did and
    writes its JSON, also when it was started with INT ignored, as a background job of a
    non-interactive shell is (it ran its whole --duration then)."""
    path, result = str(tmp_path / "silent.sock"), tmp_path / "r.json"
    args = [*COMMAND, f"unix:{path}", "-d", "30", "--json", str(result)]
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen()
        listener.settimeout(10)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
        try:
            conn, _ = listener.accept()  # a client's request: the run is under way
            clients = descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
            conn.close()
        finally:
            kill_all([proc.pid, *descendants(proc.pid)])
            proc.wait(10)
    assert "(interrupted)" in out, out + err
    assert json.loads(result.read_text())["interrupted"] is True
    wait_for(lambda: not any(map(alive, clients)), 5, "the client process to end")


@pytest.mark.parametrize("quiet", [False, True])
def test_live_progress_on_a_terminal(quiet: bool, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    # Two progress ticks to show (at 1 and 2 s); quiet, one tick to keep to itself is enough.
    duration = "1.3" if quiet else "2.3"
    options = f"-d {duration} --rate 200 --max-errors 1000000000" + (" --quiet" if quiet else "")
    args = [*COMMAND, f"unix:{tmp_path}/nobody.sock", *options.split()]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    try:
        shown = read_pty(master, proc, 30)
        assert proc.wait(30) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    lines = [part for part in shown.split(b"\r\x1b[K") if part]
    if quiet:
        assert lines == []
    else:
        assert len(lines) == 2, shown
        for second, line in enumerate(lines, 1):
            assert re.fullmatch(
                rb"\[ +%d\.\d s\] \d+ requests  \d+ req/s  \d+ errors" % second, line
            )

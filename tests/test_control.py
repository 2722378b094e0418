"""The control plane: the control socket and ``cluster ctl``, the CLI's polish, and metrics."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.ctl import summarize
from loadtest import Events, LoadConfig, run
from tests.conftest import ROOT, cluster_env, read_line, stream_roundtrip, tcp_connect
from tests.procs import children, wait_for

pytestmark = pytest.mark.timeout(90)


def ctl(path: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``cluster ctl`` as a user runs it (a wide terminal: the tables' columns all show)."""
    return subprocess.run([sys.executable, "-m", "cluster", "ctl", "--control", str(path), *args],
                          cwd=ROOT, env=cluster_env({"COLUMNS": "200"}), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def ask(path: Path, payload: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; return the reply line (b"" if dropped)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))  # blocking: waits for room in a full backlog, as ctl does
        sock.settimeout(timeout)
        sock.sendall(payload)
        return read_line(sock)


@pytest.fixture
def controlled(start_cluster, tmp_path: Path):
    path = tmp_path / "c.ctl"
    cluster = start_cluster("echo", "-w", "2", "--max-workers", "4", "-b", "127.0.0.1:0",
                            "-b", "udp://127.0.0.1:0", "--control", str(path))  # fmt: skip
    return cluster, path


def test_control_socket_is_0600_and_status_matches_proc(controlled) -> None:
    cluster, path = controlled
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    result = ctl(path, "--json", "status")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["ok"] and status["pid"] == cluster.pid
    assert sorted(w["pid"] for w in status["workers"]) == sorted(children(cluster.pid))
    assert status["listeners"] == cluster.uris
    assert {w["state"] for w in status["workers"]} == {"idle"}
    assert all(w["generation"] == 1 and w["mode"] == "sync" for w in status["workers"])


def test_ctl_status_table_has_a_row_per_worker(controlled) -> None:
    cluster, path = controlled
    result = ctl(path, "status")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines()
            if any(str(pid) in line for pid in children(cluster.pid))]  # fmt: skip
    assert len(rows) == 2
    assert "2 workers (target 2, sync)" in result.stdout
    assert all(uri in result.stdout for uri in cluster.uris)


@pytest.mark.slow
def test_ctl_scale_and_reload_under_load(controlled) -> None:
    cluster, path = controlled
    results: list = []
    config = LoadConfig(cluster.uris[0], duration=3.0, concurrency=4, connect="per-request")
    load = threading.Thread(target=lambda: results.append(run(config, events=Events())))
    load.start()
    try:
        assert ctl(path, "scale", "3").stdout.strip() == "pool target: 3 workers"
        wait_for(lambda: len(children(cluster.pid)) == 3, 10, "3 workers")
        assert ctl(path, "scale", "1").stdout.strip() == "pool target: 1 worker"
        wait_for(lambda: len(children(cluster.pid)) == 1, 10, "1 worker")
        before = set(children(cluster.pid))
        reload = ctl(path, "reload")
        assert reload.returncode == 0 and "generation 2" in reload.stdout
        cluster.wait_log("reload complete: generation 2")
        wait_for(lambda: (now := set(children(cluster.pid))) and not now & before, 10,
                 "every worker replaced")  # fmt: skip
    finally:
        load.join(30)
    assert results[0].requests > 100 and results[0].error_count == 0, results[0].errors


def test_ctl_status_into_a_pipe_keeps_its_values_whole(controlled) -> None:
    """rich gives a pipe 80 columns: `ctl status | grep` read ages like "14.…"."""
    cluster, path = controlled
    env = {k: v for k, v in cluster_env().items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run([sys.executable, "-m", "cluster", "ctl", "--control", str(path),
                             "status"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=20, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    for pid in cluster.workers():
        assert f" {pid} " in result.stdout


def test_ctl_exit_codes(controlled, tmp_path: Path) -> None:
    cluster, path = controlled
    refused = ctl(path, "scale", "9")
    assert refused.returncode == 1 and refused.stderr.startswith("cluster: error: scale refused")
    usage = ctl(path, "scale", "zero")
    assert usage.returncode == 2 and usage.stderr.startswith("cluster: error:")
    nobody = ctl(tmp_path / "nobody.ctl", "status")
    assert nobody.returncode == 3 and str(tmp_path / "nobody.ctl") in nobody.stderr
    assert nobody.stderr.startswith("cluster: error: no master at")
    config = ctl(path, "config")
    assert config.returncode == 0 and json.loads(config.stdout)["workers"] == 2


def test_ctl_top_once_prints_one_frame_with_rates(controlled) -> None:
    cluster, path = controlled
    for _ in range(3):
        stream_roundtrip(tcp_connect(cluster.address()), b"x")
    result = ctl(path, "top", "--once")
    assert result.returncode == 0, result.stderr
    assert "req/s" in result.stdout and "requests per second" in result.stdout
    assert sum(str(pid) in result.stdout for pid in children(cluster.pid)) == 2


def test_ctl_stop_stops_gracefully(controlled) -> None:
    cluster, path = controlled
    assert ctl(path, "stop").returncode == 0
    assert cluster.wait_exit() == 0
    assert "graceful stop (control)" in cluster.log
    assert not path.exists()  # removed at exit


@pytest.mark.slow
def test_bad_clients_get_an_error_or_are_dropped_and_the_master_serves_on(controlled) -> None:
    cluster, path = controlled
    assert json.loads(ask(path, b"{not json\n"))["error"].startswith("bad JSON")
    assert "unknown command 'dance'" in json.loads(ask(path, b'{"cmd": "dance"}\n'))["error"]
    assert "over 65536 bytes" in json.loads(ask(path, b"x" * 70000))["error"]
    silent = socket.socket(socket.AF_UNIX)
    silent.settimeout(15)
    silent.connect(str(path))
    crowd = []
    for _ in range(100):  # a hundred clients at once, each silent
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        crowd.append(sock)
    started = time.monotonic()
    assert json.loads(ask(path, b'{"cmd": "status"}\n'))["ok"]  # still answering meanwhile
    assert stream_roundtrip(tcp_connect(cluster.address()), b"served") == b"served"
    assert silent.recv(10) == b""  # dropped after 5 s of silence
    assert 4 < time.monotonic() - started < 12
    for sock in crowd:
        sock.close()
    silent.close()
    assert json.loads(ask(path, b'{"cmd": "status"}\n'))["ok"]


def test_another_uid_is_refused(start_cluster) -> None:
    """A client of another uid (a child that setuid()s to nobody) gets an error reply."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    import shutil
    import tempfile

    place = Path(tempfile.mkdtemp(prefix="prefork-ctl-"))
    try:
        place.chmod(0o755)  # nobody must reach the socket at all: the uid check must refuse
        path = place / "c.ctl"
        cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--control", str(path))
        os.chmod(path, 0o666)
        code = ("import os, socket, sys; os.setgid(65534); os.setuid(65534); "
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(b'{\"cmd\": \"stop\"}\\n'); print(s.recv(1000).decode())")  # fmt: skip
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                text=True, timeout=20, env=cluster_env())  # fmt: skip
        assert "permission denied: uid 65534" in result.stdout, result.stderr
        cluster.wait_log("control socket: refused a client of uid 65534")
        assert json.loads(ask(path, b'{"cmd": "status"}\n'))["ok"]  # not stopped
    finally:
        shutil.rmtree(place, ignore_errors=True)


def test_a_live_control_socket_is_not_taken(controlled, tmp_path: Path) -> None:
    _, path = controlled
    result = subprocess.run([sys.executable, "-m", "cluster", "run", "echo", "-w", "1",
                             "-b", "127.0.0.1:0", "--control", str(path)], cwd=ROOT,
                            env=cluster_env(), capture_output=True, text=True, timeout=20)  # fmt: skip
    assert result.returncode == 4 and "a live master listens there" in result.stderr


def test_usr2_hands_the_control_socket_to_the_new_master(start_cluster, tmp_path: Path) -> None:
    path = tmp_path / "c.ctl"
    metrics_sock = tmp_path / "m.sock"
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--control", str(path),
                            "--metrics", f"unix:{metrics_sock}")  # fmt: skip
    reply = json.loads(ctl(path, "--json", "upgrade").stdout)
    new_pid = reply["new_master"]
    cluster.adopt(new_pid)
    assert cluster.wait_exit(timeout=30) == 0
    cluster.adopt(new_pid)
    status = json.loads(ctl(path, "--json", "status").stdout)
    assert status["pid"] == new_pid
    assert b"cluster_generation" in unix_http_get(metrics_sock)
    os.kill(new_pid, 15)
    wait_for(lambda: not path.exists(), 10, "the new master to remove its socket at exit")


def unix_http_get(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


# ----------------------------------------------------------------------------- the CLI
def cluster_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=ROOT, env=cluster_env(),
                          capture_output=True, text=True, timeout=20)  # fmt: skip


def test_cli_version_usage_and_errors() -> None:
    version = cluster_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("cluster ")
    bare = cluster_cli()
    assert bare.returncode == 2 and all(word in bare.stdout for word in ("run", "ctl", "loadtest"))
    for args in (["run", "--frobnicate"], ["ctl", "dance"], ["frob"]):
        result = cluster_cli(*args)
        assert result.returncode == 2 and result.stderr.startswith("cluster: error:"), args


# ----------------------------------------------------------------------------- metrics
def scrape(url: str, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return r.read().decode()


def samples(text: str, openmetrics: bool = False) -> dict[tuple, float]:
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: dict[tuple, float], name: str, **match: str) -> float:
    return sum(value for (sample, labels), value in found.items() if sample == name
               and all(dict(labels).get(k) == v for k, v in match.items()))  # fmt: skip


@pytest.mark.parametrize("mode", ["sync", "thread", "fork"])
def test_metrics_count_every_request_once(start_cluster, mode: str) -> None:
    cluster = start_cluster("testapps:Boom", "-w", "2", "-k", mode, "-b", "127.0.0.1:0",
                            "--metrics", "tcp://127.0.0.1:0", "--max-requests", "7")  # fmt: skip
    port = int(cluster.wait_log(r"metrics on tcp://127\.0\.0\.1:(\d+)").group(1))
    uri = cluster.uris[0]
    for n in range(30):
        payload = b"boom\n" if n % 10 == 0 else b"%d\n" % n
        stream_roundtrip(tcp_connect(cluster.address()), payload)  # recycles workers, too
    url = f"http://127.0.0.1:{port}/metrics"

    def counted() -> dict | None:
        found = samples(scrape(url))
        done = total(found, "cluster_requests_total", listener=uri)
        return found if done == 30 else None

    found = wait_for(counted, 10, "30 requests counted")
    assert total(found, "cluster_request_duration_seconds_count", listener=uri) == 30
    assert total(found, "cluster_request_duration_seconds_bucket", listener=uri, le="+Inf") == 30
    assert total(found, "cluster_connections_accepted_total", listener=uri) == 30
    assert total(found, "cluster_handler_errors_total", listener=uri) == 3
    assert total(found, "cluster_worker_restarts_total", reason="recycle") >= 2
    assert total(found, "cluster_workers") >= 2  # each live worker in one state (a recycled
    # one may still be finishing beside its replacement)
    assert total(found, "cluster_generation") == 1
    assert total(found, "cluster_listen_backlog", listener=uri) == 2048
    assert total(found, "cluster_listen_queue", listener=uri) == 0
    openmetrics = samples(scrape(url, openmetrics=True), openmetrics=True)
    assert total(openmetrics, "cluster_requests_total", listener=uri) == 30


def test_a_silent_scraper_does_not_block_the_master(start_cluster) -> None:
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--metrics",
                            "tcp://127.0.0.1:0")  # fmt: skip
    port = int(cluster.wait_log(r"metrics on tcp://127\.0\.0\.1:(\d+)").group(1))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        silent.sendall(b"GET /metr")  # and nothing more
        assert "cluster_uptime_seconds" in scrape(f"http://127.0.0.1:{port}/metrics")
        assert stream_roundtrip(tcp_connect(cluster.address()), b"fine") == b"fine"


def test_out_of_fds_the_control_socket_is_a_bind_error_and_the_title_is_skipped(tmp_path) -> None:
    """With every fd taken, a master starting up must say so in one line (BindError, exit 4),
    not die in a traceback: neither where it opens its control socket nor where it imports
    setproctitle for its title (an import needs an fd to read the module)."""
    import resource

    from cluster.control import open_control
    from cluster.errors import BindError
    from workers.runtime.entry import set_title

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    title_module = sys.modules.pop("setproctitle", None)  # imported afresh, so it needs an fd
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        with pytest.raises(BindError, match=r"cannot bind control socket .*: Too many open"):
            open_control(str(tmp_path / "ctl"), taking_over=False)
        set_title("cluster: test")  # returns: the title is cosmetic
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if title_module is not None:
            sys.modules["setproctitle"] = title_module
    assert held  # the fds were really exhausted


def test_ctl_reload_folded_says_what_it_waits_for() -> None:
    """A reload folded during the app's check said it waited for "the booting generation"."""
    during_check = summarize("reload", {"ok": True, "folded": True, "after": "check"})
    during_boot = summarize("reload", {"ok": True, "folded": True, "after": "boot"})
    assert (
        during_check
        == "reload: folded into the one that starts once the app's check under way ends"
    )
    assert (
        during_boot == "reload: folded into the one that starts once the booting generation serves"
    )

"""Bad input: one line naming the bad value, the contract's exit code, no traceback, no fork."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cluster_env, stream_roundtrip, unix_connect

pytestmark = pytest.mark.timeout(30)


def run_cluster(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a master that is expected to fail at start-up; it must exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "cluster", "run", *args],
        cwd=ROOT, env=cluster_env(), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and needle in errors[0], result.stderr
    assert result.stderr.splitlines()[-1] == errors[0], result.stderr  # nothing after it
    assert "exiting (code 0)" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-b", "tcp://127.0.0.1"], "tcp://127.0.0.1"),
        (["-b", "127.0.0.1:99999"], "127.0.0.1:99999"),
        (["--frobnicate"], "--frobnicate"),
        (["-w", "0"], "--workers"),
        (["-w", "many"], "many"),
        (["-k", "gevent"], "gevent"),
        (["--request-timeout", "-1"], "--request-timeout"),
        (["-k", "thread", "--threads", "8", "--max-connections", "4"], "--max-connections 4"),
    ],
)
def test_usage_errors_exit_2(args: list[str], needle: str) -> None:
    assert_one_line_error(run_cluster(*args), 2, needle)


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("workers = [")
    assert_one_line_error(run_cluster("--config", str(path)), 2, str(path))


@pytest.mark.parametrize(
    ("app", "needle"),
    [("no_such_module:App", "no_such_module"), ("broken:App", "broken on purpose"),
     ("testapps:Missing", "Missing"), ("os:sep", "not a request handler class"), ("justaname", "justaname")],
)  # fmt: skip
def test_bad_app_exits_3_before_any_fork(app: str, needle: str) -> None:
    result = run_cluster(app, "-b", "127.0.0.1:0")
    assert_one_line_error(result, 3, needle)
    assert "starting" not in result.stderr and "listening on" not in result.stderr


def test_bad_per_listener_handler_exits_3() -> None:
    assert_one_line_error(run_cluster("echo", "-b", "127.0.0.1:0=nope:Handler"), 3, "nope")


def test_address_in_use_exits_4() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert_one_line_error(run_cluster("-b", f"127.0.0.1:{port}"), 4, f"127.0.0.1:{port}")
        # A bind that fails after another one worked: still one line, the last.
        result = run_cluster("-b", "127.0.0.1:0", "-b", f"127.0.0.1:{port}")
        assert_one_line_error(result, 4, f"127.0.0.1:{port}")


def test_regular_file_at_unix_path_is_never_deleted(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    assert_one_line_error(run_cluster("-b", f"unix:{path}"), 4, str(path))
    assert path.read_text() == "keep me"


def test_live_unix_socket_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        assert_one_line_error(run_cluster("-b", f"unix:{path}"), 4, path)
        assert Path(path).is_socket()


def test_stale_unix_socket_is_replaced(tmp_path: Path, start_cluster) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    cluster = start_cluster("echo", "-w", "1", "-b", f"unix:{path}")
    assert stream_roundtrip(unix_connect(path), b"fresh") == b"fresh"
    assert cluster.uris == [f"unix:{path}"]


def test_help_documents_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "cluster", "run", "--help"], cwd=ROOT,
                            env=cluster_env(), capture_output=True, text=True, timeout=20)  # fmt: skip
    assert result.returncode == 0
    for flag in ("--bind", "--workers", "--worker-class", "--backlog", "--graceful-timeout",
                 "--pidfile", "--name", "--log-level", "--config", "--max-workers",
                 "--request-timeout", "--max-connections", "--no-waiting-room", "--defer-accept",
                 "--user", "--group", "--umask"):  # fmt: skip
        assert flag in result.stdout


def test_loadtest_is_a_cluster_subcommand() -> None:
    result = subprocess.run([sys.executable, "-m", "cluster", "loadtest", "--help"], cwd=ROOT,
                            env=cluster_env(), capture_output=True, text=True, timeout=20)  # fmt: skip
    assert result.returncode == 0 and "--duration" in result.stdout
    refused = subprocess.run([sys.executable, "-m", "cluster", "loadtest", "tcp://127.0.0.1:9"],
                             cwd=ROOT, env=cluster_env(), capture_output=True, text=True,
                             timeout=20)  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr


def test_pidfile_in_a_missing_directory_exits_2_before_binding(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "m.pid"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # an address in use: binding would fail with 4
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cluster("-b", f"127.0.0.1:{port}", "--pidfile", str(path))
    assert_one_line_error(result, 2, str(path))
    assert "listening on" not in result.stderr


def test_pidfile_of_a_running_master_refuses_the_start(start_cluster, tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    running = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--pidfile", str(path))
    result = run_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--pidfile", str(path))
    assert_one_line_error(result, 2, f"pid {running.pid}")
    assert path.read_text().strip() == str(running.pid)  # untouched


def test_stale_pidfile_is_replaced(start_cluster, tmp_path: Path) -> None:
    path = tmp_path / "m.pid"
    path.write_text(f"{os.getpid()}\n")  # a live pid, but not a master of ours
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", "--pidfile", str(path))
    assert path.read_text().strip() == str(cluster.pid)

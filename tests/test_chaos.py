"""scripts/chaos.py end to end: real clusters, real signals, real load, as a user runs it.

Each run goes through the command line in a subprocess and writes its JSON, which names every
master it acted on; after each test all of them must be gone (chaos ends the clusters it
starts, also when it fails), and a chaos process still running is ended by pid.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, cluster_env
from tests.procs import alive, gone, wait_for

pytestmark = pytest.mark.timeout(120)

SCRIPT = ROOT / "scripts" / "chaos.py"


@dataclass
class Ran:
    code: int
    out: str
    err: str
    data: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return [event["label"] for event in self.data["events"]]

    @property
    def masters(self) -> tuple[int, int]:
        chaos = self.data["chaos"]
        return chaos["initial_master"], chaos["final_master"]


@pytest.fixture
def chaos(tmp_path: Path) -> Iterator[Callable[..., Ran]]:
    """``chaos(args...)`` runs the script to its end; teardown checks that nothing it acted on
    outlives the test."""
    procs: list[subprocess.Popen] = []
    masters: set[int] = set()

    def run_chaos(*args: str) -> Ran:
        path = tmp_path / f"chaos-{len(procs)}.json"
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args, "--json", str(path)],
            cwd=tmp_path, env=cluster_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        out, err = proc.communicate(timeout=90)
        data = json.loads(path.read_text()) if path.exists() else {}
        masters.update(data.get("chaos", {}).get("masters", []))
        masters.update(int(pid) for pid in re.findall(r"chaos: cluster (\d+) ready", out))
        return Ran(proc.returncode, out, err, data)

    yield run_chaos
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # chaos ends its cluster on TERM
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    wait_for(lambda: all(gone(pid) for pid in masters), 15, f"masters {sorted(masters)} gone")


def assert_lost_nothing(ran: Ran) -> None:
    assert ran.code == 0, ran.out + ran.err
    assert ran.data["totals"]["requests"] > 100, ran.out
    assert ran.data["totals"]["errors"] == 0, ran.data["error_examples"]
    assert ran.data["chaos"]["problems"] == [] and "verdict     PASS" in ran.out


@pytest.mark.slow
def test_hup_ttin_ttou_lose_nothing_and_plot(chaos: Callable[..., Ran], tmp_path: Path) -> None:
    """Ticks at 0.5, 1 and 1.5 s (a signal takes no time: none is skipped), and the load
    runs 0.5 s past the last."""
    png = tmp_path / "chaos.png"
    ran = chaos("--actions", "hup,ttin,ttou", "--every", "0.5", "--duration", "2",
                "--plot", str(png))  # fmt: skip
    assert_lost_nothing(ran)
    assert ran.labels[:3] == ["HUP sent", "TTIN sent", "TTOU sent"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_usr2_follows_the_new_master(chaos: Callable[..., Ran]) -> None:
    """One round: the upgrade waits up to an interval for the old master, so under load the
    ticks it overran are skipped; the duration leaves room for the two actions after it (the
    upgrade, sent at 2 s, may take 3 s; it takes 0.5 s on an idle machine)."""
    ran = chaos("--actions", "hup,usr2,ttin,ttou", "--rounds", "1", "--every", "1",
                "--duration", "7")  # fmt: skip
    assert_lost_nothing(ran)
    initial, final = ran.masters
    assert final != initial, ran.out
    assert ran.labels == ["HUP sent", f"USR2 sent: master {initial} -> {final}", "TTIN sent",
                          "TTOU sent"]  # fmt: skip
    assert f"masters     initial {initial}, final {final}" in ran.out


def test_kill_idle_is_reported_and_allowed(chaos: Callable[..., Ran]) -> None:
    ran = chaos("--actions", "kill-idle", "--every", "0.5", "--duration", "1.5", "--seed", "1")
    assert ran.code == 0, ran.out + ran.err
    kills = [label for label in ran.labels if label.startswith("KILL worker")]
    assert len(kills) == ran.data["chaos"]["taken"]["kill-idle"] >= 2, ran.labels
    assert ran.data["chaos"]["max_errors"] is None and "no limit: kill-idle" in ran.out


def test_errors_fail_a_graceful_run_on_an_attached_cluster(
    chaos: Callable[..., Ran], start_cluster: Callable[..., Any], tmp_path: Path
) -> None:
    """Attached: chaos acts on a master it did not start, loads the target it is given (here
    a port nobody listens on: every request is refused) and leaves the master running."""
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        ran = chaos("--pid", str(cluster.pid), "--target", f"tcp://127.0.0.1:{port}",
                    "--actions", "ttin,ttou", "--every", "0.5", "--duration", "1.5")  # fmt: skip
    assert ran.code == 1 and ran.data["errors"]["refused"] > 0, ran.out + ran.err
    assert "verdict     FAIL" in ran.out and ran.masters == (cluster.pid, cluster.pid)
    cluster.wait_log("pool target is now 1 worker")  # TTOU after TTIN, on this master
    assert alive(cluster.pid)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: -d/--duration"),
        (["-d", "2", "--actions", "hup,nope"], "unknown action 'nope'"),
        (["-d", "2", "--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["-d", "2", "--bind", "tcp://10.1.2.3:0"], "refusing 10.1.2.3"),
        (["-d", "2", "--target", "tcp://127.0.0.1:9"], "--target is for a running cluster"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=30, env=cluster_env())  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr

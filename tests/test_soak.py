"""scripts/soak.py: its pure parts (which errors a kill explains, which log lines bad clients
caused, when a pool is settled, the deck of faults), and a short soak end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cluster_env

sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402  (a script, importable once scripts/ is on the path)

SCRIPT = ROOT / "scripts" / "soak.py"
KILLS = [soak.Kill(100.0, 11, busy=True), soak.Kill(200.0, 12, busy=False)]


@pytest.mark.parametrize(
    ("when", "kind", "stream", "culprit"),
    [
        (100.2, "reset", True, 11),  # a connection broken by the kill
        (99.97, "reset", True, 11),  # noticed a moment before the kill's own timestamp
        (101.5, "reset", True, None),  # too late to be the kill's
        (99.0, "reset", True, None),  # before it
        (102.3, "timeout", False, 11),  # a datagram that died with the worker: at its timeout
        (102.3, "reset", False, None),  # a UDP error that is no timeout: the short window
        (102.3, "timeout", True, None),  # a stream timeout is no kill's
        (200.5, "wrong reply", True, 12),
    ],
)
def test_an_error_is_a_kills_only_within_its_window(when, kind, stream, culprit) -> None:
    found = soak.culprit_of(when, kind, stream, KILLS)
    assert (found.pid if found else None) == culprit


def test_attribute_splits_errors_and_counts_the_unrecorded_as_unexplained() -> None:
    load = soak.Load("tcp", "tcp://127.0.0.1:1", "per-request", True)
    data = {"totals": {"requests": 50, "errors": 5},
            "error_times": [[100.1, "reset"], [200.1, "reset"], [150.0, "timeout"],
                            [100.5, "wrong reply"]]}  # fmt: skip
    outcome = soak.attribute(load, data, KILLS)
    assert (outcome.by_busy_kills, outcome.by_idle_kills) == (2, 1)
    assert outcome.unexplained == [(150.0, "timeout"), (0.0, "unrecorded")]


def record(when: float, level: str, text: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"{stamp},{int(when % 1 * 1000):03d} [42] [{level}] {text}"


def test_bad_client_lines_are_the_records_naming_them_during_their_life() -> None:
    t = 1_800_000_000.0
    log = "\n".join([
        record(t, "INFO", "ready: 3 workers (thread)"),
        record(t + 5, "WARNING", "client 127.0.0.1:40001 sent garbage"),
        "Traceback (most recent call last):",
        "  ValueError: nope",
        record(t + 6, "ERROR", "client 127.0.0.1:40002 is someone else"),
        record(t + 99, "WARNING", "client 127.0.0.1:40001 again, long after"),
        record(t + 7, "WARNING", "control socket: refused a client of uid 7"),
    ])  # fmt: skip
    caused, warnings = soak.bad_client_lines(log, [(t + 4, t + 5.5, 40001)])
    assert caused == 3 + 1  # the record, its two continuation lines, and the control socket's
    assert warnings == 4


def test_a_pool_is_settled_with_one_generation_all_up_and_no_upgrade() -> None:
    up = {"generations": [{}], "target": 2, "upgrade": None, "stopping": False,
          "workers": [{"state": "idle"}, {"state": "busy"}]}  # fmt: skip
    assert soak.settled(up)
    assert not soak.settled({**up, "workers": [{"state": "idle"}, {"state": "booting"}]})
    assert not soak.settled({**up, "target": 3})
    assert not soak.settled({**up, "generations": [{}, {}]})
    assert not soak.settled({**up, "upgrade": {"new_master": 9, "state": "booting"}})


def test_the_deck_deals_every_fault_before_any_twice() -> None:
    cards = soak.deal(random.Random(7))
    first = [next(cards) for _ in soak.FAULTS]
    assert sorted(first) == sorted(soak.FAULTS)
    assert first != [next(cards) for _ in soak.FAULTS] or len(soak.FAULTS) < 3


def test_usage_errors_are_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--duration", "1"], cwd=ROOT,
                            env=cluster_env(), capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("soak: error: --duration")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_short_soak_passes_every_check(tmp_path: Path) -> None:
    """Seven seconds of load and a fault every 0.5 s (most of the deck, no kind twice: the same
    ten faults as ten seconds at 0.8 s dealt, in 5 s less): no unexplained error, the final
    master's fds and RSS flat, no zombie, no orphan, every master exit 0."""
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "7", "--every", "0.5", "--seed", "3",
         "--json", str(out)],
        cwd=ROOT, env=cluster_env(), capture_output=True, text=True, timeout=80,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["passed"] and all(check["passed"] for check in data["checks"].values())
    dealt = sum(data["fault_counts"].values())  # fewer when a loaded machine slows the faults
    assert dealt >= 4 and len(data["fault_counts"]) == min(dealt, len(soak.FAULTS)), data
    assert all(load["requests"] > 100 for load in data["loads"]), data["loads"]
    assert data["pids_tracked"] >= 4 and not data["zombies"]
    assert "verdict     PASS" in result.stdout

"""The multi-host scenario, short: two clusters behind a real HAProxy, through an upgrade of
both, a drain and restart of one and a kill -9 of the other, under load
(``scripts/multihost.py --short``; ``make multihost`` runs the long one with its plot)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, cluster_env
from tests.procs import descendants, kill_all

pytestmark = pytest.mark.timeout(120)
SCRIPT = ROOT / "scripts" / "multihost.py"


@pytest.mark.slow
def test_hosts_behind_haproxy_lose_nothing_but_a_killed_hosts_in_flight(tmp_path: Path) -> None:
    out = tmp_path / "multihost.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--short", "--json", str(out)],
                            cwd=ROOT, env=cluster_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:  # it cleans up on TERM; KILL whatever is left of it
            below = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
            kill_all([proc.pid, *below])
            proc.wait(5)
    if proc.returncode == 3:
        pytest.skip(output.strip().splitlines()[-1])
    assert proc.returncode == 0, output
    report = json.loads(out.read_text())
    phases = dict(report["phases"])
    assert phases["rolling upgrade a, b"] == 0, output
    assert phases["drain, stop, start, undrain a"] == 0, output
    assert phases["kill -9 b, start b"] <= 4, output  # at most one request per connection
    assert report["requests"] > 1000, output
    checks = {name: ok for name, ok, _ in report["checks"]}
    assert all(checks.values()) and "host b served after its restart" in checks, output
    if "PROXY protocol listener" not in output:  # once the listener has ?proxy=v2
        assert checks["client address"], output
    labels = [label for _, label in report["events"]]
    assert labels == ["usr2 a", "usr2 b", "drain a", "stop a", "start a", "undrain a",
                      "kill -9 b", "start b", "end"]  # fmt: skip

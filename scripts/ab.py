"""Interleaved side-by-side runs of several servers, for before/after comparisons.

    python scripts/ab.py 'before|/path/to/old/tree|http-hello -w 2 -k thread' \\
                         'after|.|http-hello -w 2 -k thread' \\
                         'forking|.|@scripts/stdlib_server.py forking'

Each spec is ``NAME|TREE|ARGS``: ``cluster run ARGS -b 127.0.0.1:0`` run from TREE (a git
worktree of another commit, say), or with ``@``, ``python ARGS`` (a peer that prints the
same ``listening on`` line). All run at once; wrk drives each in turn, in alternating order,
for ROUNDS rounds (env: ROUNDS=5, DUR=3 seconds, CONNS=16, CLOSE=1 for connection-per-request).
It prints each server's median rate and ratio to the first, and the CPU its whole process
tree spent per request: on a busy machine rates swing between rounds, the CPU per request
much less.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cluster.procfs import tree_usage  # noqa: E402


def start(name: str, tree: str, args: str) -> tuple[subprocess.Popen, int]:
    log_path = Path(f"/tmp/ab-{name}.log")
    log = log_path.open("w+")
    if args.startswith("@"):
        command = [sys.executable, *args[1:].split()]
    else:
        command = [sys.executable, "-m", "cluster", "run", *args.split(), "-b", "127.0.0.1:0"]
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    proc = subprocess.Popen(command, cwd=tree, env=env, stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log_path.read_text()
        found = re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", text)
        if found and (args.startswith("@") or "ready:" in text):
            return proc, int(found.group(1))
        time.sleep(0.1)  # polling the log for readiness
    proc.kill()
    raise SystemExit(f"{name} did not start: see {log_path}")


def main() -> int:
    specs = [arg.split("|") for arg in sys.argv[1:]]
    if not specs or any(len(spec) != 3 for spec in specs):
        print(__doc__, file=sys.stderr)
        return 2
    rounds, duration = int(os.environ.get("ROUNDS", "5")), os.environ.get("DUR", "3")
    conns, close = os.environ.get("CONNS", "16"), os.environ.get("CLOSE", "1") == "1"
    servers = {name: start(name, tree, args) for name, tree, args in specs}
    rates: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for n in range(rounds):
            order = list(servers) if n % 2 == 0 else list(servers)[::-1]
            for name in order:
                proc, port = servers[name]
                command = [
                    "wrk",
                    "-t2",
                    f"-c{conns}",
                    f"-d{duration}s",
                    f"http://127.0.0.1:{port}/",
                ]
                if close:
                    command[1:1] = ["-H", "Connection: close"]
                before = tree_usage(proc.pid)
                out = subprocess.run(command, capture_output=True, text=True).stdout
                used = (tree_usage(proc.pid) - before).cpu
                done = int(re.search(r"(\d+) requests in", out).group(1))
                rates[name].append(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
                cpu[name].append(used / max(done, 1) * 1e6)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    base = statistics.median(rates[specs[0][0]])
    for name in servers:
        rate = statistics.median(rates[name])
        print(f"{name:14s} {rate:9.0f} req/s  x{rate / base:.2f}  cpu/request "
              f"{statistics.median(cpu[name]):5.1f} us   rates {[round(r) for r in rates[name]]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

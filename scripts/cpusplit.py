"""Where one server's CPU goes, process by process, under wrk: the per-request split that a
whole tree's total (``scripts/ab.py``) hides.

    python scripts/cpusplit.py 'fork|.|http-hello -w 2 -k fork'
    python scripts/cpusplit.py 'bare|.|@scripts/bare_server.py fork tcp http-hello'

The spec is ``scripts/ab.py``'s ``NAME|TREE|ARGS``. For every process alive through the whole
window (the master, each worker; a fork loop's parents), it prints per request, over all the
requests served: its own user and system CPU and minor page faults, and those of the
children it collected meanwhile (a fork-mode worker's, or a bare fork loop's, request
children; the kernel folds a reaped child's times into its parent). Env: DUR=5 seconds,
CONNS=16, CLOSE=1 for connection-per-request.

Why per process: fork mode's cost is spread over two kinds of process (the worker that
accepts and forks, the children), and each has its own reason to cost what it does
(docs/benchmarks-notes.md, "the floor of fork mode").
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import start  # noqa: E402
from cluster.procfs import children, stat_fields  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
# After the comm field of /proc/PID/stat: minflt, cminflt at 7, 8; utime..cstime at 11..14.
MINFLT, CMINFLT, UTIME, STIME, CUTIME, CSTIME = 7, 8, 11, 12, 13, 14
# Processes this many levels below the root live through the window; deeper ones are
# request children (a worker's, at depth 2), which their parent's totals take in.
LASTING_DEPTH = 1


def lasting(root: int) -> dict[int, str]:
    """The root and its descendants up to LASTING_DEPTH, each named by its place: ``0`` is
    the root's first child, ``0/1`` that one's second."""
    names = {root: "root"}
    frontier = [root]
    for _ in range(LASTING_DEPTH):
        below = []
        for parent in frontier:
            for n, pid in enumerate(sorted(children(parent))):
                names[pid] = f"{n}" if parent == root else f"{names[parent]}/{n}"
                below.append(pid)
        frontier = below
    return names


def counters(pid: int) -> list[int] | None:
    fields = stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return None
    return [int(fields[i]) for i in (UTIME, STIME, MINFLT, CUTIME, CSTIME, CMINFLT)]


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            words = fh.read().split(b"\0")
    except OSError:
        return "?"
    text = b" ".join(word for word in words[:3] if word).decode(errors="replace")
    return text[:60] or "?"


def main() -> int:
    if len(sys.argv) != 2 or len(sys.argv[1].split("|")) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    name, tree, args = sys.argv[1].split("|")
    proc, port = start(name, tree, args)
    try:
        names = lasting(proc.pid)
        titles = {pid: title(pid) for pid in names}
        before = {pid: counters(pid) for pid in names}
        command = ["wrk", "-t2", f"-c{os.environ.get('CONNS', '16')}",
                   f"-d{os.environ.get('DUR', '5')}s", f"http://127.0.0.1:{port}/"]  # fmt: skip
        if os.environ.get("CLOSE", "1") == "1":
            command[1:1] = ["-H", "Connection: close"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
        after = {pid: counters(pid) for pid in names}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
    print(f"{name}: {requests} requests, {rate} req/s; per request (over all requests):")
    print(f"{'process':8} {'pid':>7}  {'own: user + system us, faults':32} "
          f"{'its reaped children: user + system us, faults':48} title")  # fmt: skip
    per = 1e6 / TICKS / max(requests, 1)
    total = 0.0
    for pid, place in names.items():
        if before[pid] is None or after[pid] is None:
            continue
        d = [b - a for a, b in zip(before[pid], after[pid], strict=True)]
        total += (d[0] + d[1] + d[3] + d[4]) * per
        own = f"{d[0] * per:6.0f} + {d[1] * per:6.0f}, {d[2] / max(requests, 1):5.0f}"
        reaped = f"{d[3] * per:6.0f} + {d[4] * per:6.0f}, {d[5] / max(requests, 1):5.0f}"
        print(f"{place:8} {pid:7}  {own:32} {reaped:48} {titles[pid]}")
    print(f"total {total:.0f} us of CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory per worker: the cluster's sync and thread workers beside gunicorn's sync workers.

    python scripts/memory.py [--workers 1,8,64] [--servers ...] [--app http-hello]
                             [--breakdown] [--write docs/benchmarks.md]

Each server starts with 1, 8 and 64 workers serving the same hello app (``http-hello``, and
``scripts/wsgi_hello.py`` for gunicorn), is left alone until its memory stops changing
(idle), and then every worker's and the master's USS, PSS and RSS are read from
``/proc/PID/smaps_rollup``. USS (the pages only that process maps) is what one more worker
costs; PSS shares each page among the processes that map it; RSS counts shared pages in full.

With a single worker, every page the master writes after the fork (its loop's objects, its
garbage collections) stops being shared with that worker and counts in both USSes; with 8 or
64 the workers still share the master's old copy among themselves. So the 1-worker column is
the pessimistic one.

``--breakdown`` adds, for one worker of each server, where its private pages are: the C heap
(``[heap]``, malloc), anonymous mappings (Python's object arenas), the stack, and file
mappings (the libraries' data). ``--write FILE`` replaces the ``## Memory`` section of FILE
(or appends one). Not CPU-bound: the numbers do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.procfs import Memory, alive, children, descendants, memory

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Memory"
SERVERS = ("cluster sync", "cluster thread", "gunicorn sync")
MIB = 1024.0 * 1024.0  # procfs.memory counts bytes


@dataclass
class Sample:
    server: str
    workers: int
    master: Memory
    each: list[Memory]  # one per worker
    breakdown: dict[str, int] | None = None  # bytes private per kind of mapping, one worker


def command(server: str, workers: int, app: str) -> tuple[list[str], Callable[[str], bool]]:
    """The command line of ``server`` with ``workers`` workers, and the test of its log that
    says they have all booted."""
    if server.startswith("cluster"):
        mode = server.split()[1]
        args = [sys.executable, "-m", "cluster", "run", app, "-k", mode, "-w", str(workers),
                "-b", "127.0.0.1:0", "--log-level", "info"]  # fmt: skip
        return args, lambda log: re.search(r"ready: \d+ workers?", log) is not None
    gunicorn = shutil.which("gunicorn") or str(Path(sys.executable).with_name("gunicorn"))
    args = [gunicorn, "-w", str(workers), "-k", "sync", "-b", "127.0.0.1:0",
            "--chdir", str(ROOT / "scripts"), "wsgi_hello:app"]  # fmt: skip
    return args, lambda log: log.count("Booting worker") >= workers


def start(args: list[str], ready: Callable[[str], bool], workers: int,
          timeout: float) -> subprocess.Popen:  # fmt: skip
    """Start a server and wait until its log says ``ready`` and it has ``workers`` children."""
    proc = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    assert proc.stderr is not None
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready("".join(lines)) and len(children(proc.pid)) >= workers:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{args} did not start:\n{''.join(lines)}")


def stop(proc: subprocess.Popen) -> None:
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in tree:  # whatever the server failed to end does not outlive the run
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def settle(pids: list[int], timeout: float) -> list[Memory]:
    """Read every pid's memory until the total USS changes by under 0.5% for a second
    (booted and idle), or ``timeout`` passes; the last reading."""
    deadline = time.monotonic() + timeout
    last, steady_since = -1, time.monotonic()
    while True:
        readings = [memory(pid) or Memory() for pid in pids]
        total = sum(m.uss for m in readings)
        now = time.monotonic()
        if abs(total - last) > 0.005 * max(total, 1):
            last, steady_since = total, now
        elif now - steady_since >= 1.0 or now > deadline:
            return readings
        time.sleep(0.2)


def breakdown(pid: int) -> dict[str, int]:
    """Bytes private to ``pid`` per kind of mapping, from /proc/PID/smaps (in kB there)."""
    kinds: dict[str, int] = {}
    kind = "other"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return kinds
    for line in text.splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode path
            path = fields[5] if len(fields) > 5 else ""
            kind = (path if path in ("[heap]", "[stack]") else
                    "anonymous (Python's arenas)" if not path else
                    "libpython's data" if "libpython" in path else "other files")  # fmt: skip
        elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
            kinds[kind] = kinds.get(kind, 0) + int(fields[1]) * 1024
    return kinds


def measure(server: str, workers: int, app: str, want_breakdown: bool) -> Sample:
    args, ready = command(server, workers, app)
    proc = start(args, ready, workers, timeout=30 + workers)
    try:
        pids = children(proc.pid)
        readings = settle([proc.pid, *pids], timeout=20)
        detail = breakdown(pids[0]) if want_breakdown else None
    finally:
        stop(proc)
    return Sample(server, workers, readings[0], readings[1:], detail)


def mib(size: float) -> str:
    return f"{size / MIB:.2f}"


def table(samples: list[Sample]) -> str:
    lines = ["| server | workers | worker USS | worker PSS | worker RSS | master USS | master PSS "
             "| master RSS | worker USS vs gunicorn sync |", "|" + " --- |" * 9]  # fmt: skip
    gunicorn = {s.workers: s for s in samples if s.server == "gunicorn sync"}
    for s in samples:
        uss = statistics.median(m.uss for m in s.each)
        pss = statistics.median(m.pss for m in s.each)
        rss = statistics.median(m.rss for m in s.each)
        peer = gunicorn.get(s.workers)
        ratio = ""
        if peer is not None and peer is not s:
            ratio = f"{uss / statistics.median(m.uss for m in peer.each):.2f}x"
        lines.append(f"| {s.server} | {s.workers} | {mib(uss)} | {mib(pss)} | {mib(rss)} "
                     f"| {mib(s.master.uss)} | {mib(s.master.pss)} | {mib(s.master.rss)} "
                     f"| {ratio} |")  # fmt: skip
    return "\n".join(lines)


def breakdown_table(samples: list[Sample]) -> str:
    seen: dict[str, Sample] = {}
    for s in samples:
        if s.breakdown is not None:
            seen.setdefault(f"{s.server}, {s.workers} workers", s)
    kinds = sorted({k for s in seen.values() for k in s.breakdown or {}})
    lines = ["| one worker of | " + " | ".join(kinds) + " |", "|" + " --- |" * (len(kinds) + 1)]
    for name, s in seen.items():
        cells = [mib((s.breakdown or {}).get(k, 0)) for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the ``## Memory`` section of ``path`` (up to the next ``## ``) or append it."""
    old = path.read_text() if path.exists() else ""
    start_at = old.find(SECTION + "\n")
    if start_at < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    end_at = old.find("\n## ", start_at + len(SECTION))
    rest = old[end_at + 1 :] if end_at >= 0 else ""
    path.write_text(old[:start_at] + text + ("\n" + rest if rest else ""))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,8,64", help="comma-separated pool sizes")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--app", default="http-hello", help="the cluster's app")
    parser.add_argument("--breakdown", action="store_true", help="private pages by mapping")
    parser.add_argument("--write", metavar="FILE", help="replace its ## Memory section")
    args = parser.parse_args()
    servers = args.servers.split(",")
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)}; known: {', '.join(SERVERS)}")
    sizes = [int(n) for n in args.workers.split(",")]
    samples = []
    for workers in sizes:
        for server in servers:
            sample = measure(server, workers, args.app, args.breakdown)
            print(f"{server:16} {workers:3} workers: worker USS "
                  f"{mib(statistics.median(m.uss for m in sample.each))} MiB, master USS "
                  f"{mib(sample.master.uss)} MiB", flush=True)  # fmt: skip
            samples.append(sample)
    text = (f"{SECTION}\n\nMade by `python scripts/memory.py {' '.join(sys.argv[1:])}` "
            f"(`make bench`) on {time.strftime('%Y-%m-%d')}: MiB per process, idle after boot, "
            f"the cluster serving `{args.app}`, gunicorn 27 `scripts/wsgi_hello.py`; worker "
            "columns are the median over the workers.\n\n" + table(samples) + "\n")  # fmt: skip
    if args.breakdown:
        text += "\nWhere one worker's private pages are (MiB):\n\n" + breakdown_table(samples)
        text += "\n"
    print("\n" + text)
    if args.write:
        write_section(Path(args.write), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmark: the cluster's modes against their peers, same handler, same run.

    python scripts/bench.py [--duration 2] [--repeats 3] [--write docs/benchmarks.md]

Rows run interleaved (every row once per round, rounds repeated) so that drift of the machine
hits every row alike; each cell is the median of the rounds with min..max. The clients share
the machine's cores with the servers, as the targets in the issues assume.

Rows: the cluster in sync, thread and fork modes; the standard library's ThreadingTCPServer,
ForkingTCPServer and UDPServer serving the very same handler classes; gunicorn sync and gthread
with the WSGI twin of the handler, when gunicorn is installed; nginx ``return 200`` with 2
workers, when nginx is installed (the near-physical limit on this machine).

Workloads: HTTP hello with keep-alive and with a connection per request (wrk, or our own
loadtest when wrk is missing); raw TCP echo of 64 bytes, persistent and per request; UDP echo
(our loadtest). Then accept fairness: per-worker request counts of the sync cluster with 2 and
4 workers under sustained connection-per-request load, from the master's exit log.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKERS = 2
CONNECTIONS = 8  # keep-alive and echo; thread mode has THREADS >= this per worker
CLOSE_CONNECTIONS = 16
THREADS = 8
HTTP, TCP_ECHO, UDP_ECHO = "http", "tcp-echo", "udp-echo"


@dataclass
class Running:
    """A server under test: its process, its address, and its log so far."""

    proc: subprocess.Popen
    host: str
    port: int
    lines: list[str] = field(default_factory=list)
    cleanup: Callable[[], None] = lambda: None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.cleanup()


@dataclass
class Row:
    name: str
    start: Callable[[str], Running]  # app kind -> running server
    kinds: frozenset[str]  # the app kinds this row can serve
    peer: bool = False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH", "")]
    )
    return env


def _start_logged(args: list[str], ready: str, timeout: float = 20.0) -> Running:
    """Start a server, read its stderr on a thread, and wait for its ``listening on`` line and
    for ``ready`` (a regex) in its log."""
    proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(lines)
        address = re.search(r"(?:listening on \w+://|Listening at: http://)([\d.]+):(\d+)", text)
        if address and re.search(ready, text):
            return Running(proc, address.group(1), int(address.group(2)), lines)
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{args} did not start:\n{''.join(lines)}")


def cluster_row(mode: str, workers: int = WORKERS) -> Row:
    def start(kind: str) -> Running:
        app = "http-hello" if kind == HTTP else "echo"
        bind = "udp://127.0.0.1:0" if kind == UDP_ECHO else "127.0.0.1:0"
        return _start_logged([sys.executable, "-m", "cluster", "run", app, "-k", mode,
                              "-w", str(workers), "--threads", str(THREADS), "-b", bind],
                             r"ready: \d+ workers")  # fmt: skip

    return Row(f"cluster {mode}", start, frozenset({HTTP, TCP_ECHO, UDP_ECHO}))


def stdlib_row(kind_name: str) -> Row:
    label = {"threading": "ThreadingTCPServer", "forking": "ForkingTCPServer", "udp": "UDPServer"}

    def start(kind: str) -> Running:
        app = "http-hello" if kind == HTTP else "echo"
        return _start_logged([sys.executable, str(ROOT / "scripts" / "stdlib_server.py"),
                              kind_name, app], "listening on")  # fmt: skip

    kinds = frozenset({UDP_ECHO}) if kind_name == "udp" else frozenset({HTTP, TCP_ECHO})
    return Row(f"stdlib {label[kind_name]}", start, kinds, peer=True)


def gunicorn_row(worker_class: str) -> Row | None:
    gunicorn = shutil.which("gunicorn") or str(Path(sys.executable).with_name("gunicorn"))
    if not os.path.exists(gunicorn):
        return None

    def start(kind: str) -> Running:
        args = [gunicorn, "-w", str(WORKERS), "-k", worker_class, "-b", "127.0.0.1:0",
                "--chdir", str(ROOT / "scripts"), "--log-level", "info"]  # fmt: skip
        if worker_class == "gthread":
            args += ["--threads", str(THREADS)]
        return _start_logged([*args, "wsgi_hello:app"], r"Booting worker[\s\S]*Booting worker")

    return Row(f"gunicorn {worker_class}", start, frozenset({HTTP}), peer=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_row() -> Row | None:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if nginx is None:
        return None

    def start(kind: str) -> Running:
        tmp = tempfile.mkdtemp(prefix="bench-nginx-")
        port = free_port()
        (Path(tmp) / "nginx.conf").write_text(
            f"worker_processes {WORKERS};\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
            "daemon off;\nevents { worker_connections 1024; }\nhttp { access_log off; server { "
            f'listen 127.0.0.1:{port}; location / {{ return 200 "Hello, world!\\n"; }} }} }}\n'
        )
        proc = subprocess.Popen([nginx, "-c", f"{tmp}/nginx.conf", "-p", tmp],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        return Running(proc, "127.0.0.1", port, cleanup=lambda: shutil.rmtree(tmp, True))

    return Row("nginx return 200", start, frozenset({HTTP}), peer=True)


# ------------------------------------------------------------------------------ clients
def wrk(url: str, connections: int, duration: float, close: bool) -> tuple[float, int]:
    args = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "2s",
        url,
    ]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if found is None:
        raise RuntimeError(f"wrk failed on {url}: {done.stderr.strip() or done.stdout.strip()}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", done.stdout))
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout):
        errors += int(match.group(1))
    return float(found.group(1)), errors


def loadtest(target: str, connections: int, duration: float, connect: str) -> tuple[float, int]:
    from cluster.loadtest import LoadConfig, run

    result = run(LoadConfig(target, duration=duration, concurrency=connections, connect=connect,
                            payload=64, max_errors=10**9))  # fmt: skip
    return result.throughput, result.error_count


def http(close: bool) -> Callable[[Running, float], tuple[float, int]]:
    connections = CLOSE_CONNECTIONS if close else CONNECTIONS

    def measure(srv: Running, duration: float) -> tuple[float, int]:
        url = f"http://{srv.host}:{srv.port}/"
        if shutil.which("wrk"):
            return wrk(url, connections, duration, close)
        return loadtest(url, connections, duration, "per-request" if close else "persistent")

    return measure


def echo(scheme: str, connect: str) -> Callable[[Running, float], tuple[float, int]]:
    def measure(srv: Running, duration: float) -> tuple[float, int]:
        return loadtest(f"{scheme}://{srv.host}:{srv.port}", CONNECTIONS, duration, connect)

    return measure


WORKLOADS: dict[str, tuple[str, Callable[[Running, float], tuple[float, int]]]] = {
    "http keep-alive": (HTTP, http(close=False)),
    "http conn-per-request": (HTTP, http(close=True)),
    "tcp echo persistent": (TCP_ECHO, echo("tcp", "persistent")),
    "tcp echo per-request": (TCP_ECHO, echo("tcp", "per-request")),
    "udp echo": (UDP_ECHO, echo("udp", "persistent")),
}


# ------------------------------------------------------------------------------ the run
@dataclass
class Cell:
    rps: list[float] = field(default_factory=list)
    errors: int = 0


def run(rows: list[Row], workloads: list[str], duration: float, repeats: int) -> dict:
    results: dict[tuple[str, str], Cell] = {}
    for round_no in range(repeats):
        for workload in workloads:
            kind, measure = WORKLOADS[workload]
            for row in rows:
                if kind not in row.kinds:
                    continue
                running = row.start(kind)
                try:
                    measure(running, min(1.0, duration / 2))  # warm-up, not counted
                    rps, errors = measure(running, duration)
                finally:
                    running.stop()
                cell = results.setdefault((row.name, workload), Cell())
                cell.rps.append(rps)
                cell.errors += errors
                print(f"round {round_no + 1}/{repeats} {workload:22} {row.name:26} {rps:10.0f} req/s"
                      f"  errors {errors}", flush=True)  # fmt: skip
    return results


def fairness(workers: int, duration: float) -> tuple[list[int], float]:
    """Per-worker request counts of the sync cluster under sustained HTTP connection-per-request
    load, read from the master's exit log (each worker's count as it exits)."""
    row = cluster_row("sync", workers)
    running = row.start(HTTP)
    try:
        http(close=True)(running, duration)
    finally:
        running.stop()
    counts = [
        int(n)
        for n in re.findall(r"exited with code 0 after (\d+) requests", "".join(running.lines))
    ]
    spread = max(counts) / max(1, min(counts)) if counts else float("nan")
    return sorted(counts), spread


def median(cell: Cell) -> float:
    return statistics.median(cell.rps)


def table(rows: list[Row], workloads: list[str], results: dict) -> str:
    lines = ["| server | " + " | ".join(workloads) + " |", "|" + " --- |" * (len(workloads) + 1)]
    for row in rows:
        cells = []
        for w in workloads:
            cell = results.get((row.name, w))
            cells.append("" if cell is None else
                         f"{median(cell):,.0f} ({min(cell.rps):,.0f}..{max(cell.rps):,.0f})"
                         + (f", {cell.errors} errors" if cell.errors else ""))  # fmt: skip
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    peers = [row.name for row in rows if row.peer]
    lines += ["", "Ratios, median over median, of each cluster row to each peer in the same workload:",
              "", "| cluster row | workload | " + " | ".join(f"vs {p}" for p in peers) + " |",
              "|" + " --- |" * (len(peers) + 2)]  # fmt: skip
    for row in rows:
        if row.peer:
            continue
        for w in workloads:
            mine = results.get((row.name, w))
            if mine is None:
                continue
            ratios = []
            for p in peers:
                theirs = results.get((p, w))
                ratios.append(f"{median(mine) / median(theirs):.2f}x" if theirs else "")
            lines.append(f"| {row.name} | {w} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--rows", help="comma-separated subset of row names (default: all)")
    parser.add_argument("--no-fairness", action="store_true", help="skip the fairness runs")
    parser.add_argument("--write", metavar="FILE", help="write the results as Markdown")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    rows = [cluster_row("sync"), cluster_row("thread"), cluster_row("fork"),
            stdlib_row("threading"), stdlib_row("forking"), stdlib_row("udp")]  # fmt: skip
    rows += [row for row in (gunicorn_row("sync"), gunicorn_row("gthread"), nginx_row()) if row]
    if args.rows:
        wanted = args.rows.split(",")
        rows = [row for row in rows if row.name in wanted]
    started = time.monotonic()
    results = run(rows, workloads, args.duration, args.repeats)
    text = table(rows, workloads, results)
    fair = ""
    if not args.no_fairness:
        fair_lines = ["", "Accept fairness, sync mode, HTTP connection-per-request for "
                      f"{3 * args.duration:g} s (requests per worker, busiest / least busy):", ""]  # fmt: skip
        for workers in (2, 4):
            counts, spread = fairness(workers, 3 * args.duration)
            fair_lines.append(f"- {workers} workers: {counts} -> {spread:.2f}x")
        fair = "\n".join(fair_lines)
    print("\n" + text + "\n" + fair)
    print(f"\n(took {time.monotonic() - started:.0f} s)")
    if args.write:
        command = "python scripts/bench.py " + " ".join(sys.argv[1:])
        client = "wrk, 1 thread" if shutil.which("wrk") else "our loadtest"
        Path(args.write).write_text(
            "# Benchmarks\n\n"
            f"Made by `{command}` (`make bench`) on {time.strftime('%Y-%m-%d')}.\n\n"
            f"Machine: {machine()}. HTTP client: {client}; echo clients: our loadtest (1 process); "
            "both share the cores with the servers.\n"
            f"Servers: {WORKERS} workers (cluster, gunicorn, nginx); thread mode and gthread "
            f"{THREADS} threads per worker. Keep-alive and echo with {CONNECTIONS} connections, "
            f"HTTP connection-per-request with {CLOSE_CONNECTIONS}. Each cell: median (min..max) "
            f"of {args.repeats} interleaved rounds of {args.duration:g} s, in requests per second.\n\n"
            f"{text}\n{fair}\n" + NOTES
        )
    return 0


NOTES_FILE = ROOT / "docs" / "benchmarks-notes.md"
NOTES = "\n" + NOTES_FILE.read_text() if NOTES_FILE.exists() else ""


if __name__ == "__main__":
    sys.exit(main())

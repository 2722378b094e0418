"""Side-by-side benchmark: the cluster's modes against their peers, same handler, same run.

    python scripts/bench.py [--duration 3] [--repeats 3] [--write docs/benchmarks.md]

Rows run interleaved (every row once per round, rounds repeated) so that drift of the machine
hits every row alike; each cell is the median of the rounds with min..max. The client (wrk)
shares the machine's cores with the server, as the targets in the issues assume.

Rows: the cluster in sync, thread and fork modes; the standard library's ThreadingTCPServer and
ForkingTCPServer serving the very same handler class; nginx ``return 200`` with 2 workers
when nginx is installed (the near-physical limit on this machine).
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
KEEPALIVE_CONNECTIONS = 8
CLOSE_CONNECTIONS = 16
THREADS = 8  # thread mode: threads per worker, >= keep-alive connections per worker


@dataclass
class Running:
    """A server under test: its process and the address it listens on."""

    proc: subprocess.Popen
    host: str
    port: int
    cleanup: Callable[[], None] = lambda: None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.cleanup()


@dataclass
class Row:
    name: str
    start: Callable[[], Running]
    peer: bool = False


@dataclass
class Result:
    rps: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start_logged(args: list[str], timeout: float = 20.0) -> Running:
    """Start a process that logs ``listening on tcp://HOST:PORT``; wait for that line (and for
    ``ready:`` when it is the cluster)."""
    proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    host = port = None
    is_cluster = "cluster" in args
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"{args} exited before it was ready")
        if match := re.search(r"listening on \w+://([\d.]+):(\d+)", line):
            host, port = match.group(1), int(match.group(2))
            if not is_cluster:
                break
        if "ready:" in line:
            break
    else:
        proc.kill()
        raise RuntimeError(f"{args} was not ready within {timeout}s")
    # Keep draining stderr so that a chatty server never blocks on a full pipe.
    subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)
    assert host is not None and port is not None
    return Running(proc, host, port)


def cluster_row(mode: str, app: str = "http-hello") -> Row:
    def start() -> Running:
        return _start_logged([sys.executable, "-m", "cluster", "run", app, "-k", mode,
                              "-w", str(WORKERS), "--threads", str(THREADS),
                              "-b", "127.0.0.1:0", "--log-level", "info"])  # fmt: skip

    return Row(f"cluster {mode}", start)


def stdlib_row(kind: str, app: str = "http-hello") -> Row:
    label = {"threading": "ThreadingTCPServer", "forking": "ForkingTCPServer"}[kind]

    def start() -> Running:
        return _start_logged(
            [sys.executable, str(ROOT / "scripts" / "stdlib_server.py"), kind, app]
        )

    return Row(f"stdlib {label}", start, peer=True)


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

    def start() -> Running:
        tmp = tempfile.mkdtemp(prefix="bench-nginx-")
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            f"worker_processes {WORKERS};\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
            "daemon off;\nevents {{ worker_connections 1024; }}\n"
            "http {{ access_log off; server {{ listen 127.0.0.1:%d; "
            'location / {{ return 200 "Hello, world!\\n"; }} }} }}\n'.replace("{{", "{").replace(
                "}}", "}"
            )
            % port
        )
        proc = subprocess.Popen([nginx, "-c", str(conf), "-p", tmp], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        return Running(proc, "127.0.0.1", port, cleanup=lambda: shutil.rmtree(tmp, True))

    return Row("nginx return 200", start, peer=True)


# ------------------------------------------------------------------------------ workloads
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
    out = done.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk failed on {url}: {done.stderr.strip() or out.strip()}")
    rps = float(found.group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    return rps, errors


WORKLOADS = {
    "http keep-alive": lambda srv, d: wrk(
        f"http://{srv.host}:{srv.port}/", KEEPALIVE_CONNECTIONS, d, False
    ),
    "http conn-per-request": lambda srv, d: wrk(
        f"http://{srv.host}:{srv.port}/", CLOSE_CONNECTIONS, d, True
    ),
}


def run(rows: list[Row], workloads: list[str], duration: float, repeats: int) -> dict:
    results: dict[tuple[str, str], Result] = {}
    for round_no in range(repeats):
        for workload in workloads:
            for row in rows:
                running = row.start()
                try:
                    WORKLOADS[workload](running, min(1.0, duration))  # warm-up, not counted
                    rps, errors = WORKLOADS[workload](running, duration)
                finally:
                    running.stop()
                cell = results.setdefault((row.name, workload), Result())
                cell.rps.append(rps)
                cell.errors.append(errors)
                print(f"round {round_no + 1}/{repeats} {workload:24} {row.name:28} {rps:10.0f} req/s"
                      f"  errors {errors}", flush=True)  # fmt: skip
    return results


def fmt_cell(result: Result) -> str:
    med = statistics.median(result.rps)
    return f"{med:,.0f} ({min(result.rps):,.0f}..{max(result.rps):,.0f})"


def table(rows: list[Row], workloads: list[str], results: dict) -> str:
    peers = [row.name for row in rows if row.peer]
    head = ["server", *(f"{w} req/s" for w in workloads), "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [fmt_cell(results[(row.name, w)]) for w in workloads]
        errors = sum(sum(results[(row.name, w)].errors) for w in workloads)
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {errors} |")
    lines += ["", "Ratios (median over median) of each cluster row against each peer:", ""]
    head = ["cluster row", "workload", *(f"vs {p}" for p in peers)]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        if row.peer:
            continue
        for w in workloads:
            mine = statistics.median(results[(row.name, w)].rps)
            ratios = [f"{mine / statistics.median(results[(p, w)].rps):.2f}x" for p in peers]
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
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--rows", help="comma-separated subset of row names (default: all)")
    parser.add_argument("--write", metavar="FILE", help="write the results as Markdown")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print(
            "bench: wrk is not installed (apt-get install wrk; `make bench` does it)",
            file=sys.stderr,
        )
        return 2
    workloads = args.workloads.split(",")
    rows = [cluster_row("sync"), cluster_row("thread"), cluster_row("fork"),
            stdlib_row("threading"), stdlib_row("forking")]  # fmt: skip
    if (row := nginx_row()) is not None:
        rows.append(row)
    if args.rows:
        wanted = args.rows.split(",")
        rows = [row for row in rows if row.name in wanted]
    results = run(rows, workloads, args.duration, args.repeats)
    text = table(rows, workloads, results)
    print("\n" + text)
    if args.write:
        command = "python scripts/bench.py " + " ".join(sys.argv[1:])
        Path(args.write).write_text(
            "# Benchmarks\n\n"
            f"Made by `{command}` (or `make bench`) on {time.strftime('%Y-%m-%d')}.\n\n"
            f"Machine: {machine()}. Client: wrk, 1 thread, sharing the cores with the server.\n"
            f"Servers: {WORKERS} workers (cluster, nginx); thread mode {THREADS} threads per worker; "
            f"keep-alive with {KEEPALIVE_CONNECTIONS} connections, connection-per-request with "
            f"{CLOSE_CONNECTIONS}. Each cell: median (min..max) of {args.repeats} interleaved rounds "
            f"of {args.duration:g} s.\n\n"
            f"{text}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side benchmark: the cluster's modes against their peers, same handler, same run.

    python scripts/bench.py [--duration 2] [--repeats 3] [--client-threads N] [--write docs/benchmarks.md]

Rows run interleaved (every row once per round, rounds repeated) so that drift of the machine
hits every row alike; each cell is the median of the rounds with min..max. The clients share
the machine's cores with the servers, as the targets in the issues assume, and use all of them
by default (wrk threads and loadtest processes: ``--client-threads``, default the core count).

Rows: the cluster in sync, thread and fork modes; the standard library's ThreadingTCPServer,
ForkingTCPServer and UDPServer serving the very same handler classes; gunicorn sync and gthread
with the WSGI twin of the handler, when gunicorn is installed; nginx ``return 200`` with 2
workers, when nginx is installed (the near-physical limit on this machine).

Two reference rows with no framework at all (``scripts/bare_server.py``): two forked processes
that call the same handler class straight after ``accept()``, or fork a child per connection
for it. What they reach is the ceiling for any Python server running that handler here.

Workloads: HTTP hello with keep-alive and with a connection per request (wrk, or our own
loadtest when wrk is missing); raw TCP echo of 64 bytes, persistent and per request; UDP echo
(our loadtest). Then accept fairness: per-worker request counts of the sync cluster with 2 and
4 workers under sustained connection-per-request load, from the master's exit log.

Every measurement also records the CPU time the server's whole process tree and the client
spent per request (from /proc and getrusage), and the server's page faults per request. From
those, each speed target gets its budget: at the target's rate, how many microseconds of CPU
per request the server may spend on this machine once the client has taken its share.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import re
import resource
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

from cluster.procfs import Usage, alive, descendants, tree_usage

ROOT = Path(__file__).resolve().parent.parent

WORKERS = 2
CONNECTIONS = 8  # keep-alive and echo; thread mode has THREADS >= this per worker
CLOSE_CONNECTIONS = 16
THREADS = 8
CLIENT_THREADS = os.cpu_count() or 1  # wrk threads, loadtest processes (--client-threads)
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
        tree = descendants(self.proc.pid)  # workers, request children, siblings
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in tree:  # whatever the server failed to end does not outlive the run
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.cleanup()


@dataclass
class Row:
    name: str
    start: Callable[[str], Running]  # app kind -> running server
    kinds: frozenset[str]  # the app kinds this row can serve
    peer: bool = False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the project itself comes from the install (no ROOT here); scripts/ stays, as before
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), env.get("PYTHONPATH", "")])
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


ACCESS_LOG = os.path.join(tempfile.gettempdir(), f"bench-access-{os.getpid()}.log")
atexit.register(lambda: os.path.exists(ACCESS_LOG) and os.unlink(ACCESS_LOG))


def cluster_row(mode: str, workers: int = WORKERS, access_log: bool = False) -> Row:
    """The cluster in ``mode``; with ``access_log``, writing a line per request to a file
    (what the access log costs: the target is under 10% of the row without it)."""

    def start(kind: str) -> Running:
        app = "http-hello" if kind == HTTP else "echo"
        bind = "udp://127.0.0.1:0" if kind == UDP_ECHO else "127.0.0.1:0"
        extra = ["--access-log", ACCESS_LOG] if access_log else []
        return _start_logged([sys.executable, "-m", "cluster", "run", app, "-k", mode,
                              "-w", str(workers), "--threads", str(THREADS), "-b", bind, *extra],
                             r"ready: \d+ workers?")  # fmt: skip

    name = f"cluster {mode}" + (" + access log" if access_log else "")
    return Row(name, start, frozenset({HTTP, TCP_ECHO, UDP_ECHO}))


def stdlib_row(kind_name: str) -> Row:
    label = {"threading": "ThreadingTCPServer", "forking": "ForkingTCPServer", "udp": "UDPServer"}

    def start(kind: str) -> Running:
        app = "http-hello" if kind == HTTP else "echo"
        return _start_logged([sys.executable, str(ROOT / "scripts" / "stdlib_server.py"),
                              kind_name, app], "listening on")  # fmt: skip

    kinds = frozenset({UDP_ECHO}) if kind_name == "udp" else frozenset({HTTP, TCP_ECHO})
    return Row(f"stdlib {label[kind_name]}", start, kinds, peer=True)


def bare_row(mode: str) -> Row:
    """A reference with no framework: see scripts/bare_server.py."""

    def start(kind: str) -> Running:
        transport = "udp" if kind == UDP_ECHO else "tcp"
        app = "http-hello" if kind == HTTP else "echo"
        return _start_logged([sys.executable, str(ROOT / "scripts" / "bare_server.py"), mode,
                              transport, app], "listening on")  # fmt: skip

    kinds = {HTTP, TCP_ECHO, UDP_ECHO} if mode == "prefork" else {HTTP, TCP_ECHO}
    return Row(BARE_PREFORK if mode == "prefork" else BARE_FORK, start, frozenset(kinds), peer=True)


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
@dataclass
class Measured:
    rps: float
    errors: int
    requests: int


def wrk(url: str, connections: int, duration: float, close: bool) -> Measured:
    args = [
        "wrk",
        f"-t{CLIENT_THREADS}",
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
    requests = re.search(r"(\d+) requests in", done.stdout)
    return Measured(float(found.group(1)), errors, int(requests.group(1)) if requests else 0)


def loadtest(target: str, connections: int, duration: float, connect: str) -> Measured:
    from loadtest import LoadConfig, run

    result = run(LoadConfig(target, duration=duration, concurrency=connections, connect=connect,
                            payload=64, max_errors=10**9, processes=CLIENT_THREADS))  # fmt: skip
    return Measured(result.throughput, result.error_count, result.requests)


Measure = Callable[["Running", float], Measured]


def http(close: bool) -> Measure:
    connections = CLOSE_CONNECTIONS if close else CONNECTIONS

    def measure(srv: Running, duration: float) -> Measured:
        url = f"http://{srv.host}:{srv.port}/"
        if shutil.which("wrk"):
            return wrk(url, connections, duration, close)
        return loadtest(url, connections, duration, "per-request" if close else "persistent")

    return measure


def echo(scheme: str, connect: str) -> Measure:
    def measure(srv: Running, duration: float) -> Measured:
        return loadtest(f"{scheme}://{srv.host}:{srv.port}", CONNECTIONS, duration, connect)

    return measure


WORKLOADS: dict[str, tuple[str, Measure]] = {
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
    server_us: list[float] = field(default_factory=list)  # server CPU per request
    client_us: list[float] = field(default_factory=list)  # client CPU per request
    faults: list[float] = field(default_factory=list)  # server page faults per request

    def add(self, done: Measured, server: Usage, client_cpu: float) -> str:
        """Record one measurement; a line saying what it was."""
        self.rps.append(done.rps)
        self.errors += done.errors
        line = f"{done.rps:10.0f} req/s  errors {done.errors}"
        if done.requests:
            self.server_us.append(server.cpu / done.requests * 1e6)
            self.client_us.append(client_cpu / done.requests * 1e6)
            self.faults.append(server.faults / done.requests)
            line += f"  cpu/request: server {self.server_us[-1]:.1f} us, client {self.client_us[-1]:.1f} us"
        return line


def client_cpu() -> float:
    """CPU seconds of this process and the clients it ran and collected (wrk, loadtest's
    processes). The server is our child too, but it is collected only after the window."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    clients = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + clients.ru_utime + clients.ru_stime


def measure_costs(
    measure: Measure, running: Running, duration: float
) -> tuple[Measured, Usage, float]:
    """One measurement, with what the server's process tree and the client spent on it."""
    server_before, client_before = tree_usage(running.proc.pid), client_cpu()
    done = measure(running, duration)
    server = tree_usage(running.proc.pid) - server_before
    return done, server, client_cpu() - client_before


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
                    done, server, client = measure_costs(measure, running, duration)
                finally:
                    running.stop()
                said = results.setdefault((row.name, workload), Cell()).add(done, server, client)
                print(
                    f"round {round_no + 1}/{repeats} {workload:22} {row.name:26} {said}", flush=True
                )
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


@dataclass(frozen=True)
class Target:
    """A speed target of the issues: ``row`` at ``ratio`` times ``peer`` in ``workload``.
    ``reference`` is the no-framework loop of the same kind: the least such a server costs."""

    row: str
    workload: str
    peer: str
    ratio: float
    reference: str


BARE_PREFORK, BARE_FORK = "bare prefork loop", "bare fork-per-request loop"
TARGETS = [
    Target("cluster sync", "http conn-per-request", "gunicorn sync", 2.5, BARE_PREFORK),
    Target("cluster sync", "http conn-per-request", "nginx return 200", 0.9, BARE_PREFORK),
    Target("cluster sync", "http conn-per-request", "stdlib ThreadingTCPServer", 5.0, BARE_PREFORK),
    Target("cluster thread", "http keep-alive", "stdlib ThreadingTCPServer", 1.2, BARE_PREFORK),
    Target("cluster fork", "http conn-per-request", "stdlib ForkingTCPServer", 1.5, BARE_FORK),
    Target("cluster sync", "udp echo", "stdlib UDPServer", 2.0, BARE_PREFORK),
]


def server_budget(rate: float, client_us: float, cores: int) -> float:
    """Microseconds of server CPU per request that ``cores`` leave at ``rate`` requests per
    second once the client has spent ``client_us`` on each; negative when the client alone
    needs more than the machine has."""
    return cores * 1e6 / rate - client_us


def verdict(reached: float, target: Target, budget: float, ours: float, floor: float) -> str:
    """Why a target is met or not, from the measured costs alone. ``floor`` is what the
    reference loop spends per request."""
    if reached >= target.ratio:
        return "met"
    if budget <= 0:
        return "out of reach here: the client alone needs more CPU than the machine has"
    if floor > budget:
        return f"out of reach here: even the {target.reference} spends {floor:.0f} us"
    if ours <= budget:
        return (f"missed by {1 - reached / target.ratio:.0%}, within the CPU budget: the cores "
                "were not all busy")  # fmt: skip
    return f"missed: ours spends {ours - budget:.0f} us per request over the budget"


def cost_us(cell: Cell | None, costs: str) -> float | None:
    values = getattr(cell, costs) if cell else None
    return statistics.median(values) if values else None


def budgets(rows: list[Row], results: dict, cores: int) -> str:
    """The targets table: what each target needs, and whether this machine can give it."""
    lines = ["| target | needs | reached | server CPU budget per request | ours | no-framework "
             "loop | verdict |", "|" + " --- |" * 7]  # fmt: skip
    for target in TARGETS:
        mine = results.get((target.row, target.workload))
        theirs = results.get((target.peer, target.workload))
        clients = [cost_us(results.get((row.name, target.workload)), "client_us") for row in rows]
        clients = [cost for cost in clients if cost is not None]
        ours = cost_us(mine, "server_us")
        floor = cost_us(results.get((target.reference, target.workload)), "server_us")
        if not mine or not theirs or not clients or ours is None or floor is None:
            continue
        rate = target.ratio * median(theirs)
        budget = server_budget(rate, min(clients), cores)
        reached = median(mine) / median(theirs)
        lines.append(
            f"| {target.row}, {target.workload}: {target.ratio:g}x {target.peer} | {rate:,.0f} req/s "
            f"| {reached:.2f}x | {budget:.1f} us | {ours:.1f} us | {floor:.1f} us "
            f"| {verdict(reached, target, budget, ours, floor)} |"
        )
    return "\n".join(lines)


def grid(rows: list[Row], workloads: list[str], results: dict,
         render: Callable[[Cell], str]) -> list[str]:  # fmt: skip
    """A Markdown table with a row per server and a column per workload."""
    lines = ["| server | " + " | ".join(workloads) + " |", "|" + " --- |" * (len(workloads) + 1)]
    for row in rows:
        cells = [results.get((row.name, w)) for w in workloads]
        lines.append(
            f"| {row.name} | " + " | ".join("" if c is None else render(c) for c in cells) + " |"
        )
    return lines


def costs_table(rows: list[Row], workloads: list[str], results: dict) -> str:
    """CPU per request of server and client, and the server's page faults per request."""

    def render(cell: Cell) -> str:
        server, client = cost_us(cell, "server_us"), cost_us(cell, "client_us")
        faults = cost_us(cell, "faults")
        if server is None or client is None or faults is None:
            return ""
        return f"{server:.1f} + {client:.1f} ({faults:.0f} faults)"

    return "\n".join(grid(rows, workloads, results, render))


def table(rows: list[Row], workloads: list[str], results: dict) -> str:
    def render(cell: Cell) -> str:
        errors = f", {cell.errors} errors" if cell.errors else ""
        return f"{median(cell):,.0f} ({min(cell.rps):,.0f}..{max(cell.rps):,.0f}){errors}"

    lines = grid(rows, workloads, results, render)
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
    global CLIENT_THREADS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--rows", help="comma-separated subset of row names (default: all)")
    parser.add_argument("--client-threads", type=int, default=CLIENT_THREADS,
                        help="wrk threads and loadtest processes")  # fmt: skip
    parser.add_argument("--no-fairness", action="store_true", help="skip the fairness runs")
    parser.add_argument("--write", metavar="FILE", help="write the results as Markdown")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    CLIENT_THREADS = args.client_threads
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    rows = [cluster_row("sync"), cluster_row("sync", access_log=True), cluster_row("thread"),
            cluster_row("fork"),
            stdlib_row("threading"), stdlib_row("forking"), stdlib_row("udp"),
            bare_row("prefork"), bare_row("fork")]  # fmt: skip
    rows += [row for row in (gunicorn_row("sync"), gunicorn_row("gthread"), nginx_row()) if row]
    if args.rows:
        wanted = args.rows.split(",")
        rows = [row for row in rows if row.name in wanted]
    started = time.monotonic()
    results = run(rows, workloads, args.duration, args.repeats)
    cores = os.cpu_count() or 1
    text = (table(rows, workloads, results)
            + "\n\nCPU per request in microseconds, server + client (the server's whole process "
            "tree: master, workers, request children), and the server's minor page faults per "
            "request, medians of the rounds:\n\n" + costs_table(rows, workloads, results)
            + f"\n\nThe speed targets against what {cores} cores allow. Budget: the server CPU per "
            "request that the cores leave at the target's rate, once the client has spent what "
            "it spends per request (its cheapest measured cost in that workload):\n\n"
            + budgets(rows, results, cores))  # fmt: skip
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
        client = f"wrk with {CLIENT_THREADS} threads" if shutil.which("wrk") else "our loadtest"
        Path(args.write).write_text(
            "# Benchmarks\n\n"
            f"Made by `{command}` (`make bench`) on {time.strftime('%Y-%m-%d')}.\n\n"
            f"Machine: {machine()}. HTTP client: {client}; echo clients: our loadtest with "
            f"{CLIENT_THREADS} processes; both share the cores with the servers. Two rows are "
            "references, not servers: `scripts/bare_server.py`, the same handler called by two "
            "forked processes with no framework around it.\n"
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

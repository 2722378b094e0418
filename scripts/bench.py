"""Side-by-side benchmark: the cluster's modes against their peers, same handler, same run.

    python scripts/bench.py [--duration 2] [--repeats 3] [--client-threads N] [--write docs/benchmarks.md]
                            [--only throughput,fairness,scale,profiles] [--no-scale] [--no-profiles]

Rows run interleaved (every row once per round, in an order reversed every other round, rounds
repeated) so that drift of the machine hits every row alike; each cell is the median of the
rounds with min..max, and each ratio the median of the rounds' own ratios. The clients share
the machine's cores with the servers, as the targets in the issues assume, and use all of them
by default (wrk threads and loadtest processes: ``--client-threads``, default the core count).

Rows: the cluster in sync, thread and fork modes; the standard library's ThreadingTCPServer,
ForkingTCPServer and UDPServer serving the very same handler classes; gunicorn sync and gthread
with the WSGI twin of the handler, when gunicorn is installed; nginx ``return 200`` with 2
workers, when nginx is installed (the near-physical limit on this machine).

Reference rows with no framework at all (``scripts/bare_server.py``): two forked processes
that call the same handler class straight after ``accept()``, or fork a child per connection
for it. What they reach is the ceiling for any Python server running that handler here. A
third forks per connection with our fork-mode worker's modules imported (``--carry``, HTTP
only): the ceiling for a forking process of that size.

Workloads: HTTP hello with keep-alive and with a connection per request (wrk, or our own
loadtest when wrk is missing); raw TCP echo of 64 bytes, persistent and per request; UDP echo
(our loadtest). Then accept fairness: per-worker request counts of the sync cluster with 2 and
4 workers under sustained connection-per-request load, from the master's exit log.

Every measurement also records the CPU time the server's whole process tree and the client
spent per request (from /proc and getrusage), and the server's page faults per request. From
those, each speed target gets its budget: at the target's rate, how many microseconds of CPU
per request the server may spend on this machine once the client has taken its share.

Scale: how the costs grow with the pool and with the listeners. For 1, 8, 64 and 128 sync
workers: start to ready, each worker's USS and the pool's total PSS (smaps_rollup), the idle
master's CPU, and a HUP that replaces every worker while connection-per-request load runs (its
errors must be zero). For 1, 8 and 32 listeners of one 2-worker cluster, all loaded at once:
the rate on one of them and how evenly the workers' accepts fall on them.

Profiles: py-spy on one worker of each mode under connection-per-request load, the top frames
here and in ``docs/profiles/MODE.txt``.

Each section sits between markers in the file ``--write`` makes; a run of some sections
(``--only scale``) rewrites those and keeps the others as they were.
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster import procfs
from cluster.procfs import Usage, alive, descendants, tree_usage

ROOT = Path(__file__).resolve().parent.parent

WORKERS = 2
CONNECTIONS = 8  # echo
KEEP_ALIVE_CONNECTIONS = 32  # HTTP keep-alive (issue 14's figure); WORKERS * THREADS of them
CLOSE_CONNECTIONS = 16
THREADS = 16  # per worker, thread mode's default: a kept-alive connection holds a thread
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
    seen_at: list[float] = field(default_factory=list)  # when each line came (monotonic)
    started_at: float = 0.0  # just before the process was started (monotonic)
    control: str | None = None  # its control socket, if it has one

    def line_time(self, pattern: str, after: int = 0) -> float | None:
        """When the first line from index ``after`` on that matches ``pattern`` came."""
        for line, at in zip(self.lines[after:], self.seen_at[after:], strict=False):
            if re.search(pattern, line):
                return at
        return None

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
    started_at = time.monotonic()
    proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines: list[str] = []
    seen_at: list[float] = []
    assert proc.stderr is not None

    def read(stream=proc.stderr) -> None:
        for line in stream:
            seen_at.append(time.monotonic())  # the time first: a reader of lines finds it
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(lines)
        address = re.search(r"(?:listening on \w+://|Listening at: http://)([\d.]+):(\d+)", text)
        if address and re.search(ready, text):
            return Running(proc, address.group(1), int(address.group(2)), lines,
                           seen_at=seen_at, started_at=started_at)  # fmt: skip
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


# What a fork-mode worker has imported (the master's modules and the worker runtime,
# inherited): the bare fork loop carrying them pays for their size in every fork.
CARRIED_BY_OUR_FORK_WORKER = (
    "cluster.cli,cluster.master,workers.runtime.entry,workers.runtime.modes,setproctitle"
)


def bare_row(mode: str, carrying: bool = False) -> Row:
    """A reference with no framework: see scripts/bare_server.py. ``carrying``: the fork loop
    with our fork-mode worker's imports loaded (and unused), HTTP only: what fork mode would cost
    if our own code around the fork cost nothing."""

    def start(kind: str) -> Running:
        transport = "udp" if kind == UDP_ECHO else "tcp"
        app = "http-hello" if kind == HTTP else "echo"
        carry = ["--carry", CARRIED_BY_OUR_FORK_WORKER] if carrying else []
        return _start_logged([sys.executable, str(ROOT / "scripts" / "bare_server.py"), mode,
                              transport, app, *carry], "listening on")  # fmt: skip

    if carrying:
        return Row(BARE_FORK_CARRYING, start, frozenset({HTTP}), peer=True)
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


def wrk(url: str, connections: int, duration: float, close: bool,
        threads: int | None = None) -> Measured:  # fmt: skip
    args = [
        "wrk",
        f"-t{min(connections, threads or CLIENT_THREADS)}",
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


def loadtest(target: str, connections: int, duration: float, connect: str,
             processes: int | None = None) -> Measured:  # fmt: skip
    from loadtest import LoadConfig, run

    result = run(LoadConfig(target, duration=duration, concurrency=connections, connect=connect,
                            payload=64, max_errors=10**9,
                            processes=processes or CLIENT_THREADS))  # fmt: skip
    return Measured(result.throughput, result.error_count, result.requests)


Measure = Callable[["Running", float], Measured]


def http(close: bool) -> Measure:
    connections = CLOSE_CONNECTIONS if close else KEEP_ALIVE_CONNECTIONS

    def measure(srv: Running, duration: float) -> Measured:
        url = f"http://{srv.host}:{srv.port}/"
        if shutil.which("wrk"):
            return wrk(url, connections, duration, close)
        return loadtest(url, connections, duration, "per-request" if close else "persistent")

    return measure


def http_load(url: str, connections: int, duration: float, threads: int | None = None) -> Measured:
    """HTTP connection-per-request load on one URL: wrk, else our loadtest."""
    if shutil.which("wrk"):
        return wrk(url, connections, duration, close=True, threads=threads)
    return loadtest(url, connections, duration, "per-request", processes=threads)


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
            for row in round_order(rows, round_no):
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


def round_order(rows: list[Row], round_no: int) -> list[Row]:
    """The rows in the order round ``round_no`` runs them: reversed every other round, so
    that a machine getting faster or slower through a round does not favour the rows that
    come first in every round."""
    return list(rows) if round_no % 2 == 0 else list(reversed(rows))


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


# ------------------------------------------------------------------------------ scale
SCALE_WORKERS = (1, 8, 64, 128)
SCALE_LISTENERS = (1, 8, 32)
MiB = 1024 * 1024
WARM_UP = 1.0  # seconds of load before the memory is read: workers that have served


def start_scaled(workers: int, listeners: int = 1) -> Running:
    """The sync cluster serving http-hello with ``workers`` workers on ``listeners`` TCP
    listeners (each on its own port), with a control socket to read its status from."""
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    control = os.path.join(tmp, "ctl")
    binds = [arg for _ in range(listeners) for arg in ("-b", "127.0.0.1:0")]
    try:
        running = _start_logged([sys.executable, "-m", "cluster", "run", "http-hello", "-k", "sync",
                                 "-w", str(workers), *binds, "--control", control],
                                r"ready: \d+ workers?", timeout=60)  # fmt: skip
    except RuntimeError as err:  # say why in one line: the master's last words
        shutil.rmtree(tmp, True)
        said = str(err).split("did not start:", 1)[-1].strip().splitlines()
        raise RuntimeError(f"{workers} workers on {listeners} listeners did not start: "
                           f"{said[-1] if said else 'it said nothing'}") from None  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, True)
        raise
    running.control, running.cleanup = control, lambda: shutil.rmtree(tmp, True)
    return running


def status(running: Running) -> dict:
    from cluster.ctl import ask

    assert running.control is not None
    return ask(running.control, {"cmd": "status"})


def accepted(running: Running) -> dict[str, int]:
    """Connections accepted so far on each listener, by URI (the scoreboard's counts)."""
    return {entry["uri"]: entry["accepted"] for entry in status(running)["listener_stats"]}


def url_of(uri: str) -> str:
    return "http://" + uri.removeprefix("tcp://") + "/"


class Background(threading.Thread):
    """A load run on a thread (wrk and the loadtest are processes: the thread only waits)."""

    def __init__(self, run: Callable[[], Measured]) -> None:
        super().__init__(daemon=True)
        self.run_load, self.result, self.error = run, Measured(0.0, 0, 0), None

    def run(self) -> None:
        try:
            self.result = self.run_load()
        except Exception as err:  # reported by whoever joins
            self.error = err

    def measured(self) -> Measured:
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def time_to_ready(running: Running) -> tuple[float, float]:
    """From just before the master was started to its ``ready:`` line, and the part of it
    from its ``starting N workers`` line on (forking and booting the pool; the rest is the
    interpreter's start, the imports, the config and the binding)."""
    ready = running.line_time(r"ready: \d+ workers?")
    starting = running.line_time(r"starting \d+ workers?")
    assert ready is not None and starting is not None  # _start_logged waited for ready
    return ready - running.started_at, ready - starting


def pool_memory(running: Running) -> tuple[int, int]:
    """The median USS of the workers, and the PSS of master and workers together (bytes)."""
    pids = [worker["pid"] for worker in status(running)["workers"]]
    found = [procfs.memory(pid) for pid in pids]
    workers = [m for m in found if m is not None]
    master = procfs.memory(running.proc.pid) or procfs.Memory()
    total = master.pss + sum(m.pss for m in workers)
    return int(statistics.median(m.uss for m in workers)) if workers else 0, total


def idle_cpu(running: Running, seconds: float) -> float:
    """The master's CPU use while nothing happens, in percent of one core."""
    before, started = procfs.run_time(running.proc.pid), time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    return 100 * (procfs.run_time(running.proc.pid) - before) / (time.monotonic() - started)


def wait_until(condition: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def hup_under_load(running: Running, load_seconds: float) -> tuple[float | None, Measured]:
    """HUP while connection-per-request load runs: the seconds from the signal to ``reload
    complete`` (every old worker gone; None if it did not come while the load ran), and the
    load's own count of errors and requests over the whole run."""
    uri = status(running)["listeners"][0]
    load = Background(lambda: http_load(url_of(uri), CLOSE_CONNECTIONS, load_seconds))
    load_ends = time.monotonic() + load_seconds
    load.start()
    wait_until(lambda: accepted(running)[uri] > 0, timeout=load_seconds / 2)  # the load is on
    after = len(running.lines)
    signalled = time.monotonic()
    running.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: running.line_time("reload complete", after),
               timeout=load_ends - time.monotonic())  # fmt: skip
    done = running.line_time("reload complete", after)
    measured = load.measured()
    if done is None or done > load_ends:
        return None, measured
    return done - signalled, measured


@dataclass
class WorkersScale:
    """One row of the workers table."""

    workers: int
    ready_s: float
    boot_s: float  # of ready_s: from "starting N workers" to "ready"
    uss: int  # median over the workers, bytes
    pss: int  # master and workers, bytes
    idle_cpu: float  # percent of one core
    hup_s: float | None
    hup: Measured  # the load through the reload


def scale_workers(workers: int, idle_seconds: float, load_seconds: float,
                  warm_up: float = WARM_UP) -> WorkersScale:  # fmt: skip
    """Start to ready, memory after a short load, idle CPU, and a reload under load."""
    running = start_scaled(workers)
    try:
        ready_s, boot_s = time_to_ready(running)
        if warm_up:
            http_load(url_of(status(running)["listeners"][0]), CLOSE_CONNECTIONS, warm_up)
        cpu = idle_cpu(running, idle_seconds)
        uss, pss = pool_memory(running)
        hup_s, hup = hup_under_load(running, load_seconds)
    finally:
        running.stop()
    return WorkersScale(workers, ready_s, boot_s, uss, pss, cpu, hup_s, hup)


@dataclass
class ListenersScale:
    """One row of the listeners table."""

    listeners: int
    rps: list[float]  # each listener's request rate, as its client measured it
    counts: list[int]  # connections each listener accepted during the run (scoreboard)
    errors: int


def fairness_ratio(counts: list[int]) -> float:
    """Least served over most served: 1.0 is perfectly even, 0.0 a listener left out."""
    return min(counts) / max(counts) if counts and max(counts) > 0 else 0.0


def split_connections(total: int, listeners: int) -> int:
    """Client connections per listener: ``total`` shared out, at least one each."""
    return max(1, total // listeners)


def scale_listeners(listeners: int, duration: float) -> ListenersScale:
    """2 workers, ``listeners`` listeners, all loaded at once with the same client each."""
    running = start_scaled(WORKERS, listeners)
    try:
        uris = status(running)["listeners"]
        per = split_connections(CLOSE_CONNECTIONS, listeners)
        threads = CLIENT_THREADS if listeners == 1 else 1
        before = accepted(running)
        loads = [Background(lambda u=uri: http_load(url_of(u), per, duration, threads))
                 for uri in uris]  # fmt: skip
        for load in loads:
            load.start()
        results = [load.measured() for load in loads]
        after = accepted(running)
    finally:
        running.stop()
    return ListenersScale(listeners, [r.rps for r in results],
                          [after[u] - before[u] for u in uris], sum(r.errors for r in results))  # fmt: skip


def mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


def workers_table(rows: list[WorkersScale]) -> str:
    lines = ["| workers | start to ready | of it, the pool's boot | USS per worker (median) "
             "| PSS, master + workers | idle master CPU | HUP: all replaced under load "
             "| errors during the HUP load |", "|" + " --- |" * 8]  # fmt: skip
    for row in rows:
        hup = "not within the load" if row.hup_s is None else f"{row.hup_s:.2f} s"
        lines.append(f"| {row.workers} | {row.ready_s:.2f} s | {row.boot_s:.2f} s "
                     f"| {mib(row.uss)} | {mib(row.pss)} "
                     f"| {row.idle_cpu:.2f}% | {hup} | {row.hup.errors} of "
                     f"{row.hup.requests:,} requests |")  # fmt: skip
    return "\n".join(lines)


def listeners_table(rows: list[ListenersScale]) -> str:
    lines = ["| listeners | req/s on one listener | req/s, all listeners | accepted per listener "
             "(min..max) | fairness (min / max) | errors |", "|" + " --- |" * 6]  # fmt: skip
    for row in rows:
        lines.append(f"| {row.listeners} | {row.rps[0]:,.0f} | {sum(row.rps):,.0f} "
                     f"| {min(row.counts):,}..{max(row.counts):,} "
                     f"| {fairness_ratio(row.counts):.2f} | {row.errors} |")  # fmt: skip
    return "\n".join(lines)


def scale_section(workers: list[int], listeners: list[int], duration: float) -> str:
    """The scale tables: how start, memory, idle cost, reload and accepting grow with the
    pool and with the listeners."""
    idle_seconds, load_seconds = max(1.0, 1.5 * duration), max(2.0, 3 * duration)
    start_scaled(1).stop()  # the first start of a run reads the modules from disk: not counted
    failed: list[str] = []  # a size that could not be measured is said, and the rest go on
    by_workers = []
    for n in workers:
        try:
            row = scale_workers(n, idle_seconds, load_seconds)
        except Exception as err:
            failed.append(f"- {n} workers: not measured: {one_line(err)}")
            print(f"scale: {n:4} workers  {failed[-1]}", flush=True)
            continue
        print(f"scale: {n:4} workers  ready {row.ready_s:.2f} s (boot {row.boot_s:.2f})  uss "
              f"{mib(row.uss)}  pss {mib(row.pss)}  idle {row.idle_cpu:.2f}%  hup {row.hup_s} s  "
              f"errors {row.hup.errors}/{row.hup.requests}", flush=True)  # fmt: skip
        by_workers.append(row)
    by_listeners = []
    for n in listeners:
        try:
            found = scale_listeners(n, duration)
        except Exception as err:
            failed.append(f"- {n} listeners: not measured: {one_line(err)}")
            print(f"scale: {n:4} listeners  {failed[-1]}", flush=True)
            continue
        print(f"scale: {n:4} listeners  {found.rps[0]:,.0f} req/s on one, {sum(found.rps):,.0f} "
              f"in all  counts {found.counts}  errors {found.errors}", flush=True)  # fmt: skip
        by_listeners.append(found)
    failures = "\n\n" + "\n".join(failed) if failed else ""
    return (
        f"Workers: the sync cluster serving http-hello on one listener. Start to ready: from "
        f"starting `cluster run` to its `ready:` line; the pool's boot, the part of it from the "
        f"master's `starting N workers` line on (the rest is the interpreter's start, the "
        f"imports, the config and the binding). Memory after {WARM_UP:g} s of load, from "
        "/proc/PID/smaps_rollup: USS, a worker's own pages (what it adds to the pool), median "
        "over the workers; PSS of master and workers summed (what the pool costs the machine, "
        f"shared pages counted once). Idle master CPU over {idle_seconds:g} s, from schedstat. "
        f"HUP: from the signal to `reload complete` (every old worker gone) while HTTP "
        f"connection-per-request load with {CLOSE_CONNECTIONS} connections runs for "
        f"{load_seconds:g} s, and the load's errors.\n\n" + workers_table(by_workers)
        + f"\n\nListeners: the sync cluster with {WORKERS} workers and N TCP listeners, all "
        f"loaded at once for {duration:g} s, HTTP connection-per-request, each listener by its own "
        f"client ({CLOSE_CONNECTIONS} connections shared out, at least one each). Accepted per "
        "listener: the scoreboard's counts (`cluster ctl status`).\n\n"
        + listeners_table(by_listeners) + failures
    )  # fmt: skip


def one_line(err: BaseException) -> str:
    """An exception as one line for a table: its type and its message's first line."""
    text = str(err).strip().splitlines()
    return type(err).__name__ + (f": {text[0]}" if text else "")


# ------------------------------------------------------------------------------ profiles
PROFILE_MODES = ("sync", "thread", "fork")
PROFILE_RATE = 200  # samples per second
PROFILE_TOP = 15


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if os.path.exists(found) else None


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw output (collapsed stacks, ``frame;frame;... COUNT``, outermost first) as
    (frames, samples) pairs, without the ``process PID:"title"`` and ``thread`` frames that
    --subprocesses and --threads put first."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        stacks.append((frames, int(count)))
    return stacks


# Where a worker's threads wait, by the innermost Python frame of the wait. py-spy tells a
# wait from work by guessing (and takes a futex wait for a lock for work), so the profiles
# record every sample (--idle) and these known waits are counted apart. A wait that moves in
# a refactor shows up at the top of the profile's own time, as work: name it here.
WAITS = {
    "AcceptLoop.wait": "a connection (epoll)",
    "readable": "a request's bytes (poll)",
    "ThreadPool._work": "work (an idle handler thread)",
    "Followers._work": "work (an idle handler thread)",
    "Parker.sleep": "the lead (an idle handler thread)",
    "Condition.wait": "a lock (threading)",
    "Thread._wait_for_tstate_lock": "a thread to end (threading)",
    "serve.<locals>.room": "a request child to exit (--max-children)",
}


def function_of(frame: str) -> str:
    """``Class.method (path/file.py)`` -> ``Class.method``."""
    return frame.split(" (", 1)[0]


def split_waits(stacks: list[tuple[list[str], int]]) -> tuple[list, Counter]:
    """The stacks at work, and the samples spent in each known wait (``WAITS``)."""
    working, waiting = [], Counter()
    for frames, count in stacks:
        wait = function_of(frames[-1]) if frames else ""
        if wait in WAITS:
            waiting[wait] += count
        else:
            working.append((frames, count))
    return working, waiting


# The outermost frames of a worker's threads (the interpreter's start, the CLI, the master's
# fork of the worker; a thread's bootstrap): what runs inside them is what a profile shows.
ENTRIES = ("run (workers/runtime/entry.py)", "Thread.run (threading.py)")


def below_entries(stacks: list[tuple[list[str], int]]) -> list[tuple[list[str], int]]:
    """The stacks less their outer frames: up to the innermost of ``ENTRIES``, then those
    every stack still shares (the mode's serve loop), which are in 100% of the samples and say
    nothing. The innermost frame always stays."""
    cut = []
    for frames, count in stacks:
        entry = max((i for i, frame in enumerate(frames) if frame in ENTRIES), default=-1)
        cut.append((frames[entry + 1 :] or frames[-1:], count))
    if not cut:
        return cut
    shared, shortest = 0, min(len(frames) for frames, _ in cut)
    while shared < shortest - 1 and len({frames[shared] for frames, _ in cut}) == 1:
        shared += 1
    return [(frames[shared:], count) for frames, count in cut]


def self_and_total(stacks: list[tuple[list[str], int]]) -> tuple[Counter, Counter]:
    """Samples per frame: where a sample was taken (its own time, the innermost frame) and
    in every frame on the stack (its total time, each frame once per stack)."""
    own: Counter = Counter()
    total: Counter = Counter()
    for frames, count in stacks:
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total


def profile_summary(stacks: list[tuple[list[str], int]], top: int = PROFILE_TOP) -> str:
    """How much of the samples went to waiting, then the top frames at work by own time and
    by total time, in percent of the samples at work."""
    working, waiting = split_waits(stacks)
    own, total = self_and_total(below_entries(working))
    every = sum(count for _, count in stacks) or 1
    samples = sum(count for _, count in working) or 1
    lines = [f"{every} samples (of every thread), {samples} at work", ""]
    lines += [f"waiting for {WAITS[wait]}: {100 * n / every:.1f}% of the samples"
              for wait, n in waiting.most_common()]  # fmt: skip
    lines += ["", "own time  function (file), of the samples at work"]
    lines += [f"{100 * n / samples:7.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total time  function (file), of the samples at work"]
    lines += [f"{100 * n / samples:9.1f}%  {frame}" for frame, n in total.most_common(top)]
    return "\n".join(lines)


@dataclass
class Profile:
    mode: str
    seconds: float
    stacks: list[tuple[list[str], int]]
    load: Measured
    cpu: float = 0.0  # the worker's CPU use during the profile, percent of one core
    problem: str = ""  # why there is no profile

    @property
    def samples(self) -> int:
        return sum(count for _, count in self.stacks)


def profile_mode(mode: str, seconds: float) -> Profile:
    """py-spy on one worker of the ``mode`` cluster (2 workers, http-hello) under HTTP
    connection-per-request load, every thread's every sample (--idle; ``WAITS`` tells the
    waits apart). Fork mode's request children are
    not sampled: following them (--subprocesses) attaches to every child, which slowed the
    worker to about 40 requests per second."""
    spy = py_spy()
    if spy is None:
        return Profile(mode, seconds, [], Measured(0, 0, 0), problem="py-spy is not installed")
    running = cluster_row(mode).start(HTTP)
    out = tempfile.NamedTemporaryFile(prefix="bench-profile-", suffix=".txt", delete=False)
    out.close()
    try:
        worker = procfs.children(running.proc.pid)[0]
        url = f"http://{running.host}:{running.port}/"
        load = Background(lambda: http_load(url, CLOSE_CONNECTIONS, seconds + 2))
        load.start()
        time.sleep(0.5)  # let the load reach its pace before sampling
        args = [spy, "record", "--pid", str(worker), "--duration", str(round(seconds)),
                "--rate", str(PROFILE_RATE), "--format", "raw", "--nolineno", "--idle", "-o", out.name]  # fmt: skip
        before, started = procfs.usage(worker).cpu, time.monotonic()
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30)
        cpu = 100 * (procfs.usage(worker).cpu - before) / (time.monotonic() - started)
        measured = load.measured()
        text = Path(out.name).read_text()
    finally:
        running.stop()
        os.unlink(out.name)
    if done.returncode != 0 or not text.strip():
        why = (done.stderr.strip().splitlines() or ["no samples"])[-1]
        return Profile(mode, seconds, [], measured, problem=f"py-spy failed: {why}")
    return Profile(mode, seconds, parse_collapsed(text), measured, cpu)


def profile_table(found: Profile, top: int = 8) -> str:
    """One mode's profile as Markdown: its waits, then the frames at work by own time."""
    working, waiting = split_waits(found.stacks)
    every = found.samples or 1
    at_work = sum(count for _, count in working) or 1
    waits = ", ".join(f"{WAITS[w]} {100 * n / every:.0f}%" for w, n in waiting.most_common())
    own, _ = self_and_total(working)
    lines = [f"**{found.mode}**: {found.load.rps:,.0f} req/s during the profile, the worker at "
             f"{found.cpu:.0f}% of a core; {found.samples:,} samples of its threads, "
             f"{100 * at_work / every:.0f}% at work" + (f"; waiting for {waits}" if waits else "")
             + ".", "", "| own time, of the samples at work | function (file) |", "| --- | --- |"]  # fmt: skip
    lines += [f"| {100 * n / at_work:.1f}% | `{frame}` |" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def profiles_section(modes: list[str], seconds: float, directory: Path | None) -> str:
    """Where each mode's time goes: a short table per mode here, the longer summary in
    ``directory``/MODE.txt."""
    parts = [f"`py-spy record --idle --rate {PROFILE_RATE} --format raw` for {seconds:g} s on one "
             f"of the {WORKERS} workers of `cluster run http-hello -k MODE` under HTTP "
             f"connection-per-request load ({CLOSE_CONNECTIONS} connections), every sample of "
             "every thread. A sample whose innermost frame is a known wait (for a connection, a "
             "request, a lock, a child) counts as waiting; the others are at work. Own time: "
             "the samples taken in that function (its Python, or a system call it made). Fork "
             "mode: the worker, which forks, not the request children (following every "
             "child with `--subprocesses` slowed the worker 20-fold). The top "
             f"{PROFILE_TOP} by own and by total time: `docs/profiles/MODE.txt`."]  # fmt: skip
    for mode in modes:
        found = profile_mode(mode, seconds)
        print(f"profile {mode}: {found.samples} samples {found.problem}", flush=True)
        if found.problem:
            parts.append(f"**{mode}**: no profile: {found.problem}.")
            continue
        parts.append(profile_table(found))
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{mode}.txt").write_text(
                f"py-spy, {mode} mode, the worker, {found.load.rps:,.0f} req/s, at {found.cpu:.0f}% "
                f"of a core, {time.strftime('%Y-%m-%d')} (made by scripts/bench.py; the outer "
                f"frames every sample shares left out)\n\n{profile_summary(found.stacks)}\n"
            )
    return "\n\n".join(parts)


def median(cell: Cell) -> float:
    return statistics.median(cell.rps)


def paired_ratio(mine: Cell, theirs: Cell) -> float:
    """How ``mine`` compares with ``theirs``: the median over the rounds of each round's own
    ratio. The two ran in the same round, within a minute of each other, and this machine's
    speed drifts by up to 30% over a few minutes (docs/benchmarks-notes.md, fifth session): a
    ratio of two medians may divide a fast round of one by a slow round of the other, a
    round's own ratio does not. Cells with unequal rounds fall back to median over median."""
    paired = len(mine.rps) == len(theirs.rps)
    pairs = [m / t for m, t in zip(mine.rps, theirs.rps, strict=True) if t > 0] if paired else []
    if not pairs:
        return median(mine) / median(theirs) if median(theirs) > 0 else 0.0
    return statistics.median(pairs)


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
BARE_FORK_CARRYING = "bare fork loop carrying our imports"
CONN_PER_REQUEST = "http conn-per-request"
TARGETS = [
    Target("cluster sync", CONN_PER_REQUEST, "gunicorn sync", 2.5, BARE_PREFORK),
    Target("cluster sync", CONN_PER_REQUEST, "nginx return 200", 0.9, BARE_PREFORK),
    Target("cluster sync", CONN_PER_REQUEST, "stdlib ThreadingTCPServer", 5.0, BARE_PREFORK),
    Target("cluster thread", "http keep-alive", "stdlib ThreadingTCPServer", 1.2, BARE_PREFORK),
    Target("cluster fork", CONN_PER_REQUEST, "stdlib ForkingTCPServer", 1.5, BARE_FORK),
    Target("cluster sync", "udp echo", "stdlib UDPServer", 2.0, BARE_PREFORK),
    # The issue "lean and fast in every mode" (its memory target is in the Memory section).
    Target("cluster sync", CONN_PER_REQUEST, BARE_PREFORK, 0.95, BARE_PREFORK),
    Target("cluster thread", CONN_PER_REQUEST, "cluster sync", 0.8, BARE_PREFORK),
    Target("cluster thread", "http keep-alive", "stdlib ForkingTCPServer", 1.1, BARE_PREFORK),
    Target("cluster fork", CONN_PER_REQUEST, "stdlib ForkingTCPServer", 1.0, BARE_FORK_CARRYING),
    Target("cluster fork", CONN_PER_REQUEST, BARE_FORK, 0.9, BARE_FORK_CARRYING),
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
        reached = paired_ratio(mine, theirs)
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
    lines += ["", "Ratios of each cluster row to each peer in the same workload: the median over "
              "the rounds of each round's own ratio (`paired_ratio`; within a round the rows run "
              "one after another, in an order reversed every other round):",
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
                ratios.append(f"{paired_ratio(mine, theirs):.2f}x" if theirs else "")
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


SECTIONS = ("throughput", "fairness", "scale", "profiles")
MARK = re.compile(r"<!-- bench:(\w+) -->\n(.*?)\n<!-- /bench:\1 -->", re.DOTALL)


def marked(name: str, body: str) -> str:
    return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"


def document(header: str, fresh: dict[str, str], previous: str) -> str:
    """The whole Markdown file: the header, the sections in their order (those this run made,
    and the others as the previous file had them, so that one section can be rerun alone),
    then the notes, then the memory section ``scripts/memory.py`` wrote there, kept."""
    sections = dict(MARK.findall(previous))
    sections.update(fresh)
    body = "\n\n".join(marked(name, sections[name]) for name in SECTIONS if name in sections)
    return f"{header}\n\n{body}\n{NOTES}{memory_section(previous)}"


def memory_section(previous: str) -> str:
    """``## Memory`` of the previous file (``scripts/memory.py --write`` made it; up to the
    next ``## `` heading), with its blank line before it, or nothing."""
    start = previous.find("\n## Memory")
    if start < 0:
        return ""
    end = previous.find("\n## ", start + 1)
    return "\n" + previous[start + 1 : end if end >= 0 else None].rstrip("\n") + "\n"


def csv_ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def throughput_section(args: argparse.Namespace, workloads: list[str]) -> str:
    rows = [cluster_row("sync"), cluster_row("sync", access_log=True), cluster_row("thread"),
            cluster_row("fork"),
            stdlib_row("threading"), stdlib_row("forking"), stdlib_row("udp"),
            bare_row("prefork"), bare_row("fork"), bare_row("fork", carrying=True)]  # fmt: skip
    rows += [row for row in (gunicorn_row("sync"), gunicorn_row("gthread"), nginx_row()) if row]
    if args.rows:
        wanted = args.rows.split(",")
        rows = [row for row in rows if row.name in wanted]
    results = run(rows, workloads, args.duration, args.repeats)
    cores = os.cpu_count() or 1
    return (f"Servers: {WORKERS} workers (cluster, gunicorn, nginx); thread mode and gthread "
            f"{THREADS} threads per worker. HTTP keep-alive with {KEEP_ALIVE_CONNECTIONS} "
            f"connections, echo with {CONNECTIONS}, HTTP connection-per-request with "
            f"{CLOSE_CONNECTIONS}. Each cell: median (min..max) "
            f"of {args.repeats} interleaved rounds of {args.duration:g} s, in requests per "
            "second.\n\n" + table(rows, workloads, results)
            + "\n\nCPU per request in microseconds, server + client (the server's whole process "
            "tree: master, workers, request children), and the server's minor page faults per "
            "request, medians of the rounds:\n\n" + costs_table(rows, workloads, results)
            + f"\n\nThe speed targets against what {cores} cores allow. Budget: the server CPU per "
            "request that the cores leave at the target's rate, once the client has spent what "
            "it spends per request (its cheapest measured cost in that workload):\n\n"
            + budgets(rows, results, cores))  # fmt: skip


def fairness_section(duration: float) -> str:
    lines = ["Accept fairness, sync mode, HTTP connection-per-request for "
             f"{3 * duration:g} s (requests per worker, busiest / least busy):", ""]  # fmt: skip
    for workers in (2, 4):
        counts, spread = fairness(workers, 3 * duration)
        lines.append(f"- {workers} workers: {counts} -> {spread:.2f}x")
    return "\n".join(lines)


TITLES = {"scale": "## Scale: how the costs grow with the work",
          "profiles": "## Where the time goes, per mode (profiles)"}  # fmt: skip


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
    parser.add_argument("--only", metavar="SECTIONS", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}; with "
                        "--write the others stay as the file had them (--only= with none "
                        "brings in the notes file alone)")  # fmt: skip
    parser.add_argument("--no-fairness", action="store_true", help="skip the fairness runs")
    parser.add_argument("--no-scale", action="store_true", help="skip the scale tables")
    parser.add_argument("--no-profiles", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--scale-workers", type=csv_ints, default=list(SCALE_WORKERS),
                        metavar="N,N", help="pool sizes of the scale table")  # fmt: skip
    parser.add_argument("--scale-listeners", type=csv_ints, default=list(SCALE_LISTENERS),
                        metavar="N,N", help="listener counts of the scale table")  # fmt: skip
    parser.add_argument("--profile-seconds", type=float, default=5.0, help="per mode")
    parser.add_argument("--write", metavar="FILE", help="write the results as Markdown")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    CLIENT_THREADS = args.client_threads
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    wanted = {name for name in args.only.split(",") if name}  # none: --write copies the notes
    if wanted - set(SECTIONS):
        parser.error(f"unknown section(s): {', '.join(sorted(wanted - set(SECTIONS)))}")
    for name in ("fairness", "scale", "profiles"):
        if getattr(args, f"no_{name}"):
            wanted.discard(name)
    profiles_dir = Path(args.write).parent / "profiles" if args.write else None
    makers: dict[str, Callable[[], str]] = {
        "throughput": lambda: throughput_section(args, workloads),
        "fairness": lambda: fairness_section(args.duration),
        "scale": lambda: scale_section(args.scale_workers, args.scale_listeners, args.duration),
        "profiles": lambda: profiles_section(
            list(PROFILE_MODES), args.profile_seconds, profiles_dir
        ),  # fmt: skip
    }
    started = time.monotonic()
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    made = f"Made by `{command}` on {time.strftime('%Y-%m-%d')}."
    fresh = {}
    for name in SECTIONS:
        if name in wanted:
            body = makers[name]()
            print("\n" + body + "\n", flush=True)
            fresh[name] = "\n\n".join(part for part in (TITLES.get(name), made, body) if part)
    print(f"(took {time.monotonic() - started:.0f} s)")
    if args.write:
        client = f"wrk with {CLIENT_THREADS} threads" if shutil.which("wrk") else "our loadtest"
        header = (
            "# Benchmarks\n\n"
            f"`make bench` makes this file (`python scripts/bench.py --write docs/benchmarks.md`); "
            "each section says when and how it last ran.\n\n"
            f"Machine: {machine()}. HTTP client: {client}; echo clients: our loadtest with "
            f"{CLIENT_THREADS} processes; both share the cores with the servers. Three rows are "
            "references, not servers: `scripts/bare_server.py`, the same handler called by two "
            "forked processes with no framework around it (the third with our fork-mode "
            "worker's modules imported and unused)."
        )
        target = Path(args.write)
        previous = target.read_text() if target.exists() else ""
        target.write_text(document(header, fresh, previous))
    return 0


NOTES_FILE = ROOT / "docs" / "benchmarks-notes.md"
NOTES = "\n" + NOTES_FILE.read_text() if NOTES_FILE.exists() else ""


if __name__ == "__main__":
    sys.exit(main())

"""``soak``: a cluster under mixed load and faults for a bounded time, then the checks.

    python scripts/soak.py [--duration S] [--seed N] [--every S] [--json OUT]   (make soak)

Why: every fault the master promises to survive is tested once elsewhere; a soak mixes them
for minutes, under load, and looks for what only time shows: a request lost to a reload, an
fd or memory that leaks a little per operation, a zombie nobody reaps, a process left behind.

**The cluster** (started here, ended here by pid whatever happens; ``scripts/chaos.py``'s
``OwnCluster``): ``python -m cluster run echo`` in thread mode, 3 workers (at most 5), with
four listeners: TCP echo, TCP HTTP (``=http-hello``), UDP echo and a Unix stream echo, a
control socket and a pidfile in a temp dir, ``--request-timeout 4`` (slowloris clients
outlast it, so the log shows what cutting them costs).

**The well-behaved load** (``loadtest``, one process per transport, open loop so the shared
machine is not saturated): a new TCP connection per echo request, HTTP keep-alive (persistent
connections), UDP echo, and a new Unix connection per echo request; each checks every reply.

**The faults**, one every ``--every`` seconds, in an order drawn from ``--seed`` (printed, so
a run can be repeated): the fault kinds are dealt like a shuffled deck, a new shuffle when it
runs out, so a short run still meets each kind. HUP, USR2 (only in the first 60% of the run,
so that the final master lives long enough to be judged), TTIN, TTOU and ``cluster ctl scale
N`` (the pool kept within 2..max-1), kill -9 of an idle worker and of a busy one (chosen from
the master's status: ``busy`` means it holds a connection; an idle victim is stopped first
and checked again, so it cannot pick up a request between the look and the kill), slowloris
clients (an HTTP request dripped a byte at a time for a few seconds), reset clients (connect,
send, RST with SO_LINGER 0), garbage clients (random bytes to each listener), and garbage on
the control socket (every reply must be a JSON error).

**Errors attributed to a kill.** A request in flight on a worker killed with SIGKILL fails by
design; the rule that tells those from real errors: an error of a stream load (TCP, HTTP,
Unix) is the kill's if it happened from 50 ms before to 1 s after it (the connection breaks at
once: a reset or an end of file); a UDP timeout is the kill's if it happened within the
request timeout plus 0.5 s after it (the datagram died with the worker, the client notices
only at its timeout). Each attributed error is counted for the kill of an idle or a busy
worker; every other error is *unexplained* and fails the run.

**Sampled every second**: the current master (followed through the pidfile after USR2) and
every master still alive: its fd count (excluding the one pidfd it holds per worker, so that
the pool's size does not move it), its RSS, its children, and zombies among them (a zombie
still there a quarter second later: a reap that did not happen, not one in progress).

**Flatness is judged on the final master over its own life**: its fds and RSS when its pool
first stood settled (one generation, every worker up, no upgrade under way), against the same
once the run is over and its pool is back to its starting size. A master replaced by USR2 is
reported (first and last sample), not judged: its last moments are an upgrade's, not a steady
state. That is why USR2 stops at 60% of the run.

**At the end**: the load ends, the pool is scaled back and settles, the final samples are
taken, then TERM to every live master; every pid ever seen (masters and workers) must be gone
(no orphans; we are the child subreaper, so orphans would come to us), and every master must
exit 0.

**Bad clients' log lines**: the log records that name a bad client's address (or the control
socket) during its life, with their continuation lines: how much one misbehaving client costs
in log volume.

Output: a summary table and the verdict (exit 0 pass, 1 fail, 2 usage, 130 interrupted);
``--json OUT`` writes everything (loads, faults, kills, samples' extremes, the checks).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos import Master, OwnCluster, catches, interrupt, orphans, title  # beside us, in scripts/
from cluster.ctl import Unreachable, ask
from cluster.errors import OneLineParser
from cluster.pidfile import read as read_pidfile
from cluster.procfs import alive, children, descendants, reap_if_ours, state

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_DURATION = 3600.0
SAMPLE_EVERY = 1.0
GOOD_TIMEOUT = 5.0  # seconds a well-behaved request may take (loadtest's default)
STREAM_WINDOW = (-0.05, 1.0)  # a stream error this close to a kill is the kill's
DATAGRAM_WINDOW = (0.0, GOOD_TIMEOUT + 0.5)  # a UDP timeout this long after a kill is the kill's
FD_BOUND = 2  # fds the final master may hold beyond its start (none expected)
RSS_BOUND = 4 * 1024 * 1024  # bytes of RSS it may have grown by
USR2_UNTIL = 0.6  # no upgrade in the last 40% of the run
SETTLE_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0  # after the final TERM, for every master to exit
REQUEST_TIMEOUT = 4.0  # the cluster's --request-timeout: slowloris clients outlast it
SLOWLORIS_SECONDS = 6.0
STALL = 0.5  # seconds the sampler woke late: the machine (or this process) was starved
BASELINE_READS = 10  # fd counts read 50 ms apart for a baseline: the least is the steady one
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM)
RECORD = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) \[\d+\] \[([A-Z]+)\]")


# ----------------------------------------------------------------------------- /proc
def fd_count(pid: int) -> int | None:
    """The fds of ``pid`` other than pidfds (one per worker), or None when it is gone."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    count = 0
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[pidfd]":
                count += 1
        except OSError:
            continue
    return count


def rss(pid: int) -> int | None:
    """Resident set size in bytes, or None when ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def zombies(pid: int) -> list[int]:
    return [child for child in children(pid) if state(child) == "Z"]


# ----------------------------------------------------------------------------- the run's state
@dataclass
class Kill:
    at: float  # UNIX time of the SIGKILL
    pid: int
    busy: bool


@dataclass
class MasterLife:
    """One master's samples: the first and last settled ones, and the extremes."""

    pid: int
    start: dict[str, int] | None = None  # {"fds", "rss"} once its pool first settled
    end: dict[str, int] | None = None  # the last settled sample (the final one, for the last)
    max_fds: int = 0
    max_rss: int = 0
    samples: int = 0
    exit_code: int | None = None


@dataclass
class Soak:
    """Everything the faults, the sampler and the checks share."""

    master: Master
    control: str
    uris: dict[str, str]
    workers: int
    max_workers: int
    started: float  # monotonic
    duration: float
    rng: random.Random
    lock: threading.Lock = field(default_factory=threading.Lock)  # control-socket use vs fd samples
    stop: threading.Event = field(default_factory=threading.Event)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (UNIX time, kind, note)
    counts: Counter[str] = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lives: dict[int, MasterLife] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)  # every cluster pid ever seen
    zombies: list[tuple[float, int, int]] = field(default_factory=list)  # (time, master, pid)
    bad_clients: list[tuple[float, float, int]] = field(default_factory=list)  # (from, to, port)
    bad_threads: list[threading.Thread] = field(default_factory=list)
    ctl_garbage_replies: int = 0
    first: subprocess.Popen | None = None  # the first master: ours, collected through Popen
    stalls: list[tuple[float, float]] = field(default_factory=list)  # (UNIX time, seconds late)

    def note(self, kind: str, text: str = "") -> None:
        self.faults.append((time.time(), kind, text))
        elapsed = time.monotonic() - self.started
        print(f"soak: {elapsed:6.1f}s  {kind:<11} {text}", flush=True)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.note("PROBLEM", text)

    def life(self, pid: int) -> MasterLife:
        return self.lives.setdefault(pid, MasterLife(pid))

    def status(self) -> dict:
        with self.lock:
            return ask(self.control, {"cmd": "status"})


# ----------------------------------------------------------------------------- settling
def settled(status: dict) -> bool:
    """One generation, its target all up (none booting or draining), no upgrade under way."""
    workers = status["workers"]
    return (
        len(status["generations"]) == 1
        and len(workers) == status["target"]
        and all(w["state"] in ("idle", "busy") for w in workers)
        and status.get("upgrade") is None
        and not status.get("stopping")
    )


def wait_settled(soak: Soak, timeout: float = SETTLE_TIMEOUT) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = soak.status()
            if status.get("pid") == soak.master.pid and settled(status):
                return status
        except (Unreachable, ValueError, KeyError):
            pass
        time.sleep(0.05)  # polling the master's status
    return None


def baseline(soak: Soak, which: str) -> None:
    """Record the current master's fds and RSS as its ``start`` or ``end`` (pool settled)."""
    pid = soak.master.pid
    reads = []
    with soak.lock:  # no control connection of ours opens meanwhile
        for _ in range(BASELINE_READS):
            reads.append(fd_count(pid))
            time.sleep(0.05)  # the master closes our last control connection in its own time
        resident = rss(pid)
    if None in reads or resident is None:
        soak.problem(f"master {pid} is gone")
        return
    setattr(soak.life(pid), which, {"fds": min(reads), "rss": resident})  # type: ignore[type-var]


# ----------------------------------------------------------------------------- faults
FAULTS: dict[str, Callable[[Soak], None]] = {}


def fault(name: str) -> Callable[[Callable[[Soak], None]], Callable[[Soak], None]]:
    def register(function: Callable[[Soak], None]) -> Callable[[Soak], None]:
        FAULTS[name] = function
        return function

    return register


def send(soak: Soak, signum: signal.Signals) -> None:
    os.kill(soak.master.pid, signum)
    soak.note(signum.name.removeprefix("SIG").lower())


@fault("hup")
def hup(soak: Soak) -> None:
    send(soak, signal.SIGHUP)


def target(soak: Soak) -> int:
    return int(soak.status()["target"])


@fault("ttin")
def ttin(soak: Soak) -> None:
    """One worker more, or one less at the top of the range (2..max-1)."""
    send(soak, signal.SIGTTIN if target(soak) < soak.max_workers - 1 else signal.SIGTTOU)


@fault("ttou")
def ttou(soak: Soak) -> None:
    send(soak, signal.SIGTTOU if target(soak) > 2 else signal.SIGTTIN)


@fault("scale")
def scale(soak: Soak) -> None:
    """``cluster ctl scale N`` as an operator types it, N within 2..max-1."""
    n = soak.rng.randint(2, soak.max_workers - 1)
    with soak.lock:
        result = subprocess.run(
            [sys.executable, "-m", "cluster", "ctl", "--control", soak.control, "scale", str(n)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    soak.note("scale", f"ctl scale {n}: {(result.stdout or result.stderr).strip()}")
    if result.returncode != 0:
        soak.problem(f"ctl scale {n} exited {result.returncode}: {result.stderr.strip()}")


@fault("usr2")
def usr2(soak: Soak) -> None:
    """Upgrade; follow the new master once it is in the pidfile, catches our signals and
    its pool has settled (its ``start`` sample); the old one retires by itself."""
    if time.monotonic() - soak.started > USR2_UNTIL * soak.duration:
        hup(soak)  # too late for an upgrade: the final master must live long enough
        return
    master, old = soak.master, soak.master.pid
    assert master.pidfile is not None
    send(soak, signal.SIGUSR2)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    new = None
    while time.monotonic() < deadline and not soak.stop.is_set():
        pid = read_pidfile(master.pidfile)
        if pid is not None and pid != old and catches(pid, MASTER_SIGNALS):
            new = pid
            break
        time.sleep(0.02)  # polling the pidfile
    if new is None:
        soak.problem(f"usr2: no new master in the pidfile within {SETTLE_TIMEOUT:g} s")
        return
    master.follow(new)
    soak.seen.add(new)
    if wait_settled(soak) is None:
        soak.problem(f"usr2: the new master {new} did not settle within {SETTLE_TIMEOUT:g} s")
        return
    baseline(soak, "start")
    soak.note("usr2", f"master {old} -> {new}")


def pick(soak: Soak, busy: bool) -> dict | None:
    status = soak.status()
    current = [w for w in status["workers"] if w["generation"] == status["generation"]]
    wanted = [
        w for w in current if (w["state"] == "busy") == busy and w["state"] in ("idle", "busy")
    ]
    return soak.rng.choice(wanted) if wanted else None


@fault("kill-idle")
def kill_idle(soak: Soak) -> None:
    """SIGSTOP an idle worker, look again (frozen, it cannot take a request meanwhile), and
    SIGKILL it if it is still idle; otherwise let it go on."""
    victim = pick(soak, busy=False)
    if victim is None:
        soak.note("kill-idle", "no idle worker")
        return
    pid = victim["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    try:
        still = next((w for w in soak.status()["workers"] if w["pid"] == pid), None)
        if still is not None and still["state"] == "idle":
            kill(soak, pid, busy=False)
            return
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # spared (or already killed: then a no-op)
        except ProcessLookupError:
            pass
    soak.note("kill-idle", f"worker {pid} turned busy: spared")


@fault("kill-busy")
def kill_busy(soak: Soak) -> None:
    victim = pick(soak, busy=True)
    if victim is None:
        soak.note("kill-busy", "no busy worker")
        return
    kill(soak, victim["pid"], busy=True)


def kill(soak: Soak, pid: int, busy: bool) -> None:
    soak.seen.add(pid)
    at = time.time()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    soak.kills.append(Kill(at, pid, busy))
    soak.note("kill-busy" if busy else "kill-idle", f"worker {pid}")


# ----------------------------------------------------------------------------- bad clients
def tcp_address(uri: str) -> tuple[str, int]:
    host, _, port = uri.split("://", 1)[1].rpartition(":")
    return host.strip("[]"), int(port)


def bad_connection(soak: Soak, uri: str) -> socket.socket:
    return socket.create_connection(tcp_address(uri), timeout=5)


def in_background(soak: Soak, name: str, body: Callable[[], Iterator[int]]) -> None:
    """Run a bad client's ``body`` in a thread; it yields the local port of each connection
    it opens, recorded with the client's life for the log count."""

    def run() -> None:
        begun = time.time()
        ports = []
        try:
            for port in body():
                ports.append(port)
        except OSError:
            pass  # a bad client's own failures are nobody's problem
        finally:
            soak.bad_clients.extend((begun, time.time(), port) for port in ports)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    soak.bad_threads.append(thread)


@fault("slowloris")
def slowloris(soak: Soak) -> None:
    """Two connections (HTTP and echo) that drip an HTTP request a byte every 0.2 s for
    SLOWLORIS_SECONDS (longer than the cluster's --request-timeout, which cuts them), then
    close."""

    def body() -> Iterator[int]:
        socks = [bad_connection(soak, soak.uris[name]) for name in ("http", "tcp")]
        try:
            for sock in socks:
                yield sock.getsockname()[1]
            request = b"GET / HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"s" * 100
            deadline = time.monotonic() + SLOWLORIS_SECONDS
            for byte in request:
                if time.monotonic() > deadline or soak.stop.wait(0.2):
                    break
                for sock in socks:
                    sock.send(bytes([byte]))
        finally:
            for sock in socks:
                sock.close()

    in_background(soak, "slowloris", body)
    soak.note("slowloris", "2 connections")


@fault("reset")
def reset(soak: Soak) -> None:
    """Connect, send part of a request, and reset (SO_LINGER 0): on each TCP listener."""

    def body() -> Iterator[int]:
        for name in ("http", "tcp", "http", "tcp"):
            sock = bad_connection(soak, soak.uris[name])
            yield sock.getsockname()[1]
            sock.sendall(b"GET / HTTP/1.1\r\nHost: so" if name == "http" else b"half an echo")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

    in_background(soak, "reset", body)
    soak.note("reset", "4 connections")


@fault("garbage")
def garbage(soak: Soak) -> None:
    """Random bytes to each TCP listener (read what comes back, at most 1 s) and to UDP."""
    blobs = [soak.rng.randbytes(soak.rng.randint(1, 4096)) for _ in range(3)]

    def body() -> Iterator[int]:
        for name, blob in zip(("http", "tcp", "http"), blobs, strict=True):
            with bad_connection(soak, soak.uris[name]) as sock:
                yield sock.getsockname()[1]
                sock.sendall(blob)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(1)
                try:
                    while sock.recv(65536):
                        pass
                except OSError:
                    pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(blobs[0][:1400], tcp_address(soak.uris["udp"]))

    in_background(soak, "garbage", body)
    soak.note("garbage", "3 connections, 1 datagram")


CONTROL_GARBAGE = (b"{not json", b'{"cmd": 5}', b'{"cmd": "scale", "n": "many"}', b"[" * 20000,
                   b'{"cmd": "dance"}', b"\xff\xfe\x00", b'{"cmd": "status", "x": 1}', b"null")  # fmt: skip


@fault("ctl-garbage")
def ctl_garbage(soak: Soak) -> None:
    """Garbage lines on the control socket (the known kinds, shuffled, and random bytes):
    each reply must be a JSON error."""
    lines = [*CONTROL_GARBAGE, soak.rng.randbytes(64).replace(b"\n", b".")]
    soak.rng.shuffle(lines)
    with soak.lock, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(soak.control)
        sock.sendall(b"\n".join(lines) + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    replies = [json.loads(line) for line in data.splitlines() if line.strip()]
    soak.ctl_garbage_replies += len(replies)
    complete = [line for line in lines if line.strip()]
    if len(replies) != len(complete) or any(r.get("ok") is not False or not r.get("error")
                                            for r in replies):  # fmt: skip
        soak.problem(f"ctl-garbage: {len(complete)} lines got {replies!r:.200}")
    soak.note("ctl-garbage", f"{len(lines)} lines, {len(replies)} error replies")


# ----------------------------------------------------------------------------- schedule
def deal(rng: random.Random) -> Iterator[str]:
    """The fault kinds, shuffled; reshuffled each time the deck runs out."""
    while True:
        deck = sorted(FAULTS)
        rng.shuffle(deck)
        yield from deck


def run_faults(soak: Soak, every: float, until: float) -> None:
    """One fault every ``every`` seconds until ``until`` (monotonic); a failing fault is a
    problem of the run, and the schedule goes on."""
    cards = deal(soak.rng)
    next_at = time.monotonic() + every
    while not soak.stop.wait(max(0.0, next_at - time.monotonic())):
        if time.monotonic() >= until:
            return
        name = next(cards)
        soak.counts[name] += 1
        try:
            FAULTS[name](soak)
        except ProcessLookupError:
            soak.problem(f"{name}: master {soak.master.pid} is gone")
        except Exception as err:  # noqa: BLE001  reported; the schedule goes on
            soak.problem(f"{name} failed: {err!r}")
        next_at = max(next_at + every, time.monotonic())


# ----------------------------------------------------------------------------- sampler
def sample(soak: Soak) -> None:
    """One look at every live master: fds, RSS, children, zombies; new pids are remembered."""
    current = read_pidfile(soak.master.pidfile or "") or soak.master.pid
    masters = {current, *(pid for pid in list(soak.lives) if alive(pid))}
    suspects = []
    for pid in masters:
        if not alive(pid):
            continue
        life = soak.life(pid)
        soak.seen.add(pid)
        with soak.lock:
            fds, resident = fd_count(pid), rss(pid)
        if fds is not None and resident is not None:
            life.samples += 1
            life.max_fds, life.max_rss = max(life.max_fds, fds), max(life.max_rss, resident)
        soak.seen.update(descendants(pid))
        suspects += [(pid, zombie) for zombie in zombies(pid)]
    if suspects:
        time.sleep(0.25)  # a reap in progress ends within this; a missed one does not
        for master, pid in suspects:
            if state(pid) == "Z" and pid in children(master):
                soak.zombies.append((time.time(), master, pid))
                soak.note("ZOMBIE", f"child {pid} of master {master}")
    reap(soak)


def reap(soak: Soak) -> None:
    """Collect the cluster's processes that ended as our children: the first master, masters
    whose old master exited, orphans given to us as subreaper. Only pids the run has seen:
    the load's processes are Popen's to collect."""
    for pid in children(os.getpid()):
        if pid not in soak.seen or alive(pid):
            continue
        if pid in soak.lives:
            collect_exit(soak, pid)
        else:
            reap_if_ours(pid)


def run_sampler(soak: Soak, done: threading.Event) -> None:
    """Sample every second; how late each wake-up comes is the machine's stall (a starved
    machine makes timeouts of its own: this says when)."""
    due = time.monotonic() + SAMPLE_EVERY
    while not done.wait(max(0.0, due - time.monotonic())):
        late = time.monotonic() - due
        if late > STALL:
            soak.stalls.append((time.time() - late, late))
        try:
            sample(soak)
        except Exception as err:  # noqa: BLE001  a sampler bug must not end the run silently
            soak.problem(f"sampler failed: {err!r}")
        due = max(due + SAMPLE_EVERY, time.monotonic())


# ----------------------------------------------------------------------------- load
@dataclass(frozen=True)
class Load:
    name: str
    uri: str
    connect: str  # persistent | per-request
    stream: bool
    concurrency: int = 2
    rate: float = 100.0


def loads_for(uris: dict[str, str]) -> list[Load]:
    http = "http://" + uris["http"].removeprefix("tcp://") + "/"
    return [
        Load("tcp echo, a connection per request", uris["tcp"], "per-request", True),
        Load("http keep-alive", http, "persistent", True),
        Load("udp echo", uris["udp"], "persistent", False),
        Load("unix echo, a connection per request", uris["unix"], "per-request", True),
    ]


def start_load(load: Load, duration: float, out: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "loadtest", load.uri, "--duration", f"{duration:.3f}",
               "-c", str(load.concurrency), "--rate", str(load.rate), "--connect", load.connect,
               "--timeout", str(GOOD_TIMEOUT), "--max-errors", str(10**9), "--json", out, "-q"]  # fmt: skip
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@dataclass
class LoadOutcome:
    name: str
    requests: int = 0
    errors: int = 0
    by_busy_kills: int = 0
    by_idle_kills: int = 0
    unexplained: list[tuple[float, str]] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    failed: str = ""  # the load tool itself failed


def attribute(load: Load, data: dict, kills: Sequence[Kill]) -> LoadOutcome:
    """Split a load's errors into those of kills (see the module docstring) and the rest."""
    outcome = LoadOutcome(load.name, data["totals"]["requests"], data["totals"]["errors"])
    outcome.examples = data.get("error_examples", {})
    times = data.get("error_times", [])
    for when, kind in times:
        culprit = culprit_of(when, kind, load.stream, kills)
        if culprit is None:
            outcome.unexplained.append((when, kind))
        elif culprit.busy:
            outcome.by_busy_kills += 1
        else:
            outcome.by_idle_kills += 1
    for _ in range(outcome.errors - len(times)):  # beyond what the tool kept: unexplained
        outcome.unexplained.append((0.0, "unrecorded"))
    return outcome


def culprit_of(when: float, kind: str, stream: bool, kills: Sequence[Kill]) -> Kill | None:
    """The latest kill whose window holds this error, or None (pure)."""
    low, high = STREAM_WINDOW if stream or kind != "timeout" else DATAGRAM_WINDOW
    found = None
    for kill in kills:
        if kill.at + low <= when <= kill.at + high:
            found = kill
    return found


# ----------------------------------------------------------------------------- the log
def bad_client_lines(log: str, bad: Sequence[tuple[float, float, int]]) -> tuple[int, int]:
    """(lines of records naming a bad client or the control socket during its life, warning
    and error records in the whole log)."""
    count = warnings = 0
    lines = log.splitlines()
    records: list[tuple[float, str, list[str]]] = []
    for line in lines:
        match = RECORD.match(line)
        if match:
            when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            records.append((when + int(match.group(2)) / 1000, match.group(3), [line]))
        elif records:
            records[-1][2].append(line)
    for when, level, text in records:
        if level in ("WARNING", "ERROR", "CRITICAL"):
            warnings += 1
        body = "\n".join(text)
        if "control socket:" in body or any(
            begun - 1 <= when <= ended + 1 and re.search(rf"\D{port}\D", body)
            for begun, ended, port in bad
        ):
            count += len(text)
    return count, warnings


# ----------------------------------------------------------------------------- the end
def wind_down(soak: Soak) -> None:
    """Scale back to the starting size and let the pool settle: the final master's ``end``."""
    try:
        if target(soak) != soak.workers:
            with soak.lock:
                ask(soak.control, {"cmd": "scale", "n": soak.workers})
    except Unreachable as err:
        soak.problem(f"the master did not answer at the end: {err}")
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while any(alive(pid) for pid in soak.master.seen[:-1]) and time.monotonic() < deadline:
        time.sleep(0.05)  # an old master still retiring
    if wait_settled(soak) is None:
        soak.problem(f"the pool did not settle within {SETTLE_TIMEOUT:g} s at the end")
        return
    baseline(soak, "end")


def final_stop(soak: Soak) -> list[str]:
    """TERM every live master, wait for them, and list what is left of the run (orphans)."""
    sample(soak)
    masters = [pid for pid in soak.master.seen if alive(pid)]
    soak.seen.update(pid for master in masters for pid in descendants(master))
    for pid in masters:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        reap(soak)
        if not any(alive(pid) for pid in soak.seen) and not orphans():
            break
        time.sleep(0.05)  # polling /proc for the stop to finish
    left = sorted({pid for pid in soak.seen if alive(pid) and title(pid).startswith("cluster:")}
                  | set(orphans()))  # fmt: skip
    return [f"{pid} {title(pid)[:60]}" for pid in left]


def collect_exit(soak: Soak, pid: int) -> None:
    """A master's exit code: ours (the first) through Popen, the others as their subreaper."""
    life = soak.life(pid)
    if life.exit_code is not None:
        return
    if soak.first is not None and pid == soak.first.pid:
        life.exit_code = soak.first.poll()
        return
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return  # not ours (yet): its old master still runs, or it was reaped already
    if got:
        life.exit_code = os.waitstatus_to_exitcode(status)


# ----------------------------------------------------------------------------- report
@dataclass
class Verdict:
    checks: dict[str, tuple[bool, str]]

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks.values())


def judge(soak: Soak, outcomes: list[LoadOutcome], left: list[str]) -> Verdict:
    final = soak.life(soak.master.pid)
    start, end = final.start or {}, final.end or {}
    fds_ok = bool(start and end) and end["fds"] - start["fds"] <= FD_BOUND
    rss_ok = bool(start and end) and end["rss"] - start["rss"] <= RSS_BOUND
    unexplained = sum(len(o.unexplained) for o in outcomes)
    exits = {pid: life.exit_code for pid, life in soak.lives.items() if pid in soak.master.seen}
    return Verdict({
        "good clients: no unexplained error": (unexplained == 0 and not any(o.failed for o in outcomes),
                                               f"{unexplained} unexplained"),
        "final master: fds flat": (fds_ok, f"{start.get('fds')} -> {end.get('fds')} "
                                           f"(at most +{FD_BOUND})"),
        "final master: RSS flat": (rss_ok, f"{mib(start.get('rss'))} -> {mib(end.get('rss'))} "
                                           f"(at most +{mib(RSS_BOUND)})"),
        "no zombie at any sample": (not soak.zombies, f"{len(soak.zombies)} seen"),
        "no orphan after the final TERM": (not left, ", ".join(left) or f"{len(soak.seen)} pids tracked"),
        "every master exited 0": (all(code == 0 for code in exits.values()),
                                  ", ".join(f"{pid}: {code}" for pid, code in exits.items())),
        "no problem in the run": (not soak.problems, "; ".join(soak.problems)[:300] or "none"),
    })  # fmt: skip


def mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1048576:.1f} MiB"


def summary(soak: Soak, outcomes: list[LoadOutcome], verdict: Verdict, log_lines: tuple[int, int],
            seed: int) -> str:  # fmt: skip
    lines = [f"soak        {soak.duration:g} s, seed {seed}, {sum(soak.counts.values())} faults"]
    lines.append(f"{'load':<38} {'requests':>9} {'errors':>7} {'busy kills':>10} "
                 f"{'idle kills':>10} {'unexplained':>11}")  # fmt: skip
    for o in outcomes:
        lines.append(f"{o.name:<38} {o.requests:>9} {o.errors:>7} {o.by_busy_kills:>10} "
                     f"{o.by_idle_kills:>10} {len(o.unexplained):>11}" + (f"  {o.failed}" if o.failed else ""))  # fmt: skip
    lines.append("faults      " + ", ".join(f"{k} {v}" for k, v in sorted(soak.counts.items())))
    busy = sum(k.busy for k in soak.kills)
    lines.append(f"kills       {busy} busy, {len(soak.kills) - busy} idle")
    for pid in soak.master.seen:
        life = soak.life(pid)
        start, end = life.start or {}, life.end or {}
        lines.append(f"master {pid:<6} fds {start.get('fds', '?')} -> {end.get('fds', '-')} "
                     f"(max {life.max_fds}), RSS {mib(start.get('rss'))} -> {mib(end.get('rss'))} "
                     f"(max {mib(life.max_rss)}), {life.samples} samples, exit {life.exit_code}")  # fmt: skip
    worst = max((late for _, late in soak.stalls), default=0.0)
    lines.append(f"stalls      {len(soak.stalls)} times the sampler woke over {STALL:g} s late "
                 f"(worst {worst:.1f} s): the machine's own, not the cluster's")  # fmt: skip
    lines.append(f"bad clients {len(soak.bad_clients)} connections; log lines they caused: "
                 f"{log_lines[0]} (warning/error records in the whole log: {log_lines[1]})")  # fmt: skip
    for name, (ok, detail) in verdict.checks.items():
        lines.append(f"{'PASS' if ok else 'FAIL'}        {name}: {detail}")
    for o in outcomes:
        for when, kind in o.unexplained[:5]:
            lines.append(f"unexplained {o.name}: {kind} at +{when - soak_t0(soak):.2f} s; "
                         f"examples {o.examples}")  # fmt: skip
    lines.append(f"verdict     {'PASS' if verdict.passed else 'FAIL'}")
    return "\n".join(lines)


def soak_t0(soak: Soak) -> float:
    return time.time() - (time.monotonic() - soak.started)


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="soak", description="Run a cluster under mixed load and faults "
                           "for a bounded time, then check it (exit 0 pass, 1 fail).")  # fmt: skip
    add = parser.add_argument
    add("-d", "--duration", type=float, default=300.0, metavar="S", help="default 300")
    add("--seed", type=int, metavar="N", help="the faults' order (default: drawn and printed)")
    add("--every", type=float, default=1.5, metavar="S", help="seconds between faults (1.5)")
    add("--workers", type=int, default=3, metavar="N", help="the pool's starting size (3)")
    add("--max-workers", type=int, default=5, metavar="N", help="its bound (5)")
    add("--threads", type=int, default=4, metavar="N", help="threads per worker (4)")
    add("--json", metavar="OUT", help="write everything as JSON")
    add("--cluster-log", metavar="FILE", help="keep the cluster's log there")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    if not 5 <= args.duration <= MAX_DURATION:
        return f"--duration must be within 5..{MAX_DURATION:g} s, got {args.duration:g}"
    if not 0.2 <= args.every <= args.duration:
        return f"--every must be within 0.2..--duration s, got {args.every:g}"
    if not 2 <= args.workers < args.max_workers:
        return "--workers must be at least 2 and below --max-workers"
    if not 1 <= args.threads <= 64:
        return f"--threads must be within 1..64, got {args.threads}"
    for path in (args.json, args.cluster_log):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"cannot write {path}: no such directory"
    return None


def cluster_command(args: argparse.Namespace) -> Callable[[str, str], list[str]]:
    def command(tmp: str, pidfile: str) -> list[str]:
        return [sys.executable, "-m", "cluster", "run", "echo",
                "-b", "tcp://127.0.0.1:0", "-b", "tcp://127.0.0.1:0=http-hello",
                "-b", "udp://127.0.0.1:0", "-b", f"unix:{tmp}/echo.sock",
                "-w", str(args.workers), "--max-workers", str(args.max_workers),
                "-k", "thread", "--threads", str(args.threads), "--graceful-timeout", "10",
                "--request-timeout", str(REQUEST_TIMEOUT),
                "--control", f"{tmp}/control.sock", "--pidfile", pidfile]  # fmt: skip

    return command


def name_uris(uris: Sequence[str]) -> dict[str, str]:
    """tcp (echo), http, udp and unix, in the order of our -b flags."""
    if len(uris) != 4:
        raise RuntimeError(f"expected 4 listeners, the cluster logged {uris}")
    return dict(zip(("tcp", "http", "udp", "unix"), uris, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := check_args(args):
        print(f"soak: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    signal.signal(signal.SIGTERM, interrupt)
    own = OwnCluster(cluster_command(args), args.cluster_log, prefix="soak-")
    try:
        return soak_run(args, seed, own)
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        own.end([])  # a backstop: everything is normally gone by now
        own.cleanup()


def soak_run(args: argparse.Namespace, seed: int, own: OwnCluster) -> int:
    print(f"soak: seed {seed}, {args.duration:g} s, a fault every {args.every:g} s", flush=True)
    own.start()
    uris = name_uris(own.wait_ready())
    assert own.proc is not None
    soak = Soak(Master(own.proc.pid, own.pidfile), os.path.join(own.tmp, "control.sock"), uris,
                args.workers, args.max_workers, time.monotonic(), args.duration,
                random.Random(seed))  # fmt: skip
    soak.seen.add(own.proc.pid)
    soak.first = own.proc
    if wait_settled(soak) is None:
        print("soak: the cluster did not settle at start", file=sys.stderr)
        return EXIT_FAIL
    baseline(soak, "start")
    loads = loads_for(uris)
    outs = {load.name: os.path.join(own.tmp, f"load-{n}.json") for n, load in enumerate(loads)}
    procs = [start_load(load, args.duration, outs[load.name]) for load in loads]
    done = threading.Event()
    sampler = threading.Thread(target=run_sampler, args=(soak, done), daemon=True)
    sampler.start()
    try:
        run_faults(soak, args.every, soak.started + args.duration - 1.0)
        for thread in soak.bad_threads:
            thread.join(SLOWLORIS_SECONDS + 10)
        outcomes = [finish_load(load, proc, outs[load.name], soak) for load, proc in
                    zip(loads, procs, strict=True)]  # fmt: skip
        wind_down(soak)
    finally:
        soak.stop.set()
        done.set()
        sampler.join(5)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    left = final_stop(soak)
    with open(own.log_path, errors="replace") as fh:
        log_lines = bad_client_lines(fh.read(), soak.bad_clients)
    verdict = judge(soak, outcomes, left)
    print(summary(soak, outcomes, verdict, log_lines, seed), flush=True)
    if args.json:
        write_json(args.json, soak, outcomes, verdict, log_lines, seed)
    return EXIT_PASS if verdict.passed else EXIT_FAIL


def finish_load(load: Load, proc: subprocess.Popen, out: str, soak: Soak) -> LoadOutcome:
    try:
        _, err = proc.communicate(timeout=soak.duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    try:
        with open(out) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return LoadOutcome(
            load.name, failed=f"loadtest exited {proc.returncode}: {err.strip()[-200:]}"
        )
    return attribute(load, data, soak.kills)


def write_json(path: str, soak: Soak, outcomes: list[LoadOutcome], verdict: Verdict,
               log_lines: tuple[int, int], seed: int) -> None:  # fmt: skip
    data: dict[str, Any] = {
        "tool": "soak",
        "seed": seed,
        "duration_s": soak.duration,
        "passed": verdict.passed,
        "checks": {
            name: {"passed": ok, "detail": detail} for name, (ok, detail) in verdict.checks.items()
        },  # fmt: skip
        "loads": [asdict(o) for o in outcomes],
        "faults": [{"time": when, "kind": kind, "note": note} for when, kind, note in soak.faults],
        "fault_counts": dict(soak.counts),
        "kills": [asdict(k) for k in soak.kills],
        "masters": [asdict(soak.life(pid)) for pid in soak.master.seen],
        "final_master": soak.master.pid,
        "zombies": soak.zombies,
        "pids_tracked": len(soak.seen),
        "bad_client_connections": len(soak.bad_clients),
        "bad_client_log_lines": log_lines[0],
        "warning_records": log_lines[1],
        "ctl_garbage_replies": soak.ctl_garbage_replies,
        "problems": soak.problems,
        "stalls": soak.stalls,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    sys.exit(main())

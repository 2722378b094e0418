"""``chaos``: act on a cluster's master while it serves load, and check that nobody noticed.

    python scripts/chaos.py --duration S [--actions hup,ttin,ttou] [--every S] [options]

Why: the master's promises are about operations under load: a reload (HUP, rolling or all at
once), an upgrade (USR2), scaling (TTIN/TTOU) and the adaptive pool must not cost a single
request. Tests check each promise once; this tool repeats them on a schedule, mixed, for as
long as you like, and shows on one plot what each one did to throughput and latency.

How a run goes:

- **The cluster**: by default chaos starts its own (``python -m cluster run APP -b URI -w N -k
  MODE --pidfile TMP/master.pid``; with ``rolling-hup`` among the actions it asks for
  ``--reload-strategy rolling``), in its own process group so that Ctrl-C reaches only us,
  reads the real address from the ``listening on`` line and waits for ``ready``. It ends that
  cluster at the end by pid, whatever happened (errors, Ctrl-C, TERM): TERM to every master it
  knows of (the first, those an upgrade started, whatever the pidfile names), then KILL to
  what is left of them and of their workers. As the child subreaper it also collects the new
  masters an upgrade leaves orphaned. Or it attaches to a running master: ``--pid PID`` (or
  ``--pidfile PATH``) and ``--target URI``, and leaves it running.
- **The load**: ``loadtest`` as a library, in-process: ``run(LoadConfig(...),
  events=events)`` with ``--concurrency``, ``--processes`` and ``--connect`` (default: a new
  connection per request on stream targets, which is what a reload's accept hand-over is
  about). Loadtest refuses anything but loopback and Unix targets.
- **The actions**: a thread, started with the load, runs one action every ``--every`` seconds,
  taking ``--actions`` in turn, until ``--duration`` is over (or, with ``--rounds N``, after
  each action has been taken N times; the load still runs to ``--duration``). An action is one small function
  registered in ``ACTIONS`` with ``@action(name)``; it acts on ``chaos.master`` and records
  what it did with ``chaos.mark(label)``, an event with a timestamp that shows on the plot and
  in the summary. A failing action (the master is gone, an upgrade that never completes) is a
  *problem*, and a problem fails the run. The actions:

  ``hup``, ``rolling-hup``   reload (for rolling-hup our cluster uses --reload-strategy rolling)
  ``ttin``, ``ttou``         one worker more / less, turned around so that the pool stays
                             within one worker of its starting size
  ``usr2``                   upgrade; then act on the new master from the pidfile
  ``burst``                  hold extra connections open for a moment (the adaptive pool:
                             --min-spare/--max-spare)
  ``kill-idle``              SIGKILL a worker, an idle one if /proc can tell (not graceful)

- **The verdict**: with graceful actions only (everything but ``kill-idle``) any load error
  fails the run (exit 1), or more than ``--max-errors`` if given. ``kill-idle`` kills a worker
  with SIGKILL: the requests it was serving fail by design, so those runs report their errors
  and pass unless ``--max-errors`` is given and exceeded. Exit 2 for usage errors (one line),
  130 when interrupted.

Output: a summary (the load, every action with its time, errors by kind, the masters, the
verdict), ``--json FILE`` (loadtest's JSON plus a ``chaos`` section, with the initial and the
final master pid) and ``--plot FILE.png`` (loadtest's plot, actions marked).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cluster.errors import OneLineParser
from cluster.pidfile import read as read_pidfile
from cluster.procfs import (
    alive,
    become_subreaper,
    children,
    descendants,
    reap_if_ours,
    stat_state,
)
from loadtest import (
    ClientCrash,
    Events,
    LoadConfig,
    Result,
    Target,
    UsageError,
    format_summary,
    is_loopback_host,
    make_plan,
    parse_target,
    plot,
    result_to_json,
    run,
)
from workers.runtime import modes

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_DURATION = 3600.0  # bounded runs only
START_TIMEOUT = 30.0  # our cluster must be ready within this
UPGRADE_TIMEOUT = 45.0  # USR2: the new master in the pidfile, then the old one gone
STOP_TIMEOUT = 20.0  # TERM to our masters, then KILL
SCALE_SPAN = (-1, 1)  # ttin/ttou keep the pool within these many workers of its start
MAX_BURST = 256  # connections one burst may open
MIN_EVERY = 0.1  # seconds between actions, at least: signals, not a flood
POLL = 0.02  # how often waits look at /proc and the pidfile
MODES = modes.names()  # the one registry of worker modes


class ClusterFailed(RuntimeError):
    """Our own cluster did not start: exit 1 (2 if it refused our flags) with the reason and
    the end of its log."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = EXIT_USAGE if code == EXIT_USAGE else EXIT_FAIL


# ----------------------------------------------------------------------------- /proc
def title(pid: int) -> str:
    """The process title (``cluster: master [echo]``), from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


MASTER_SIGNALS = (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM)


def catches(pid: int, signums: Iterable[int]) -> bool:
    """Has ``pid`` installed handlers for all of ``signums`` (SigCgt in /proc/PID/status)?
    Before that, a HUP would kill it instead of reloading it."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            line = next(line for line in fh if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    mask = int(line.split()[1], 16)
    return all(mask >> (signum - 1) & 1 for signum in signums)


def is_master(pid: int) -> bool:
    return title(pid).startswith("cluster: master")


def workers_of(master: int) -> list[int]:
    """The master's workers: its children titled as workers (not a new master it forked)."""
    return [pid for pid in children(master) if title(pid).startswith("cluster: worker")]


IDLE_WAITS = ("epoll", "poll", "select", "futex")  # kernel waits of a worker with no request


def looks_idle(pid: int) -> bool:
    """Best effort from /proc: every thread asleep in the accept loop's epoll or on a lock
    (thread mode's idle handlers), none in a socket read, and no request children (fork
    mode). A worker serving a request sleeps in ``wait_woken`` or runs."""
    if children(pid):
        return False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        if stat_state(f"/proc/{pid}/task/{tid}/stat") != "S":
            return False
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as fh:
                wchan = fh.read()
        except OSError:
            return False
        if not any(wait in wchan for wait in IDLE_WAITS):
            return False
    return True


def wait_until(condition: Callable[[], Any], timeout: float, abort: threading.Event) -> Any:
    """Poll ``condition`` until it is truthy (return it), the timeout, or ``abort`` (None)."""
    deadline = time.monotonic() + timeout
    while True:
        if result := condition():
            return result
        if time.monotonic() > deadline or abort.wait(POLL):
            return None


# ----------------------------------------------------------------------------- the master
@dataclass
class Master:
    """The master we act on: its pid follows upgrades through the pidfile."""

    pid: int
    pidfile: str | None
    seen: list[int] = field(default_factory=list)  # every master pid, in order

    def __post_init__(self) -> None:
        self.seen.append(self.pid)

    def kill(self, signum: int) -> None:
        """ProcessLookupError (the master is gone) is the caller's problem to report."""
        os.kill(self.pid, signum)

    def follow(self, new: int) -> None:
        self.pid = new
        if new not in self.seen:
            self.seen.append(new)


# ----------------------------------------------------------------------------- actions
@dataclass
class Chaos:
    """What the actions share: the master, the target, the event log, and their own state."""

    master: Master
    target: Target
    events: Events
    every: float
    burst: int = 8
    rng: random.Random = field(default_factory=random.Random)
    abort: threading.Event = field(default_factory=threading.Event)  # give up waits now
    scale: int = 0  # workers our ttin/ttou added (negative: removed)
    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    retiring: dict[int, float] = field(default_factory=dict)  # old masters: pid -> since

    def mark(self, label: str) -> None:
        self.events.mark(label)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.mark(f"PROBLEM: {text}")


@dataclass(frozen=True)
class Action:
    run: Callable[[Chaos], None]
    graceful: bool  # may not cost a request: any load error fails the run


ACTIONS: dict[str, Action] = {}


def action(name: str, graceful: bool = True) -> Callable[[Callable[[Chaos], None]], Callable]:
    """Register an action under ``name``: adding one is writing one function."""

    def register(function: Callable[[Chaos], None]) -> Callable[[Chaos], None]:
        ACTIONS[name] = Action(function, graceful)
        return function

    return register


def send(chaos: Chaos, signum: signal.Signals, note: str = "") -> None:
    chaos.master.kill(signum)
    chaos.mark(f"{signum.name.removeprefix('SIG')} sent{note}")


@action("hup")
def hup(chaos: Chaos) -> None:
    """Reload: a new generation of workers replaces the old."""
    send(chaos, signal.SIGHUP)


@action("rolling-hup")
def rolling_hup(chaos: Chaos) -> None:
    """The same HUP, for a cluster started with --reload-strategy rolling."""
    send(chaos, signal.SIGHUP, " (rolling)")


def rescale(chaos: Chaos, grow: bool) -> None:
    """TTIN or TTOU, but turned around at the edge of SCALE_SPAN: the pool stays bounded."""
    low, high = SCALE_SPAN
    grow = (grow and chaos.scale < high) or chaos.scale <= low
    send(chaos, signal.SIGTTIN if grow else signal.SIGTTOU)
    chaos.scale += 1 if grow else -1


@action("ttin")
def ttin(chaos: Chaos) -> None:
    rescale(chaos, grow=True)


@action("ttou")
def ttou(chaos: Chaos) -> None:
    rescale(chaos, grow=False)


@action("kill-idle", graceful=False)
def kill_idle(chaos: Chaos) -> None:
    """SIGKILL one worker, an idle one if /proc can tell; the master must replace it."""
    workers = workers_of(chaos.master.pid)
    if not workers:
        chaos.mark("kill-idle: no worker found")
        return
    idle = [pid for pid in workers if looks_idle(pid)]
    victim = chaos.rng.choice(idle or workers)
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        chaos.mark(f"kill-idle: worker {victim} already gone")
        return
    chaos.mark(f"KILL worker {victim}" + ("" if idle else " (busy)"))


@action("usr2")
def usr2(chaos: Chaos) -> None:
    """Upgrade, then act on the new master: once it is in the pidfile and catches our
    signals. The old one exits once the new one is ready and its workers have finished their
    connections: with persistent ones that may take until the load ends, so after one
    interval we stop waiting for it here and ``settle`` watches it from then on. One event,
    at the time of the signal, names both masters (several would overlap on the plot)."""
    master, old = chaos.master, chaos.master.pid
    assert master.pidfile is not None  # the command line requires one with usr2
    sent = time.time()
    master.kill(signal.SIGUSR2)
    pidfile, abort = master.pidfile, chaos.abort
    new = wait_until(lambda: (pid := read_pidfile(pidfile)) != old and pid, UPGRADE_TIMEOUT, abort)
    if new is None:
        chaos.events.mark("USR2 sent", when=sent)
        if not abort.is_set():
            chaos.problem(f"no new master in {pidfile} within {UPGRADE_TIMEOUT:g} s")
        return
    master.follow(new)  # known from now on, so that the end of the run ends it too
    wait_until(lambda: catches(new, MASTER_SIGNALS), UPGRADE_TIMEOUT, abort)
    gone = wait_until(lambda: not alive(old), chaos.every, abort)
    if not gone:
        chaos.retiring[old] = time.monotonic()
    note = "" if gone else f" ({old} draining)"
    chaos.events.mark(f"USR2 sent: master {old} -> {new}{note}", when=sent)


def settle(chaos: Chaos) -> None:
    """Mark the old masters that have exited since; one still running UPGRADE_TIMEOUT after
    its upgrade is a problem."""
    for pid, since in list(chaos.retiring.items()):
        if not alive(pid):
            chaos.mark(f"old master {pid} exited")
        elif time.monotonic() - since > UPGRADE_TIMEOUT:
            chaos.problem(f"old master {pid} still running {UPGRADE_TIMEOUT:g} s after the upgrade")
        else:
            continue
        del chaos.retiring[pid]


@action("burst")
def burst(chaos: Chaos) -> None:
    """Hold ``--burst`` extra connections open for a moment (half the interval, 0.5 s at
    most): a sync worker serves one at a time, so the adaptive pool sees few idle workers."""
    target, opened, failed = chaos.target, [], []
    hold = min(chaos.every / 2, 0.5)
    try:
        for _ in range(chaos.burst):
            try:
                opened.append(connect(target))
            except OSError as err:
                failed.append(err)
        chaos.mark(f"burst of {len(opened)} connections")
        chaos.abort.wait(hold)  # the burst itself: connections held open
    finally:
        for sock in opened:
            sock.close()
    if failed:
        chaos.problem(f"burst: {len(failed)} of {chaos.burst} connections failed: {failed[0]}")


def connect(target: Target) -> socket.socket:
    """One stream connection to the target, nothing sent: the echo and HTTP handlers end
    cleanly when we close it."""
    if target.unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = target.path
    else:
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        address = (target.host, target.port)
    sock.settimeout(5)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def perform(chaos: Chaos, name: str) -> None:
    """Run one action; its failure is a problem of the run, not a crash of the thread."""
    chaos.counts[name] += 1
    settle(chaos)
    try:
        ACTIONS[name].run(chaos)
    except ProcessLookupError:
        chaos.problem(f"{name}: master {chaos.master.pid} is gone")
    except Exception as err:  # any failure is reported; the schedule goes on
        chaos.problem(f"{name} failed: {err!r}")


def act_on_schedule(
    chaos: Chaos,
    names: Sequence[str],
    duration: float,
    done: threading.Event,
    rounds: int | None = None,
) -> None:
    """Every ``every`` seconds the next action in turn, until ``duration`` or, with
    ``rounds``, until every action has been taken that many times. A tick missed while an
    action was busy (an upgrade waits for the old master) is skipped, not bunched: the turn
    waits for the next tick, so that with ``rounds`` each action is taken, in its order."""
    start = time.monotonic()
    turn = itertools.cycle(names)
    left = None if rounds is None else rounds * len(names)
    for tick in itertools.count(1):
        if left == 0:
            return
        at = start + tick * chaos.every
        if at >= start + duration:
            return
        if at < time.monotonic():
            continue
        if done.wait(at - time.monotonic()):
            return
        perform(chaos, next(turn))
        left = None if left is None else left - 1


# ----------------------------------------------------------------------------- our cluster
class OwnCluster:
    """A cluster a tool started (``python -m cluster run``) and must end, with everything the
    masters forked, whatever happens. ``command(tmp, pidfile)`` is its command line, given
    the tool's own temp dir and the pidfile to pass (also what ``scripts/soak.py`` uses)."""

    def __init__(self, command: Callable[[str, str], list[str]], log_path: str | None = None,
                 prefix: str = "chaos-") -> None:  # fmt: skip
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.pidfile = os.path.join(self.tmp, "master.pid")
        self.log_path = log_path or os.path.join(self.tmp, "cluster.log")
        self.command = command(self.tmp, self.pidfile)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        become_subreaper()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                process_group=0,  # Ctrl-C in the terminal is ours; we end the cluster
            )  # fmt: skip

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def wait_ready(self) -> list[str]:
        """The URIs from the ``listening on`` lines, once the master says ``ready``."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not re.search(r"\] ready: \d+ workers?", text := self.log()):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise ClusterFailed(f"the cluster exited with code {code}", code)
            if time.monotonic() > deadline:
                raise ClusterFailed(f"the cluster was not ready within {START_TIMEOUT:g} s")
            time.sleep(POLL)  # polling the log file
        return re.findall(r"listening on (\S+)", text)

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def end(self, known: Iterable[int]) -> None:
        """TERM every master (those we know, those in the pidfiles, new ones they forked),
        wait, KILL what is left of them and their trees, and collect what is ours."""
        if self.proc is None:
            return
        candidates = {self.proc.pid, *known}
        for path in (self.pidfile, self.pidfile + ".oldbin"):
            if (pid := read_pidfile(path)) is not None:
                candidates.add(pid)
        masters = {pid for pid in candidates if is_master(pid) or pid == self.proc.pid}
        for pid in list(masters):  # a new master still booting has no title yet
            masters.update(c for c in children(pid) if not title(c).startswith("cluster: worker"))
        tree = {child for pid in masters for child in descendants(pid)}
        signal_all(masters, signal.SIGTERM)
        if not wait_gone(masters, STOP_TIMEOUT):
            signal_all(masters, signal.SIGKILL)
        tree.update(orphans())  # e.g. the requests of a killed fork-mode worker, given to us
        signal_all(tree, signal.SIGKILL)  # workers end with their master: this is a backstop
        wait_gone(masters | tree, 5)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for pid in children(os.getpid()):
            if stat_state(f"/proc/{pid}/stat") == "Z":
                reap_if_ours(pid)  # no zombie of ours outlives us (PID 1 may never reap it)

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def cluster_command(args: argparse.Namespace, pidfile: str) -> list[str]:
    """``python -m cluster run`` with our flags; rolling reloads when rolling-hup is chosen."""
    command = [sys.executable, "-m", "cluster", "run", args.app, "-b", args.bind,
               "-w", str(args.workers), "-k", args.mode, "--pidfile", pidfile]  # fmt: skip
    if "rolling-hup" in args.actions:
        command += ["--reload-strategy", "rolling"]
    for flag in ("max_workers", "min_spare", "max_spare"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return command


def orphans() -> list[int]:
    """Cluster processes reparented to us, their parent gone (we are the subreaper)."""
    return [pid for pid in children(os.getpid()) if title(pid).startswith("cluster:")]


def signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def wait_gone(pids: set[int], timeout: float) -> bool:
    """Until none of ``pids`` runs (collecting those that are ours), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            reap_if_ours(pid)
        if not any(alive(pid) for pid in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)  # polling /proc


def target_uri(uris: Sequence[str], app: str) -> str:
    """The first listener; ``http-hello`` is loaded over HTTP, not as an echo."""
    if not uris:
        raise ClusterFailed("the cluster logged no 'listening on' line")
    uri = uris[0]
    if app == "http-hello" and uri.startswith("tcp://"):
        uri = "http://" + uri.removeprefix("tcp://") + "/"
    return uri


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="chaos",
        description="Act on a cluster's master (reloads, upgrades, scaling, kills) while "
        "loadtest drives it; report and plot. Exit 0 pass, 1 fail, 2 usage, 130 interrupted.",
    )
    add = parser.add_argument
    add("-d", "--duration", type=float, required=True, metavar="S", help="how long (required)")
    add("--actions", default="hup,ttin,ttou", metavar="A,B",
        help=f"taken in turn, one per interval: {', '.join(ACTIONS)} (default hup,ttin,ttou)")  # fmt: skip
    add("--every", type=float, default=1.0, metavar="S", help="seconds between actions (1.0)")
    add("--rounds", type=int, metavar="N",
        help="take each action N times, then only load (default: until --duration)")  # fmt: skip
    add("--max-errors", type=int, metavar="N",
        help="pass with at most N load errors (default 0; with kill-idle: no limit)")  # fmt: skip
    add("--burst", type=int, default=8, metavar="N",
        help=f"burst: connections held open (default 8, at most {MAX_BURST})")  # fmt: skip
    add("--seed", type=int, metavar="N", help="seed of kill-idle's choice")
    cluster = parser.add_argument_group("our own cluster (the default)")
    cluster.add_argument("--app", help="module:Class or a demo (default echo)")
    cluster.add_argument(
        "--bind", metavar="URI", help="loopback or unix (default tcp://127.0.0.1:0)"
    )
    cluster.add_argument("--workers", type=int, metavar="N", help="initial pool size (default 2)")
    cluster.add_argument("--mode", choices=MODES, help="worker class (default sync)")
    cluster.add_argument("--max-workers", type=int, metavar="N")
    cluster.add_argument("--min-spare", type=int, metavar="N", help="adaptive pool (for burst)")
    cluster.add_argument("--max-spare", type=int, metavar="N", help="adaptive pool (for burst)")
    cluster.add_argument("--cluster-log", metavar="FILE", help="keep the cluster's log there")
    attach = parser.add_argument_group("or a running cluster")
    attach.add_argument("--pid", type=int, help="its master's pid")
    attach.add_argument("--pidfile", metavar="PATH", help="its pidfile (needed to follow usr2)")
    attach.add_argument("--target", metavar="URI", help="where to send load (required here)")
    load = parser.add_argument_group("load (loadtest)")
    load.add_argument("-c", "--concurrency", type=int, default=4, metavar="C", help="default 4")
    load.add_argument("-p", "--processes", type=int, default=1, metavar="P", help="default 1")
    load.add_argument("--connect", choices=("persistent", "per-request"),
                      help="default per-request on stream targets")  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="loadtest's JSON plus a chaos section")
    out.add_argument("--plot", metavar="FILE.png", help="throughput and latency, actions marked")
    return parser


OWN_DEFAULTS = {"app": "echo", "bind": "tcp://127.0.0.1:0", "workers": 2, "mode": "sync"}
OWN_ONLY = (*OWN_DEFAULTS, "max_workers", "min_spare", "max_spare", "cluster_log")


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no process, so that refusals are cheap (UsageError)."""
    args.actions = [name.strip() for name in args.actions.split(",") if name.strip()]
    unknown = [name for name in args.actions if name not in ACTIONS]
    if unknown or not args.actions:
        raise UsageError(f"unknown action {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(ACTIONS)}")  # fmt: skip
    if not 0 < args.duration <= MAX_DURATION:
        raise UsageError(f"--duration must be within (0, {MAX_DURATION:g}] s, got {args.duration}")
    if not MIN_EVERY <= args.every <= args.duration:
        raise UsageError(f"--every must be within {MIN_EVERY:g}..--duration s, got {args.every}")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    if not 1 <= args.burst <= MAX_BURST:
        raise UsageError(f"--burst must be within 1..{MAX_BURST}, got {args.burst}")
    if args.max_errors is not None and args.max_errors < 0:
        raise UsageError(f"--max-errors must be at least 0, got {args.max_errors}")
    args.attach = args.pid is not None or args.pidfile is not None
    if args.attach:
        check_attach(args)
    else:
        check_own(args)
    for path in (args.json, args.plot, args.cluster_log):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"cannot write {path}: no such directory")


def check_attach(args: argparse.Namespace) -> None:
    given = [f"--{name.replace('_', '-')}" for name in OWN_ONLY if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{given[0]} is for a cluster chaos starts, not with --pid/--pidfile")
    if args.target is None:
        raise UsageError("--target URI is required with --pid/--pidfile")
    if args.pid is None:
        args.pid = read_pidfile(args.pidfile)
        if args.pid is None:
            raise UsageError(f"no pid in {args.pidfile}")
    if not is_master(args.pid):
        raise UsageError(
            f"pid {args.pid} is not a cluster master: {title(args.pid)[:60] or 'gone'}"
        )
    if "usr2" in args.actions and args.pidfile is None:
        raise UsageError("usr2 needs the master's --pidfile to follow the new master")
    check_load(args, args.target)


def check_own(args: argparse.Namespace) -> None:
    if args.target is not None:
        raise UsageError("--target is for a running cluster (--pid/--pidfile); ours is --bind")
    for name, default in OWN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    # Port 0 is what we usually bind; any port will do to check the host before binding.
    check_load(args, re.sub(r":0(/|$)", r":1\1", args.bind))


def check_load(args: argparse.Namespace, uri: str) -> None:
    """Loadtest's own checks (loopback or unix only), and burst needs a stream target."""
    target = parse_target(uri)
    if not (target.unix or is_loopback_host(target.host)):
        raise UsageError(f"refusing {target.host}: chaos loads only loopback or unix targets")
    make_plan(load_config(args, uri, target), resolve=False)
    if "burst" in args.actions and not target.stream:
        raise UsageError(f"burst opens connections: it needs a stream target, not {target.kind}")


def load_config(args: argparse.Namespace, uri: str, target: Target) -> LoadConfig:
    connect = args.connect or ("per-request" if target.stream else "persistent")
    return LoadConfig(uri, duration=args.duration, concurrency=args.concurrency,
                      processes=args.processes, connect=connect)  # fmt: skip


# ----------------------------------------------------------------------------- the run
@dataclass
class Outcome:
    """The load's result and what chaos did: the verdict comes from both."""

    result: Result
    chaos: Chaos
    actions: list[str]
    max_errors: int | None  # None: errors are reported, not judged (kill-idle)

    @property
    def graceful(self) -> bool:
        return all(ACTIONS[name].graceful for name in self.actions)

    @property
    def passed(self) -> bool:
        errors_ok = self.max_errors is None or self.result.error_count <= self.max_errors
        return errors_ok and not self.chaos.problems and not self.result.interrupted

    def exit_code(self) -> int:
        if self.result.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PASS if self.passed else EXIT_FAIL


def error_limit(args: argparse.Namespace) -> int | None:
    if args.max_errors is not None:
        return args.max_errors
    return 0 if all(ACTIONS[name].graceful for name in args.actions) else None


def run_chaos(args: argparse.Namespace, master: Master, uri: str) -> Outcome:
    """The load in this thread, the actions in another, started together."""
    config = load_config(args, uri, parse_target(uri))
    events = Events()
    rng = random.Random(args.seed)
    chaos = Chaos(master, parse_target(uri), events, args.every, args.burst, rng)
    done = threading.Event()
    thread = threading.Thread(
        target=act_on_schedule,
        args=(chaos, args.actions, args.duration, done, args.rounds),
        daemon=True,
    )
    thread.start()
    result: Result | None = None
    try:
        result = run(config, events=events)
    finally:
        done.set()
        if result is None or result.interrupted:
            chaos.abort.set()  # failing or interrupted: do not wait for an upgrade to finish
        try:
            thread.join(UPGRADE_TIMEOUT * 2 + 5)
        except KeyboardInterrupt:
            chaos.abort.set()
            thread.join(5)
            raise
    wait_until(lambda: not any(map(alive, chaos.retiring)), UPGRADE_TIMEOUT, chaos.abort)
    settle(chaos)
    result.events = sorted(events.snapshot())  # also what was marked after the load ended
    if not alive(master.pid):
        chaos.problems.append(f"the master {master.pid} is gone at the end")
    return Outcome(result, chaos, args.actions, error_limit(args))


def summary(outcome: Outcome) -> str:
    """Loadtest's summary (its events are our actions) without its verdict, then ours."""
    result, chaos = outcome.result, outcome.chaos
    lines = [line for line in format_summary(result).splitlines()
             if not line.startswith("verdict")]  # fmt: skip
    counts = ", ".join(
        f"{name} {chaos.counts[name]}"
        for name in dict.fromkeys(outcome.actions)
        if name in chaos.counts
    )
    lines.append(f"actions     {sum(chaos.counts.values())} taken every {chaos.every:g} s"
                 + (f": {counts}" if counts else ""))  # fmt: skip
    masters = chaos.master.seen
    lines.append(f"masters     initial {masters[0]}, final {masters[-1]}"
                 + (f" (via {', '.join(map(str, masters[1:-1]))})" if len(masters) > 2 else ""))  # fmt: skip
    for problem in chaos.problems:
        lines.append(f"problem     {problem}")
    limit = "no limit: kill-idle" if outcome.max_errors is None else f"max {outcome.max_errors}"
    verdict = "INTERRUPTED" if result.interrupted else "PASS" if outcome.passed else "FAIL"
    lines.append(f"verdict     {verdict} ({result.error_count} errors, {limit}; "
                 f"{len(chaos.problems)} problems)")  # fmt: skip
    return "\n".join(lines)


def to_json(outcome: Outcome) -> dict[str, Any]:
    """Loadtest's JSON, plus what chaos did and concluded."""
    data = result_to_json(outcome.result)
    chaos = outcome.chaos
    data["chaos"] = {
        "actions": outcome.actions,
        "every_s": chaos.every,
        "taken": dict(chaos.counts),
        "graceful_only": outcome.graceful,
        "max_errors": outcome.max_errors,
        "initial_master": chaos.master.seen[0],
        "final_master": chaos.master.seen[-1],
        "masters": chaos.master.seen,
        "problems": chaos.problems,
        "passed": outcome.passed,
    }
    return data


def report(outcome: Outcome, args: argparse.Namespace) -> None:
    print(summary(outcome), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(outcome), fh, indent=2)
            fh.write("\n")
    if args.plot:
        plot(outcome.result, args.plot)


def interrupt(signum: int, frame: object) -> NoReturn:
    """TERM as Ctrl-C: the load stops, the summary prints, our cluster is ended."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
    except UsageError as err:
        print(f"chaos: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, interrupt)
    own = None
    if not args.attach:
        own = OwnCluster(lambda tmp, pidfile: cluster_command(args, pidfile), args.cluster_log)
    master = Master(args.pid, args.pidfile) if args.attach else None
    try:
        if own is not None:
            own.start()
            uri = target_uri(own.wait_ready(), args.app)
            assert own.proc is not None
            master = Master(own.proc.pid, own.pidfile)
            print(f"chaos: cluster {master.pid} ready on {uri}: {' '.join(own.command[3:])}",
                  flush=True)  # fmt: skip
        else:
            uri = args.target
        assert master is not None
        outcome = run_chaos(args, master, uri)
        report(outcome, args)
        return outcome.exit_code()
    except ClusterFailed as err:
        print(f"chaos: {err}" + (f"; its log ends:\n{own.tail()}" if own else ""), file=sys.stderr)
        return err.exit_code
    except (UsageError, ClientCrash) as err:
        print(f"chaos: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAIL
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if own is not None:
            own.end(master.seen if master else ())
            own.cleanup()


if __name__ == "__main__":
    sys.exit(main())

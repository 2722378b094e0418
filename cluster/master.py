"""The master: binds the listeners once, forks the workers, and supervises them in one loop.

Read ``Master.run`` top to bottom; it is the whole life of the process:

    bind -> fork the pool -> loop { sleep until something happens; read what workers said;
                                    act on queued signals; reap the dead; fix the pool size }
         -> stop: signal the workers, wait (bounded), close listeners, exit

Signal handlers do nothing but queue the signal number; ``signal.set_wakeup_fd`` writes a byte
to our wakeup pipe, which is one of the things the loop sleeps on. The others are each worker's
``sentinel`` (a pidfd, readable once that worker exits) and the notify pipe the workers write
``PID ready`` to. So the idle master wakes only for signals, exits, messages and its own timers.

Who owns what: the master owns the listening sockets (closed at exit, Unix socket files
unlinked), the wakeup pipe, the notify pipe's read end, its selector, and one
``WorkerProcess`` (with its pidfd) per worker. A worker closes every one of those it inherited
except its listener copies and the notify pipe's write end (see ``workers.process``).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster import handover, pidfile, pool
from cluster.app import load_handler
from cluster.config import Config
from cluster.errors import EXIT_APP, EXIT_OK, EXIT_RUNTIME, ClusterError
from cluster.listeners import Listener, adopt, bind
from cluster.reload import Reload, ReloadMixin
from cluster.spawn import WorkerProcess
from cluster.upgrade import UpgradeMixin
from workers.process import HANDLED_SIGNALS, STACK_DUMP_SIGNAL, Endpoint, WorkerSpec, set_title
from workers.process import run as worker_main
from workers.scoreboard import Scoreboard, SlotView

log = logging.getLogger("cluster.master")

QUICK_STOP_GRACE = 3.0  # seconds workers get to exit after QUIT before they are killed
LOOP_TICK = 1.0  # the longest the loop sleeps with nothing to do
MAX_BOOT_FAILURES = 3  # consecutive workers dying before ready, with none ready yet: give up
KILL_GRACE = 1.0  # after TERM to a hung worker, seconds before KILL


@dataclass
class Worker:
    """The master's record of one worker process."""

    process: WorkerProcess
    pid: int
    slot: int
    generation: int
    spawned_at: float
    ready: bool = False
    retiring: bool = False
    kill_at: float = 0.0  # a hung worker was sent TERM: KILL it at this time
    why_retired: str = ""  # "recycled after N requests", "scaled down"...


class Master(ReloadMixin, UpgradeMixin):
    """One master loop, used by ``cluster run`` and by the library API alike.

    ``listeners`` may be given already bound (the library binds in its constructor, as
    socketserver does); otherwise ``run`` binds ``config.bind``. ``handler`` overrides
    ``config.app`` with a class the caller already holds.
    """

    def __init__(
        self,
        config: Config,
        *,
        listeners: list[Listener] | None = None,
        handler: type | None = None,
        install_signals: bool = True,
        set_title: bool = True,
        reread_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.reread_config = reread_config  # HUP: the config file and flags, read afresh
        self.listeners = listeners or []
        self.handler = handler
        self.install_signals = (
            install_signals and threading.current_thread() is threading.main_thread()
        )
        self.set_title = set_title
        self.pid = os.getpid()
        self.name = config.name or config.app
        self.workers: dict[int, Worker] = {}
        self.target = config.workers
        self.generation = 1
        self.events: collections.deque[int] = collections.deque()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.selector.register(self.notify_r, selectors.EVENT_READ, "notify")
        self.notify_buffer = b""
        self.exited: list[Worker] = []  # workers whose sentinel fired, to be reaped
        self.boot_failures = 0  # consecutive workers that died before they were ready
        self.crashes = 0  # consecutive workers that died on their own soon after starting
        self.next_spawn_at = 0.0  # crash-loop backoff: no fork before this time
        self.scoreboard: Scoreboard | None = None
        self.preloaded: dict[str | None, type] = {}  # --preload: handlers the master imported
        self.reload: Reload | None = None  # a new generation is replacing the old one
        self.closing: list[Listener] = []  # removed by a reload: closed once the old gen left
        self.successor: WorkerProcess | None = None  # USR2: the new master, until it takes over
        self.successor_deadline = 0.0
        self.handed_over = False  # our successor serves: leave the socket files to it
        self.adaptive_rate = 1  # --min-spare/--max-spare: forks per second while short
        self.next_adapt_at = 0.0
        self.stopping = False
        self.stop_graceful = True
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.ready = threading.Event()  # set once the first generation is serving
        self.stopped = threading.Event()
        self.previous_handlers: dict[int, object] = {}  # a host program's, restored at exit
        self.previous_wakeup_fd = -1

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        """Serve until stopped; return the exit code (0 clean, 1 workers had to be killed)."""
        try:
            self.start()
            while True:
                self.sleep()
                self.read_notifications()
                self.handle_events()  # before reaping: Ctrl-C kills workers and us at once
                self.reap_workers()
                if self.stopping:
                    if not self.workers:
                        break
                    self.enforce_stop_deadline()
                else:
                    self.murder_workers()
                    self.adapt_pool()
                    self.manage_workers()
                    self.watch_reload()
                    self.watch_successor()
        finally:
            self.cleanup()
        return self.exit_code

    def start(self) -> None:
        """Load the app (a bad one fails here, before any fork), bind, and fork the pool."""
        self.check_app(self.config)
        if not self.listeners:
            self.listeners = self.open_listeners(self.config)
        for listener in self.listeners:
            log.info("listening on %s", listener.uri)
        self.scoreboard = Scoreboard(2 * self.config.pool_bound, _lanes(self.config))
        if self.set_title:
            set_title(f"cluster: master [{self.name}]")
        pidfile.write(self.config.pidfile, self.pid)
        if self.install_signals:
            self.install_signal_handlers()
        log.info(
            "master %d starting %d %s workers", self.pid, self.target, self.config.worker_class
        )
        if self.config.min_spare or self.config.max_spare:
            self.next_adapt_at = time.monotonic() + 1.0
        self.manage_workers()

    def sleep(self) -> None:
        """Wait for a signal, a worker exit, a worker message, or the next timer."""
        now = time.monotonic()
        timers = [now + LOOP_TICK]
        if self.config.timeout:
            timers.append(now + self.config.timeout / 4)  # hung requests are seen within 1/4
        if self.stopping:
            timers.append(self.stop_deadline)
        elif self.next_spawn_at > now:
            timers.append(self.next_spawn_at)
        timers.extend(w.kill_at for w in self.workers.values() if w.kill_at)
        if self.successor is not None:
            timers.append(self.successor_deadline)
        if self.next_adapt_at:
            timers.append(self.next_adapt_at)
        timeout = max(0.0, min(timers) - now)
        for key, _ in self.selector.select(timeout):
            if key.data == "wake":
                _drain(self.wake_r)
            elif isinstance(key.data, Worker):
                self.exited.append(key.data)
            elif key.data == "successor":
                self.on_successor_exit()

    # ----------------------------------------------------------------- signals and requests
    def install_signal_handlers(self) -> None:
        """Queue our signals; remember what was there, for a host program (the library API
        in a main thread) gets its own handlers back when we stop."""
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.previous_handlers = {
            signum: signal.signal(signum, self.queue_signal)
            for signum in (*HANDLED_SIGNALS, signal.SIGCHLD)
        }

    def restore_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def queue_signal(self, signum: int, frame: object = None) -> None:
        """The only thing a signal handler does: remember the signal (the wakeup fd wakes us)."""
        self.events.append(signum)

    def request(self, signum: int) -> None:
        """Ask the loop to act as on ``signum``, from any thread (the library's ``shutdown``)."""
        self.events.append(signum)
        try:
            os.write(self.wake_w, b"\0")
        except OSError:
            pass

    def handle_events(self) -> None:
        while self.events:
            signum = self.events.popleft()
            if signum == signal.SIGCHLD:
                continue  # reaping happens every turn of the loop anyway
            log.info("received %s", signal.Signals(signum).name)
            if signum == signal.SIGTERM:
                if self.successor is not None and not self.stopping:
                    self.handed_over = True  # the new master is ready and asks us to go
                    log.info("the new master %d took over; stopping", self.successor.pid)
                self.begin_stop(graceful=not self.stopping)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.begin_stop(graceful=False)
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self.scale(+1 if signum == signal.SIGTTIN else -1)
            elif signum == signal.SIGHUP:
                self.begin_reload()
            elif signum == signal.SIGUSR1:
                log.info("nothing to reopen: logs go to stderr")
            elif signum == signal.SIGUSR2:
                self.begin_upgrade()

    def scale(self, delta: int) -> None:
        if self.stopping:
            return
        self.target, refused = pool.rescale(self.target, delta, self.config.pool_bound)
        if refused:
            log.warning("scale %+d %s", delta, refused)
        else:
            log.info("pool target is now %d workers", self.target)

    # ----------------------------------------------------------------- workers
    def manage_workers(self) -> None:
        """Fork or retire workers until the pool matches its target (forks wait out the
        crash-loop backoff)."""
        views = [self.view(w) for w in self.workers.values()]
        strategy = self.config.reload_strategy
        decision = pool.plan(self.target, self.generation, strategy, views)
        for pid in decision.retire:
            worker = self.workers[pid]
            self.retire(worker, "scaled down" if worker.generation == self.generation
                        else f"replaced by generation {self.generation}")  # fmt: skip
        if time.monotonic() < self.next_spawn_at:
            return
        for _ in range(decision.spawn):
            self.spawn()

    def view(self, worker: Worker) -> pool.WorkerView:
        """The pool's view of a worker: its record plus whether the scoreboard says idle."""
        idle = worker.ready and self.scoreboard is not None and self.scoreboard.is_idle(worker.slot)
        return pool.WorkerView(worker.pid, worker.slot, worker.generation, worker.spawned_at,
                               worker.ready, worker.retiring, idle)  # fmt: skip

    def adapt_pool(self) -> None:
        """--min-spare/--max-spare: once a second, move the target toward the idle band."""
        now = time.monotonic()
        if not self.next_adapt_at or now < self.next_adapt_at:
            return
        self.next_adapt_at = now + 1.0
        idle = sum(1 for w in self.workers.values() if self.view(w).idle)
        config = self.config
        target, self.adaptive_rate = pool.adapt(
            self.target, idle, config.min_spare, config.max_spare, config.pool_bound,
            self.adaptive_rate,
        )  # fmt: skip
        if target != self.target:
            log.info("adaptive: %d idle workers, pool target %d -> %d", idle, self.target, target)
            self.target = target

    def spawn(self) -> None:
        assert self.scoreboard is not None
        slot = pool.free_slot(w.slot for w in self.workers.values())
        if slot >= self.scoreboard.capacity:
            log.error("no free scoreboard slot (%d in use): not forking", len(self.workers))
            return
        self.scoreboard.claim(slot, 0, self.generation)
        spec = self.worker_spec(slot)
        process = WorkerProcess(worker_main, (spec,))
        # Block the worker's signals across the fork: the child unblocks them once its own
        # handlers are installed, so a TERM sent during boot is neither lost nor run by ours.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        worker = Worker(process, process.pid, slot, self.generation, time.monotonic())
        self.workers[worker.pid] = worker
        self.selector.register(process.sentinel, selectors.EVENT_READ, worker)
        log.debug("spawned worker %d (slot %d)", worker.pid, slot)

    def worker_spec(self, slot: int) -> WorkerSpec:
        config = self.config
        endpoints = [
            Endpoint(lst.sock, lst.kind, lst.spec.handler, lst.server) for lst in self.listeners
        ]
        return WorkerSpec(
            slot=slot,
            generation=self.generation,
            mode=config.worker_class,
            name=self.name,
            master_pid=os.getpid(),
            endpoints=endpoints,
            load_handler=self.worker_loader(),
            notify_fd=self.notify_w,
            inherited_fds=self.private_fds(),
            scoreboard=self.scoreboard,
            threads=config.threads,
            max_children=config.max_children,
            graceful_timeout=config.graceful_timeout,
            timeout=config.timeout,
            max_requests=pool.request_limit(
                config.max_requests, config.max_requests_jitter, _rand()
            ),
        )

    def worker_loader(self) -> Callable[[str | None], type]:
        """What a worker calls after the fork to get its handlers: the class the library was
        given, the classes the master preloaded, or a fresh import from disk, once per app
        (listeners sharing an app share its class, and its class attributes)."""
        loaded: dict[str | None, type] = dict(self.preloaded)
        if self.handler is not None:
            loaded[None] = self.handler
        default_app = self.config.app

        def load(app: str | None) -> type:
            key = None if app == default_app else app
            if key not in loaded:
                loaded[key] = load_handler(app or default_app, fresh=True)
            return loaded[key]

        return load

    def private_fds(self) -> list[int]:
        """The master's own fds a worker inherits and must close (see module docstring)."""
        fds = [self.wake_r, self.wake_w, self.notify_r, self.selector.fileno()]
        fds.extend(worker.process.sentinel for worker in self.workers.values())
        # Listeners a reload removed (or that only an older generation serves): a worker
        # holding one would keep it open, queueing connections that nobody ever accepts.
        serving = {lst.sock.fileno() for lst in self.listeners}
        others = [*self.closing, *(self.reload.previous_listeners if self.reload else [])]
        fds.extend({lst.sock.fileno() for lst in others} - serving)
        return fds

    def retire(self, worker: Worker, why: str) -> None:
        """Ask one worker to finish what it is doing and exit."""
        worker.retiring, worker.why_retired = True, why
        self.kill(worker, signal.SIGTERM)
        log.info("retiring worker %d (slot %d): %s", worker.pid, worker.slot, why)

    def kill(self, worker: Worker, signum: int) -> None:
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass  # already dead; reap_workers will collect it

    def read_notifications(self) -> None:
        """Read ``PID MESSAGE`` lines the workers wrote to the notify pipe."""
        data = _drain(self.notify_r)
        if not data:
            return
        lines = (self.notify_buffer + data).split(b"\n")
        self.notify_buffer = lines.pop()
        for line in lines:
            pid_text, _, message = line.partition(b" ")
            worker = self.workers.get(int(pid_text)) if pid_text.isdigit() else None
            if worker is None:
                continue
            if message == b"ready":
                self.on_ready(worker)
            elif message.startswith(b"recycle"):
                # The worker stops taking requests by itself; its replacement forks now.
                worker.retiring, worker.why_retired = True, "recycled"
                log.info("worker %d (slot %d) recycling after %s requests (--max-requests)",
                         worker.pid, worker.slot, message.split()[-1].decode())  # fmt: skip

    def on_ready(self, worker: Worker) -> None:
        worker.ready = True
        if worker.generation == self.generation:
            self.boot_failures = 0
        log.debug("worker %d (slot %d) ready", worker.pid, worker.slot)
        if not self.ready.is_set() and sum(w.ready for w in self.workers.values()) >= self.target:
            log.info("ready: %d workers (%s)", self.target, self.config.worker_class)
            self.ready.set()
            self.retire_predecessor()

    def reap_workers(self) -> None:
        """Collect every worker that exited: by its own pid, never ``waitpid(-1)``."""
        exited, self.exited = self.exited, []
        for worker in exited:
            process = worker.process
            exitcode = process.join()  # by pid; the pidfd fired, so this does not block
            self.selector.unregister(process.sentinel)
            del self.workers[worker.pid]
            process.close()
            self.on_exit(worker, exitcode)

    def on_exit(self, worker: Worker, exitcode: int | None) -> None:
        """Log the death; count crashes and boot failures; free the scoreboard slot."""
        assert self.scoreboard is not None
        served = self.scoreboard.view(worker.slot).requests
        self.scoreboard.release(worker.slot)
        how = f"{pool.describe_exit(exitcode)} after {served} requests"
        if worker.retiring or self.stopping:
            log.info("worker %d (slot %d) %s", worker.pid, worker.slot, how)
            return
        log.warning("worker %d (slot %d) died: %s", worker.pid, worker.slot, how)
        lived = time.monotonic() - worker.spawned_at
        self.crashes = pool.count_crash(self.crashes, lived)
        self.next_spawn_at = time.monotonic() + pool.respawn_delay(self.crashes, _rand())
        if worker.ready:
            return
        if self.reload is not None and worker.generation == self.generation:
            self.abort_reload(
                f"worker {worker.pid} of the new generation {how} before it was ready"
            )
            return
        self.boot_failures += 1
        if not self.ready.is_set() and self.boot_failures >= MAX_BOOT_FAILURES:
            log.error("workers cannot boot: %d died before they were ready (last: %s); "
                      "stopping", self.boot_failures, how)  # fmt: skip
            self.exit_code = EXIT_APP
            self.begin_stop(graceful=False)

    def murder_workers(self) -> None:
        """Kill workers whose request ran past ``--timeout``: stack dump, TERM, then KILL.

        Fork-mode workers are left out: each kills its own overdue children, the requests.
        """
        assert self.scoreboard is not None
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.kill_at:
                if now >= worker.kill_at:
                    log.error("worker %d (slot %d) still alive %.1fs after TERM: KILL",
                              worker.pid, worker.slot, KILL_GRACE)  # fmt: skip
                    self.kill(worker, signal.SIGKILL)
                    worker.kill_at = float("inf")
                continue
            if self.config.worker_class == "fork" or not self.config.timeout:
                continue
            lane = self.scoreboard.view(worker.slot).oldest_request()
            if lane is None or not pool.overdue(lane.started, now, self.config.timeout):
                continue
            log.error(
                "worker %d (slot %d): request from %s has run %.1fs, past --timeout %gs; "
                "dumping its stack, then TERM", worker.pid, worker.slot, lane.client,
                now - lane.started, self.config.timeout,
            )  # fmt: skip
            self.kill(worker, STACK_DUMP_SIGNAL)  # faulthandler writes it to our shared stderr
            self.kill(worker, signal.SIGTERM)
            worker.retiring, worker.why_retired = True, "timed out"
            worker.kill_at = now + KILL_GRACE

    def status(self) -> dict:
        """What ``ctl status`` (and the library's ``status()``) report: one place to read."""
        now = time.monotonic()
        workers = []
        for worker in sorted(list(self.workers.values()), key=lambda w: w.slot):  # any thread
            view: SlotView | None = self.scoreboard.view(worker.slot) if self.scoreboard else None
            oldest = view.oldest_request() if view else None
            workers.append({
                "pid": worker.pid, "slot": worker.slot, "generation": worker.generation,
                "state": view.state if view else "unknown",
                "requests": view.requests if view else 0,
                "request_age": round(now - oldest.started, 3) if oldest else None,
                "client": oldest.client if oldest else None,
                "busy_lanes": sum(1 for lane in view.lanes if lane.started > 0) if view else 0,
                "heartbeat_age": round(now - view.heartbeat, 3) if view else None,
                "retiring": worker.retiring,
            })  # fmt: skip
        return {
            "pid": self.pid, "name": self.name, "generation": self.generation,
            "mode": self.config.worker_class, "target": self.target,
            "listeners": [lst.uri for lst in self.listeners], "workers": workers,
        }  # fmt: skip

    # ----------------------------------------------------------------- stopping
    def begin_stop(self, graceful: bool) -> None:
        """Signal every worker: TERM lets in-flight requests finish, QUIT ends them now."""
        if self.stopping and not self.stop_graceful:
            return  # a quick stop is already under way
        self.stopping, self.stop_graceful = True, graceful
        grace = self.config.graceful_timeout if graceful else QUICK_STOP_GRACE
        self.stop_deadline = time.monotonic() + grace
        log.info("%s stop: %d workers, up to %.1fs", "graceful" if graceful else "quick",
                 len(self.workers), grace)  # fmt: skip
        for worker in self.workers.values():
            self.kill(worker, signal.SIGTERM if graceful else signal.SIGQUIT)

    def enforce_stop_deadline(self) -> None:
        if time.monotonic() < self.stop_deadline:
            return
        pids = sorted(self.workers)
        log.error("stop timed out: killing workers %s", ", ".join(map(str, pids)))
        for worker in self.workers.values():
            self.kill(worker, signal.SIGKILL)
        if self.stop_graceful and self.exit_code == EXIT_OK:
            self.exit_code = EXIT_RUNTIME
        self.stop_deadline = float("inf")  # the kills are sent; now just reap them

    def cleanup(self) -> None:
        """Whatever happened, leave nothing behind: no worker, no fd, no socket file, no pidfile."""
        for worker in self.workers.values():
            self.kill(worker, signal.SIGKILL)
            worker.process.join()
            worker.process.close()
        self.workers.clear()
        if self.previous_handlers:
            self.restore_signal_handlers()
        for listener in [*self.listeners, *self.closing]:
            listener.close(unlink=not self.handed_over)  # the new master serves those files
        self.selector.close()
        for fd in (self.wake_r, self.wake_w, self.notify_r, self.notify_w):
            os.close(fd)
        if self.scoreboard is not None:
            self.scoreboard.close()
        path = self.config.pidfile
        if path and (self.successor is not None or self.handed_over):
            path += pidfile.OLD_SUFFIX  # ours moved aside when the upgrade began
        pidfile.remove(path, self.pid)
        log.info("master %d exiting (code %d)", self.pid, self.exit_code)
        self.stopped.set()

    # ----------------------------------------------------------------- app and pidfile
    def check_app(self, config: Config) -> None:
        """Import every handler once in the master, fresh from disk, so that a bad app fails
        here (exit 3 at start, a refused reload later) before any fork. With ``--preload`` the
        workers use these very classes."""
        apps: list[str | None] = [] if self.handler is not None else [None]
        apps += [spec.handler for spec in config.binds if spec.handler]
        preloaded: dict[str | None, type] = {}
        for app in apps:
            preloaded[app] = load_handler(app or config.app, fresh=True)
        self.preloaded = preloaded if config.preload else {}

    def open_listeners(self, config: Config, keep: list[Listener] = ()) -> list[Listener]:
        """The listeners ``config`` asks for: those in ``keep`` with the same bind text as
        they are, inherited fds adopted (upgrade, systemd), the rest bound now."""
        texts = [spec.text for spec in config.binds]
        kept = {lst.spec.text: lst for lst in keep}
        inherited = handover.inherited_fds(os.environ, texts, os.getpid())
        for fd in handover.unused_fds(inherited, texts):
            os.close(fd)
        for name in (handover.ENV_FDS, "LISTEN_FDS", "LISTEN_PID"):
            os.environ.pop(name, None)  # adopted once; a later upgrade describes its own
        opened: list[Listener] = []
        try:
            for spec in config.binds:
                if spec.text in kept:
                    opened.append(kept[spec.text])
                elif spec.text in inherited:
                    opened.append(adopt(spec, inherited[spec.text]))
                else:
                    opened.append(bind(spec, config.backlog, config.reuse_port))
        except ClusterError:
            for listener in opened:
                if listener.spec.text not in kept:
                    listener.close()
            raise
        return opened


def _lanes(config: Config) -> int:
    """Requests one worker can run at once: the lanes of its scoreboard slot."""
    return {"thread": config.threads, "fork": config.max_children}.get(config.worker_class, 1)


def _rand() -> float:
    """A float in [0, 1) without importing ``random``: that module reseeds itself in every
    forked child (2.5 kB from the kernel each time), a cost each fork-mode request would pay."""
    return int.from_bytes(os.urandom(4), "little") / 2**32


def _drain(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)

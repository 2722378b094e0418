"""The master: binds the listeners once, forks the workers, and supervises them in one loop.

Read ``Master.run`` top to bottom; it is the whole life of the process:

    bind -> generation 1 -> loop { sleep until the earliest deadline or an event;
                                   read what workers said; dispatch the commands;
                                   reap the dead; put down the hung; fix the pool }
         -> stop: signal the workers, wait (bounded), close listeners, exit

Who owns what. The master owns its loop plumbing (the selector, the wakeup pipe, the notify
pipe's read end, the command inbox) and one object per part of its state, each answering
``next_deadline()`` so that ``sleep`` is the minimum over them:

- the generations (``cluster.generation``): ``current``, the ``incoming`` one during a reload,
  and the ``draining`` older ones; each owns its config, workers and scoreboard;
- ``stop`` (``cluster.stop``), from the first TERM, INT or QUIT on;
- ``successor`` (``cluster.upgrade``), the new master of a USR2, and ``predecessor``, the old
  master when a USR2 started us;
- each generation's ``backoff`` (``cluster.backoff``): per slot, for workers that failed on
  their own, and for the whole pool when the kernel refuses a fork;
- ``hung`` (``workers.runtime.escalation``), the workers being put down, and ``watchdog``
  (``cluster.watchdog``), which finds them;
- ``adaptive`` (``cluster.pool``), the --min-spare/--max-spare pacing;
- ``health`` (``cluster.health``), the operator's drain, and ``delay`` (``cluster.stop``), a
  TERM's --drain-delay, during which the master serves on and its health says draining.

Every request to act is a ``cluster.commands.Command``: a signal's byte on the wakeup pipe
(``signal.set_wakeup_fd`` writes one byte per signal, so a burst of five TTINs is five
commands), a library call, or (later) a control-socket line. ``dispatch`` runs one method per
command. The decisions are pure functions elsewhere: ``pool.plan`` (what to fork and retire),
``exits.judge`` (what an exit means), ``commands.target_after`` (where scaling lands).

A worker closes every fd of the master's it inherited except its listener copies and the
notify pipe's write end (``private_fds``).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace

from cluster import appcheck, commands, exits, handover, heap, pidfile, pool
from cluster.app import import_builtins, load_handler
from cluster.commands import Command, Refused, Reply
from cluster.config import Config, flag
from cluster.control import ControlServer, open_control
from cluster.errors import EXIT_APP, EXIT_OK, EXIT_RUNTIME, ClusterError, ConfigError
from cluster.generation import Generation, Generations, Worker
from cluster.health import Health, HealthServer, idle_share, state_of
from cluster.listeners import Listener, adopt, bind, parse_bind
from cluster.loopserver import LoopServer
from cluster.metrics import Accounts, MetricsServer, restart_reason
from cluster.notify import Notifier
from cluster.spawn import WorkerProcess, start_all
from cluster.stop import DrainDelay, Stop
from cluster.text import plural
from cluster.upgrade import BOOTING, SERVING, Predecessor, Successor
from cluster.watchdog import Watchdog, beat_period
from workers.runtime.access import ACCESS, ROLE, AccessLog, reopen_logs
from workers.runtime.client import CUT_IDLE_SIGNAL
from workers.runtime.entry import run as worker_main
from workers.runtime.entry import set_title
from workers.runtime.escalation import Escalation
from workers.runtime.privileges import Identity
from workers.runtime.spec import EXIT_CUT, HANDLED_SIGNALS

log = logging.getLogger("cluster.master")

LOOP_TICK = 1.0  # the longest the loop sleeps with nothing to do
METRICS_TEXT = "metrics="  # how an upgrade names the metrics endpoint's socket in CLUSTER_FDS
HEALTH_TEXT = "health="  # ... and the health endpoint's
# Settings of the master itself, which a reload does not change (an upgrade does).
MASTER_SETTINGS = ("control", "metrics", "health", "pidfile", "name", "log_format", "log_file",
                   "access_log", "access_log_format", "user", "group", "umask")  # fmt: skip
QUIET_COMMANDS = frozenset({"status", "config"})  # asked often (ctl top): logged at debug


class Master:
    """One master loop, used by ``cluster run`` and by the library API alike.

    ``listeners`` may be given already bound (the library binds in its constructor, as
    socketserver does); otherwise ``run`` binds ``config.bind``. ``handler`` overrides
    ``config.app`` with a class the caller already holds. ``upgradable`` is for the command
    line only: an upgrade re-executes our command line, which inside a host program would
    be the host's.
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
        upgradable: bool = False,
    ) -> None:
        self.first_config = config
        self.given_listeners = listeners or []
        self.handler = handler
        self.reread_config = reread_config  # HUP: the config file and flags, read afresh
        self.install_signals = (
            install_signals and threading.current_thread() is threading.main_thread()
        )
        self.set_title = set_title
        self.upgradable = upgradable and self.install_signals
        self.pid = os.getpid()
        self.name = config.name or config.app
        # --user/--group: whom every worker (and the app check) runs as, fixed for our life
        # like the log files the master gave that user; an upgrade takes a new value.
        self.identity = config.identity
        self.started_at = time.monotonic()
        # Loop plumbing.
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.selector.register(self.notify_r, selectors.EVENT_READ, "notify")
        self.notify_buffer = b""
        self.signals: list[int] = []  # signal numbers read off the wakeup pipe, in order
        self.inbox: collections.deque[tuple[Command, Reply | None]] = collections.deque()
        self.inbox_lock = threading.Lock()
        self.closed = False  # the loop is over: commands are answered at once
        self.exited: list[Worker] = []  # workers whose sentinel fired, to be reaped
        # The parts.
        self.gens = Generations()  # current, incoming, draining: the one owner
        self.stop: Stop | None = None
        self.delay: DrainDelay | None = None  # a TERM's --drain-delay, before the stop
        self.successor: Successor | None = None
        self.predecessor = Predecessor.from_environ(os.environ)
        self.hung = Escalation()
        self.watchdog = Watchdog()
        self.adaptive: pool.Adaptive | None = None
        self.folded: Command | None = None  # a reload asked for while one was booting
        self.app_check: appcheck.Check | None = None  # a reload's check of the app, under way
        # A failed rolling reload's ready workers, serving in the places of the old workers it
        # had retired until the current generation is whole again (abort_reload).
        self.standing_in: list[Worker] = []
        self.pidfile_claimed = False  # ours to remove at exit
        self.control: ControlServer | None = None  # --control: the control socket
        self.metrics: MetricsServer | None = None  # --metrics: the Prometheus endpoint
        self.health = Health.from_environ(os.environ, time.monotonic())  # the operator's drain
        self.health_server: HealthServer | None = None  # --health, once it may answer
        self.health_listener: Listener | None = None  # --health's socket, bound or inherited
        self.accounts = Accounts()  # gone workers' numbers, restarts by reason
        self.notifier = Notifier.from_environ(os.environ)  # systemd's NOTIFY_SOCKET, if any
        # Outcome.
        self.exit_code = EXIT_OK
        self.ready = threading.Event()  # set once the first generation is serving
        self.stopped = threading.Event()
        self.previous_handlers: dict[int, object] = {}  # a host program's, restored at exit
        self.previous_wakeup_fd = -1

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        """Serve until stopped; return the exit code (0 clean, 1 workers had to be killed).

        A ClusterError at start (a bad app, a bind that fails) propagates for the caller to
        print as its one line, with no log line of ours after it."""
        started = False
        try:
            self.start()
            started = True
            while not (self.stop and not any(self.gens.workers())):
                self.sleep()
                self.read_notifications()
                self.handle_commands()  # before reaping: Ctrl-C kills workers and us at once
                self.reap_workers()
                now = time.monotonic()
                self.kill_past_grace(now)
                for server in self.loop_servers():
                    server.expire(now)
                if self.app_check is not None:
                    self.app_check.expire(now)
                self.notifier.ping(now)
                if self.delay is not None and self.delay.over(now):
                    self.end_delay()
                if self.stop:
                    self.enforce_stop(now)
                    continue
                self.put_down_hung(now)
                self.adapt_pool(now)
                self.manage_workers(now)
                self.watch_generations(now)
                self.watch_successor(now)
        except BaseException:
            if started and self.exit_code == EXIT_OK:
                self.exit_code = EXIT_RUNTIME  # a bug of ours: the last line must not say 0
            raise
        finally:
            self.cleanup(log_exit=started)
        return self.exit_code

    def start(self) -> None:
        """Load the app (a bad one fails here, before any fork), bind, and fork the pool."""
        config = self.first_config
        if self.upgradable:  # held until install_signal_handlers (HELD_DURING_BOOT)
            signal.pthread_sigmask(signal.SIG_BLOCK, handover.HELD_DURING_BOOT)
        if config.umask_bits is not None:  # the command line set it already; the library here
            os.umask(config.umask_bits)
        predecessor = self.predecessor.pid if self.predecessor else None
        pidfile.claim(config.pidfile, self.pid, predecessor)  # before binding: a bad one is ours
        self.pidfile_claimed = True
        preloaded = self.check_app(config)
        inherited = {} if self.given_listeners else self.take_inherited(config)
        listeners = self.given_listeners or self.open_listeners(config, inherited=inherited)
        for listener in listeners:
            log.info("listening on %s", listener.uri)
        if config.metrics:
            self.open_metrics(config, inherited.get(METRICS_TEXT + config.metrics))
        if config.health:
            self.open_health(config, inherited.get(HEALTH_TEXT + config.health))
        if config.access_log:
            # Before any fork: every worker appends to it.
            ACCESS.log = open_access_log(config, self.identity)
        if config.control:
            sock = open_control(config.control, taking_over=self.predecessor is not None)
            self.control = ControlServer(sock, self.selector, config.control, self.dispatch)
            log.info("control socket on unix:%s", config.control)
        self.gens.current = Generation(self.gens.next_number(), config, listeners, preloaded,
                                       self.handler)  # fmt: skip
        ROLE.generation = 1
        if self.set_title:
            set_title(f"cluster: master [{self.name}]")
        if self.install_signals:
            self.install_signal_handlers()
        log.info("master %d starting %s (%s)", self.pid, plural(self.current.target, "worker"),
                 config.worker_class)  # fmt: skip
        if config.min_spare or config.max_spare:
            self.adaptive = pool.Adaptive(time.monotonic())
        self.manage_workers(time.monotonic())

    def sleep(self) -> None:
        """Wait for a signal, a command, a worker exit or message, or the next deadline."""
        now = time.monotonic()
        deadlines = [now + LOOP_TICK, self.hung.next_deadline()]
        if self.current is not None:
            deadlines.append(self.gens.steered().backoff.next_deadline(now))
        for part in (self.stop, self.delay, self.successor, self.adaptive, self.notifier,
                     self.app_check, *self.loop_servers()):  # fmt: skip
            if part is not None:
                deadlines.append(part.next_deadline())
        if not self.stop:
            deadlines.append(self.watchdog.next_deadline())
        timeout = max(0.0, min(deadlines) - now)
        for key, mask in live_events(self.selector, self.selector.select(timeout)):
            if key.data == "wake":
                self.signals.extend(_drain(self.wake_r))
            elif isinstance(key.data, Worker):
                self.exited.append(key.data)
            elif key.data == "successor-ready":
                self.on_successor_message()
            elif key.data == "successor-exit":
                self.on_successor_exit()
            elif callable(key.data):  # a loop server's listener or connection, the app check
                key.data(mask)

    @property
    def config(self) -> Config:
        """The config in force: the current generation's (the first one's before it exists)."""
        return self.current.config if self.current else self.first_config

    @property
    def current(self) -> Generation | None:
        return self.gens.current

    @property
    def incoming(self) -> Generation | None:
        return self.gens.incoming

    # ----------------------------------------------------------------- commands
    def install_signal_handlers(self) -> None:
        """Have every signal of ours write its number to the wakeup pipe; remember what was
        there, for a host program (the library API in a main thread) gets its own handlers
        back when we stop. The handler itself does nothing: the byte is the message."""
        self.previous_wakeup_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.previous_handlers = {
            signum: signal.signal(signum, _only_wake)
            for signum in (*HANDLED_SIGNALS, signal.SIGCHLD)
        }
        if self.upgradable:  # held since the exec of an upgrade, or the start (HELD_DURING_BOOT)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handover.HELD_DURING_BOOT)

    def restore_signal_handlers(self) -> None:
        """A host program's handlers back (the library). The command line's master instead
        ignores the signals from here on: it is on its way out, and a late TERM must not
        turn a clean exit into death by SIGTERM."""
        signal.set_wakeup_fd(self.previous_wakeup_fd)
        for signum, handler in self.previous_handlers.items():
            if self.upgradable:
                handler = signal.SIG_IGN if signum != signal.SIGCHLD else signal.SIG_DFL
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def submit(self, command: Command) -> Reply:
        """Queue ``command`` from any thread (the library, the control socket); the reply
        comes once the loop has handled it, or at once if the loop is over."""
        reply = Reply()
        with self.inbox_lock:
            if self.closed:
                reply.answer({"ok": False, "error": "the master is not running"})
                return reply
            self.inbox.append((command, reply))
        try:
            os.write(self.wake_w, b"\0")  # 0 is no signal: it only wakes the loop
        except OSError:
            pass
        return reply

    def handle_commands(self) -> None:
        """Dispatch the signals read off the wakeup pipe, then the queued commands."""
        signums, self.signals = self.signals, []
        for signum in signums:
            if command := commands.from_signal(signum):
                self.dispatch(command)
        while self.inbox:
            command, reply = self.inbox.popleft()
            result = self.dispatch(command)
            if reply is not None:
                reply.answer(result)

    def dispatch(self, command: Command) -> dict:
        """Run the one method for ``command``; a refusal is logged and answered, not raised."""
        log.log(logging.DEBUG if command.name in QUIET_COMMANDS else logging.INFO,
                "command: %s", command)  # fmt: skip
        handler = getattr(self, "do_" + command.name.replace("-", "_"))
        try:
            result = handler(command) or {}
        except Refused as why:
            log.warning("%s refused: %s", command.name, why)
            return {"ok": False, "error": f"{command.name} refused: {why}"}
        except OSError as err:  # out of fds or memory half-way: the command fails, we serve on
            log.error("%s failed: %s", command.name, err.strerror or err)
            return {"ok": False, "error": f"{command.name} failed: {err.strerror or err}"}
        result.setdefault("ok", True)  # a handler that failed after trying says so itself
        return result

    def do_status(self, command: Command) -> dict:
        return self.status()

    def do_config(self, command: Command) -> dict:
        return {"config": asdict(self.config)}

    def do_scale(self, command: Command) -> dict:
        if self.stop:
            raise Refused("stopping")
        generation = self.gens.steered()
        generation.target = commands.target_after(command, generation.target,
                                                  generation.config.pool_bound)  # fmt: skip
        log.info("pool target is now %s", plural(generation.target, "worker"))
        self.notifier.send(STATUS=self.status_line())
        return {"target": generation.target}

    do_incr = do_decr = do_scale

    def do_stop(self, command: Command) -> None:
        """TERM: a graceful stop (after the --drain-delay, if any); during the delay, the
        graceful stop at once; during a graceful stop an operator already asked for, a quick
        one."""
        stop, reason = self.stop, command.origin or "asked"
        if stop is None:
            if self.delay is not None:
                log.info("drain delay cut short (%s): stopping gracefully now", reason)
                self.end_delay()
            elif not self.begin_delay(reason):
                self.begin_stop(graceful=True, reason=reason)
        elif stop.graceful and stop.handover:
            stop.reason = command.origin or "asked"  # the operator's own first stop: still graceful
            stop.handover = False
            log.info("already stopping gracefully after the handover; a second stop is quick")
        elif stop.graceful:
            self.begin_stop(graceful=False, reason=command.origin or "asked")

    def do_quit(self, command: Command) -> None:
        self.begin_stop(graceful=False, reason=command.origin or "asked")

    def do_drain(self, command: Command) -> dict:
        """Out of the balancer's rotation: the health says draining; nothing else changes."""
        if self.health.drain(time.monotonic()):
            log.info("drained (%s): health says draining until undrain", command.origin or "asked")
        return {"health": self.health_report()}

    def do_undrain(self, command: Command) -> dict:
        if self.health.undrain():
            log.info("undrained (%s): health says %s", command.origin or "asked",
                     self.health_report()["state"])  # fmt: skip
        return {"health": self.health_report()}

    def do_reopen_logs(self, command: Command) -> dict:
        """USR1: reopen our log files (logrotate moved them) and have every worker do so."""
        reopened, failed = reopen_logs()  # first: with --user, the files workers may open
        for worker in self.gens.workers():
            _send(worker.pid, signal.SIGUSR1)
        if reopened or not failed:
            log.info("reopened %s", ", ".join(reopened) or "nothing (logs go to stderr)")
        for failure in failed:
            log.error("cannot reopen %s; writing on to the old file", failure)
        if failed:
            why = "; ".join(failed)
            return {"ok": False, "reopened": reopened, "error": f"cannot reopen {why}"}
        return {"reopened": reopened}

    # ----------------------------------------------------------------- reload
    def do_reload(self, command: Command) -> dict:
        """Re-read the config, check the app, open new binds, and start a new generation.

        Anything that fails here leaves the running generation untouched and serving.
        """
        current = self.current
        assert current is not None
        if self.stop or self.delay:
            raise Refused("stopping")
        if self.incoming is not None or self.app_check is not None:
            if self.folded is None:
                what = (f"generation {self.incoming.number} is still booting" if self.incoming
                        else "the app's check is under way")  # fmt: skip
                log.info("reload: %s; folding this reload into one that starts after it", what)
            self.folded = command
            return {"folded": True, "after": "boot" if self.incoming else "check"}
        if current.config.preload and self.upgradable:
            log.info("reload with --preload: the app lives in the master, so a fresh master "
                     "takes over, as on USR2")  # fmt: skip
            return self.do_upgrade(command)
        try:
            config = self.reread_config() if self.reread_config else current.config
            logging.getLogger().setLevel(config.log_level.upper())  # --log-level, re-applied
            apps = self.apps_to_check(config)
            if apps:  # beside the loop: the master serves on while the app imports
                within = max(config.graceful_timeout, appcheck.LEAST_TIME)
                self.app_check = appcheck.Check(apps, within, self.identity, self.selector,
                                                lambda error: self.checked(config, error))  # fmt: skip
                return {"generation": self.gens.last_number + 1, "checking": True}
            return self.begin_generation(config, self.check_app(config))
        except ClusterError as err:
            return self.reload_failed(err)

    def checked(self, config: Config, error: str | None) -> None:
        """The reload's app check is over: on to the new generation, or the reason why not."""
        self.app_check = None
        if error is not None:
            self.reload_failed(error)
            if not error.startswith(appcheck.NOT_CHECKED):
                # the app failed to import: a worker forked now would import the same code
                self.hold_recycling(self.current, "the app on disk does not import")
        else:
            try:
                self.begin_generation(config, {})
            except ClusterError as err:
                self.reload_failed(err)
            except OSError as err:  # out of fds or memory half-way, as dispatch would say
                self.reload_failed(err.strerror or err)
        self.start_folded("the app's check")

    def start_folded(self, during: str) -> None:
        """Start the reload folded while another was under way, once none is: no new
        generation booting, no app check."""
        if self.incoming is None and self.app_check is None and self.folded is not None:
            folded, self.folded = self.folded, None
            log.info("reload: starting the reload folded during %s", during)
            self.dispatch(folded)

    def hold_recycling(self, generation: Generation | None, why: str) -> None:
        """Keep ``generation``'s workers past ``--max-requests`` until one of its new workers
        boots (``on_ready``): the app on disk fails, so a worker that recycled now would
        leave a place no replacement can take, and one after another the pool would empty."""
        if generation is None or not generation.config.max_requests:
            return
        if generation.scoreboard.hold_recycling(True):
            log.warning("generation %d: recycling (--max-requests) held until a new worker "
                        "boots: %s", generation.number, why)  # fmt: skip

    def reload_failed(self, why: object) -> dict:
        log.error("reload failed: %s; still serving generation %d", why, self.current.number)
        return {"ok": False, "error": f"reload failed: {why}"}

    def begin_generation(self, config: Config, preloaded: dict[str | None, type]) -> dict:
        """A reload's config and app passed: open its new binds and start its generation."""
        current = self.current
        listeners = self.open_listeners(config, keep=self.gens.listeners())
        fixed = [name for name in MASTER_SETTINGS
                 if getattr(config, name) != getattr(current.config, name)]  # fmt: skip
        if fixed:
            log.warning("reload: %s changed; the master's own settings take effect on an "
                        "upgrade (USR2)", ", ".join(flag(name) for name in fixed))  # fmt: skip
        known = {id(lst) for lst in self.gens.listeners()}
        for listener in listeners:
            if id(listener) not in known:
                log.info("listening on %s", listener.uri)
        self.gens.begin(Generation(self.gens.next_number(), config, listeners, preloaded,
                                   self.handler))  # fmt: skip
        self.notifier.reloading()
        log.info("reload: starting generation %d (%s, %s, %s)", self.incoming.number,
                 plural(self.incoming.target, "worker"), config.worker_class,
                 config.reload_strategy)  # fmt: skip
        return {"generation": self.incoming.number}

    def watch_generations(self, now: float) -> None:
        """Promote the incoming generation once it serves alone; give it up if a worker does
        not boot within the graceful timeout; drop the old ones whose last worker left."""
        incoming = self.incoming
        if incoming is not None:
            limit = incoming.config.graceful_timeout
            if any(not w.ready and now - w.spawned_at > limit for w in incoming):
                self.abort_reload(f"a worker of generation {incoming.number} was not ready "
                                  f"within {limit:g}s")  # fmt: skip
            elif self.gens.promotable():
                ROLE.generation = self.gens.promote().number
                self.notifier.send(READY=1, STATUS=self.status_line())
                self.check_ready()  # a reload during the first boot
        if self.standing_in and self.current.serving():
            for worker in self.standing_in:
                if worker.pid in worker.generation.workers:  # not gone meanwhile
                    self.retire(worker, f"generation {self.current.number} is whole again")
            self.standing_in = []
        for generation in self.gens.gone():
            self.drop(generation)
            heap.thaw()
            if self.gens.settled():
                log.info("reload complete: generation %d serving with %s",
                         self.gens.steered().number, plural(len(self.gens.steered().workers), "worker"))  # fmt: skip
        if self.folded is not None:  # (a turn of the loop: no string made for nothing)
            self.start_folded(f"generation {self.gens.steered().number}'s boot")

    def abort_reload(self, why: str) -> None:
        """The health gate: the new generation failed; put its workers down, stay on the old
        one. Its workers drain (quickly: KILL) like any older generation's, but for those of
        a rolling reload that already stand in for old workers it retired: they serve on
        until the old generation has refilled those places (its new workers import the
        app from disk, which may be the code that failed: the places may take a while)."""
        current = self.current
        assert current is not None
        missing = current.target - sum(1 for w in current if not w.retiring)
        for worker in self.gens.abort():
            worker.retiring = "reload failed"
            if worker.ready and len(self.standing_in) < missing:
                self.standing_in.append(worker)
            else:
                _send(worker.pid, signal.SIGKILL)
        log.error("reload failed: %s; still serving generation %d", why, current.number)
        self.hold_recycling(current, "the new generation's workers did not boot")
        if self.standing_in:
            log.info("reload failed: %s of the new generation serve on until generation %d "
                     "is whole again", plural(len(self.standing_in), "ready worker"),
                     current.number)  # fmt: skip
        self.notifier.send(READY=1, STATUS=f"reload failed; {self.status_line()}")

    def drop(self, generation: Generation) -> None:
        """A generation with no worker left: close the listeners only it served."""
        generation.close()
        still = {id(lst) for lst in self.gens.listeners()}
        for listener in generation.listeners:
            if id(listener) not in still:
                log.info("closed %s", listener.uri)
                listener.close()

    # ----------------------------------------------------------------- upgrade
    def do_upgrade(self, command: Command) -> dict:
        """Fork and exec a new master of our command line that inherits our listeners."""
        if self.stop or self.delay:
            raise Refused("stopping")
        if self.successor is not None:
            raise Refused(f"one is under way (new master {self.successor.pid})")
        if not self.upgradable:
            raise Refused("not running the command line (the library re-executes nothing)")
        pairs = [(lst.sock.fileno(), lst.spec.text) for lst in self.gens.listeners()]
        if self.metrics is not None:
            pairs.append((self.metrics.sock.fileno(), self.metrics.listener.spec.text))
        if self.health_listener is not None:
            pairs.append((self.health_listener.sock.fileno(), self.health_listener.spec.text))
        drained = self.health.drained_since
        drained_for = None if drained is None else time.monotonic() - drained
        try:
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        except OSError as err:
            raise Refused(f"cannot open the handover pipe: {err.strerror}") from None
        os.set_blocking(ready_r, False)
        pidfile.move_aside(self.config.pidfile, to_old=True)
        process = WorkerProcess(handover.exec_successor, (pairs, self.pid, ready_w, drained_for))
        try:
            _, err = self.fork([process], [])
            if err is not None:
                raise err
        except OSError as err:
            os.close(ready_r)
            pidfile.move_aside(self.config.pidfile, to_old=False)
            raise Refused(f"cannot fork the new master: {err.strerror}") from None
        finally:
            os.close(ready_w)  # the new master's end
        deadline = time.monotonic() + self.config.graceful_timeout
        self.successor = Successor(process, ready_r, deadline)
        self.selector.register(process.sentinel, selectors.EVENT_READ, "successor-exit")
        self.selector.register(ready_r, selectors.EVENT_READ, "successor-ready")
        log.info("upgrade: started new master %d; it takes over once its workers are ready",
                 process.pid)  # fmt: skip
        return {"new_master": process.pid}

    def on_successor_message(self) -> None:
        successor = self.successor
        assert successor is not None
        said = successor.read()
        if said is None:
            return
        self.selector.unregister(successor.ready_r)
        successor.close_pipe()
        if said == "ready":
            log.info("upgrade: the new master %d is ready; stopping gracefully", successor.pid)
            self.begin_stop(graceful=True, reason=f"handover to new master {successor.pid}",
                            handover=True)  # fmt: skip

    def on_successor_exit(self) -> None:
        successor = self.successor
        assert successor is not None
        self.forget_successor_fds(successor)
        code = successor.process.join()
        how = exits.describe(code)
        successor.close()
        if successor.state != BOOTING:
            if code != 0 and self.stop is not None and self.stop.handover:
                self.take_back(successor.pid, how)
            else:
                log.info("upgrade: the new master %d %s", successor.pid, how)
            return
        self.successor = None
        if successor.late:  # watch_successor said "upgrade failed" when it killed it
            log.info("upgrade: the new master %d %s", successor.pid, how)
        else:
            log.error("upgrade failed: new master %d %s; still serving", successor.pid, how)
        pidfile.move_aside(self.config.pidfile, to_old=False)

    def take_back(self, successor_pid: int, how: str) -> None:
        """The new master died after it said ready, while we still finish our requests: serve
        again rather than leave the host with nothing once we exit. The stop is called off;
        our workers, told to stop with it, finish and go as retiring ones, and new ones take
        their places (``manage_workers``); the pidfile, the control socket and the health
        endpoint come back to us, and systemd hears our pid again. (The listeners never left:
        we held them all along.)"""
        log.error("upgrade: the new master %d %s after the handover; taking the host back: "
                  "new workers start, the stopping ones finish", successor_pid, how)  # fmt: skip
        self.successor = None
        self.stop = None
        why = f"replaced by generation {self.current.number} (the upgrade fell through)"
        for worker in self.gens.workers():  # they have had their TERM, with the stop
            worker.retiring = worker.retiring or why
        pidfile.move_aside(self.config.pidfile, to_old=False)
        if self.health_server is not None:
            self.health_server.listen_again()
        if self.control is not None:
            self.take_back_control()
        self.notifier.send(READY=1, MAINPID=self.pid, STATUS=self.status_line())

    def take_back_control(self) -> None:
        """The control socket's path names the dead new master's socket: bind ours there
        again (the file of the one we had was replaced by the new master's)."""
        assert self.control is not None
        path = self.control.path
        self.control.close()  # its file is gone already: close() removes only our own
        self.control = None
        try:
            sock = open_control(path, taking_over=True)
        except ClusterError as err:
            log.error("%s; this master runs without its control socket", err)
            return
        self.control = ControlServer(sock, self.selector, path, self.dispatch)

    def watch_successor(self, now: float) -> None:
        successor = self.successor
        if successor is not None and successor.overdue(now):
            log.error("upgrade failed: new master %d not ready within %gs; killing it, still "
                      "serving", successor.pid, self.config.graceful_timeout)  # fmt: skip
            _send(successor.pid, signal.SIGKILL)  # its exit comes through on_successor_exit

    def forget_successor_fds(self, successor: Successor) -> None:
        for fd in successor.fds():
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    # ----------------------------------------------------------------- workers
    def manage_workers(self, now: float) -> None:
        """Fork or retire workers until the pool matches its target. A fork into a slot
        whose last worker failed on its own waits out that slot's backoff."""
        steered = self.gens.steered()
        views = [worker.view() for worker in self.gens.workers()]
        decision = pool.plan(steered.target, steered.number, steered.config.reload_strategy,
                             views)  # fmt: skip
        for worker in self.gens.workers():
            if worker.pid in decision.retire:
                self.retire(worker, "scaled down" if worker.generation is steered
                            else f"replaced by generation {steered.number}")  # fmt: skip
        slots = [slot for slot in steered.free_slots(decision.spawn)
                 if steered.backoff.allows(slot, now)]  # fmt: skip
        if slots:
            self.spawn(steered, slots, now)

    def adapt_pool(self, now: float) -> None:
        """--min-spare/--max-spare: once a second, move the target toward the idle band."""
        if self.adaptive is None:
            return
        generation = self.gens.steered()
        idle = sum(1 for w in generation if w.view().idle)
        config = generation.config
        target = self.adaptive.step(now, generation.target, idle, config.min_spare,
                                    config.max_spare, config.pool_bound)  # fmt: skip
        if target is not None and target != generation.target:
            log.info("adaptive: %d idle workers, pool target %d -> %d", idle, generation.target,
                     target)  # fmt: skip
            generation.target = target

    def spawn(self, generation: Generation, slots: list[int], now: float) -> bool:
        """Fork workers of ``generation`` into ``slots``, back to back: every spec is built
        before the first fork and the bookkeeping waits for the last (``spawn.start_all``
        says why). False if the kernel refused (no process or fd left): logged and retried
        with backoff, the slots not forked are released, and the master serves on with the
        workers it has."""
        config = generation.config
        inherited = self.private_fds(generation)  # each new pidfd joins it: later siblings close it
        beat_every = beat_period(config.timeout)
        processes = []
        for slot in slots:
            generation.scoreboard.claim(slot, 0, generation.number)
            limit = pool.request_limit(config.max_requests, config.max_requests_jitter, _rand())
            spec = generation.spec(slot, self.notify_w, inherited, limit, self.name, beat_every,
                                   self.identity)  # fmt: skip
            processes.append(WorkerProcess(worker_main, (spec,)))
        started, err = self.fork(processes, inherited)
        for process, slot in zip(started, slots, strict=False):
            generation.backoff.started()
            worker = generation.add(process, slot, now)
            self.selector.register(process.sentinel, selectors.EVENT_READ, worker)
            log.debug("spawned worker %d (slot %d, generation %d)", worker.pid, slot,
                      generation.number)  # fmt: skip
        if err is None:
            return True
        for slot in slots[len(started) :]:
            generation.scoreboard.release(slot)
        wait = generation.backoff.start_failed(now, _rand())
        log.error("cannot start a worker: %s; %d of %d running, retrying in %.1fs",
                  err.strerror or err, len(generation.workers), generation.target, wait)  # fmt: skip
        return False

    def fork(self, processes: list[WorkerProcess],
             inherited: list[int]) -> tuple[list[WorkerProcess], OSError | None]:  # fmt: skip
        """Start ``processes`` (``spawn.start_all``) with our signals blocked across the forks:
        each child unblocks them once its own handlers are installed, so a TERM sent during
        its boot is neither lost nor run by our handler in the child."""
        heap.freeze()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            return start_all(processes, inherited)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def private_fds(self, generation: Generation) -> list[int]:
        """The master's own fds a worker of ``generation`` inherits and must close: the loop's
        pipes and selector, every pidfd, the upgrade's pipes, and the listeners that only
        other generations serve (a worker holding one would keep it open, queueing
        connections that nobody ever accepts)."""
        fds = [self.wake_r, self.wake_w, self.notify_r, self.selector.fileno()]
        fds.extend(worker.process.sentinel for worker in self.gens.workers())
        if self.successor is not None:
            fds.extend(self.successor.fds())
        if self.predecessor is not None:
            fds.extend(self.predecessor.fds())
        for server in self.loop_servers():
            fds.extend(server.fds())
        if self.app_check is not None:
            fds.extend(self.app_check.fds())
        if self.health_listener is not None:
            fds.append(self.health_listener.sock.fileno())  # also before it is served
        fds.extend(self.notifier.fds())
        ours = {lst.sock.fileno() for lst in generation.listeners}
        fds.extend({lst.sock.fileno() for lst in self.gens.listeners()} - ours)
        return fds

    def retire(self, worker: Worker, why: str) -> None:
        """Ask one worker to finish what it is doing and exit."""
        worker.retiring = why
        _send(worker.pid, signal.SIGTERM)
        log.info("retiring worker %d (slot %d): %s", worker.pid, worker.slot, why)

    def read_notifications(self) -> None:
        """Read ``PID MESSAGE`` lines the workers wrote to the notify pipe."""
        data = _drain(self.notify_r)
        if not data:
            return
        lines = (self.notify_buffer + data).split(b"\n")
        self.notify_buffer = lines.pop()
        for line in lines:
            pid_text, _, message = line.partition(b" ")
            worker = self.gens.find(int(pid_text)) if pid_text.isdigit() else None
            if worker is None:
                continue
            if message == b"ready":
                self.on_ready(worker)
            elif message == b"stop":  # server.shutdown() in a handler
                self.dispatch(commands.make("stop", origin=f"worker {worker.pid}"))
            elif message.startswith(b"recycle"):
                # The worker stops taking requests by itself; its replacement forks now.
                worker.retiring = "recycled"
                log.info("worker %d (slot %d) recycling after %s requests (--max-requests)",
                         worker.pid, worker.slot, message.split()[-1].decode())  # fmt: skip

    def on_ready(self, worker: Worker) -> None:
        worker.ready = True
        worker.generation.boot_failures = 0
        if worker.generation.scoreboard.hold_recycling(False):
            log.info("worker %d (slot %d) booted: the workers of generation %d recycle "
                     "again (--max-requests)", worker.pid, worker.slot,
                     worker.generation.number)  # fmt: skip
        log.debug("worker %d (slot %d) ready", worker.pid, worker.slot)
        self.check_ready()

    def check_ready(self) -> None:
        """Announce, once, that the first generation to serve is up; never once a stop began
        (workers that finish booting during it must not tell systemd or the log "ready")."""
        current = self.current
        if self.ready.is_set() or self.stop is not None or current is None or not current.serving():
            return
        log.info("ready: %s (%s)", plural(current.target, "worker"), current.mode.name)
        self.ready.set()
        self.serve_health()  # an upgrade's new master answers from now on, beside the old
        upgrade = {"MAINPID": self.pid} if self.predecessor is not None else {}
        self.notifier.send(READY=1, STATUS=self.status_line(), **upgrade)
        if self.predecessor is not None:
            self.predecessor.announce_ready()

    def reap_workers(self) -> None:
        """Collect every worker that exited: by its own pid, never ``waitpid(-1)``."""
        exited, self.exited = self.exited, []
        for worker in exited:
            process = worker.process
            exitcode = process.join()  # by pid; the pidfd fired, so this does not block
            self.selector.unregister(process.sentinel)
            del worker.generation.workers[worker.pid]
            process.close()
            self.hung.forget(worker.pid)
            self.watchdog.forget(worker.pid)
            self.on_exit(worker, exitcode)

    def on_exit(self, worker: Worker, exitcode: int | None) -> None:
        """Log the death and act on what it means (``exits.judge``); free its slot."""
        generation = worker.generation
        served = generation.scoreboard.view(worker.slot).requests
        self.accounts.absorb(generation, worker.slot)
        generation.scoreboard.release(worker.slot)
        now = time.monotonic()
        verdict = exits.judge(exits.ExitFacts(
            exitcode=exitcode, ready=worker.ready, retiring=bool(worker.retiring),
            stopping=self.stop is not None, lived=now - worker.spawned_at,
            incoming=generation is self.incoming, boot_failures=generation.boot_failures,
            never_ready=not self.ready.is_set(),
        ))  # fmt: skip
        how = f"{exits.describe(exitcode)} after {served} requests"
        if self.stop is None:
            self.accounts.restarts[restart_reason(worker.retiring, verdict.kind)] += 1
        if verdict.expected:
            log.info("worker %d (slot %d) %s", worker.pid, worker.slot, how)
            if self.stop and self.stop.graceful and exitcode == EXIT_CUT:
                self.exit_code = EXIT_RUNTIME  # it had to cut requests short (thread mode)
            return
        lived = now - worker.spawned_at
        if verdict.kind == exits.RELOAD_FAILED:
            then = "giving the reload up"
        elif verdict.backoff:
            wait = generation.backoff.failed(worker.slot, lived, now, _rand())
            then = f"respawn in {wait:.1f}s" if wait else "respawning"
        else:
            then = "replacing it now"
        log.warning("worker %d (slot %d) died: %s, %.1fs old (%s); %s", worker.pid,
                    worker.slot, how, lived, verdict.kind, then)  # fmt: skip
        if verdict.kind == exits.RELOAD_FAILED:
            self.abort_reload(f"worker {worker.pid} of the new generation {how} before it was "
                              "ready")  # fmt: skip
        elif verdict.kind in (exits.BOOT_FAILURE, exits.CANNOT_BOOT):
            generation.boot_failures += 1
            if generation is self.current:
                self.hold_recycling(generation, f"worker {worker.pid} did not boot")
        if verdict.kind == exits.CANNOT_BOOT:
            log.error("workers cannot boot: %d died before they were ready (last: %s); "
                      "stopping", generation.boot_failures, how)  # fmt: skip
            self.exit_code = EXIT_APP
            self.begin_stop(graceful=False, reason="workers cannot boot")

    def put_down_hung(self, now: float) -> None:
        """Workers the watchdog names (a request past ``--timeout``, a silent idle worker, a
        boot past ``--timeout``): stack dump and TERM now, KILL after the grace
        (``kill_past_grace``), a replacement at once."""
        for hung in self.watchdog.scan(self.gens.workers(), now):
            worker = hung.worker
            if worker.pid in self.hung:
                continue
            log.error("worker %d (slot %d): %s; dumping its stack, then TERM", worker.pid,
                      worker.slot, hung.why)  # fmt: skip
            if worker.ready:  # a boot that hangs stays a boot failure (backoff, health gate)
                worker.retiring = "hung"
            for signum in self.hung.begin(worker.pid, now):  # faulthandler writes to our stderr
                _send(worker.pid, signum)
        for worker in self.watchdog.idle:
            log.debug("worker %d (slot %d): a connection idle past --keep-alive; cutting it",
                      worker.pid, worker.slot)  # fmt: skip
            _send(worker.pid, CUT_IDLE_SIGNAL)

    def kill_past_grace(self, now: float) -> None:
        for pid in self.hung.due(now):
            log.error("worker %d still alive %.1fs after TERM: KILL", pid, self.hung.grace)
            _send(pid, signal.SIGKILL)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: generation, mode, workers."""
        generation = self.gens.steered()
        ready = sum(1 for w in generation if w.ready)
        return (f"generation {generation.number}, {generation.mode.name}: {ready} of "
                f"{plural(generation.target, 'worker')} ready")  # fmt: skip

    def loop_servers(self) -> list[LoopServer]:
        servers = (self.control, self.metrics, self.health_server)
        return [server for server in servers if server is not None]

    def open_metrics(self, config: Config, inherited: int | None) -> None:
        """--metrics: the Prometheus endpoint (an upgrade passes its socket on, as listeners)."""
        spec = replace(parse_bind(config.metrics), text=METRICS_TEXT + config.metrics)
        listener = adopt(spec, inherited) if inherited is not None else bind(spec, 64)
        self.metrics = MetricsServer(listener, self.selector, self.metrics_source)
        log.info("metrics on %s", listener.uri)

    def open_health(self, config: Config, inherited: int | None) -> None:
        """--health: bound (or inherited) now; served at once, except by an upgrade's new
        master, which answers only once it serves (``serve_health``): until then the old
        master answers on the same socket, so the balancer never sees a 503 or a refusal."""
        spec = replace(parse_bind(config.health), text=HEALTH_TEXT + config.health)
        self.health_listener = adopt(spec, inherited) if inherited is not None else bind(spec, 64)
        log.info("health on %s", self.health_listener.uri)
        if self.predecessor is None:
            self.serve_health()

    def serve_health(self) -> None:
        if self.health_listener is not None and self.health_server is None:
            self.health_server = HealthServer(self.health_listener, self.selector,
                                              self.health_report)  # fmt: skip

    def health_report(self) -> dict:
        """What the health endpoint answers: the state (``health.state_of``), and the
        capacity behind the agent's weight: the free lanes of the workers serving now (ready,
        not retiring, of any generation: during a reload the old ones serve while the new
        ones boot), over the lanes of the pool's target, averaged over a few seconds. Once an upgrade's new master serves
        this host, the old one's last answers say ready, at full weight."""
        handed_over = self.successor is not None and self.successor.state == SERVING
        steered = self.gens.steered() if self.current is not None else None
        workers = idle = free = 0
        # Down: no worker ready (a retiring one counts: a failed rolling reload's stand-ins
        # serve), and the last one forked failed to boot, so none is about to (a worker
        # recycling alone is replaced in a moment: that is no reason to leave the rotation).
        serving = not (steered and steered.boot_failures)
        for worker in self.gens.workers():
            serving = serving or worker.ready
            if worker.ready and not worker.retiring:
                workers += 1
                busy = sum(1 for lane in worker.slot_view().lanes if lane.started)
                free += max(0, worker.generation.lanes - busy)
                idle += busy == 0
        state = state_of(self.ready.is_set(), self.health.drained, self.delay is not None,
                         self.stop is not None and not handed_over,
                         serving=serving or handed_over)  # fmt: skip
        lanes = steered.target * steered.lanes if steered else 0
        return {"state": state, "drained": self.health.drained, "pid": self.pid,
                "generation": steered.number if steered else 0, "workers": workers,
                "idle_workers": idle,
                "weight": 100 if handed_over else self.health.weigh(idle_share(free, lanes),
                                                                      time.monotonic())}  # fmt: skip

    def metrics_source(self) -> dict:
        """What a scrape reads: the live generations, the master's own counts, the listeners."""
        return {"generations": list(self.gens), "accounts": self.accounts,
                "generation": self.gens.steered().number,
                "uptime": time.monotonic() - self.started_at,
                "listeners": self.gens.listeners(),
                "health": self.health_report()["state"] if self.health_listener else None}  # fmt: skip

    def status(self) -> dict:
        """What ``ctl status`` and the library's ``status()`` report: one place to read."""
        now = time.monotonic()
        generations = list(self.gens)
        steered = self.gens.steered()
        return {
            "pid": self.pid, "name": self.name, "uptime": round(now - self.started_at, 3),
            "generation": steered.number, "mode": steered.mode.name, "target": steered.target,
            "listeners": [lst.uri for lst in self.gens.listeners()],
            "listener_stats": [
                {"uri": uri, "accepted": t.accepted, "requests": t.requests, "errors": t.errors}
                for uri, t in self.accounts.per_listener(generations).items()
            ],
            "generations": [g.summary() for g in generations],
            "workers": [entry for g in generations for entry in g.status(now)],
            "stopping": self.stop is not None or self.delay is not None,
            "health": self.health_report(),
            "upgrade": {"new_master": self.successor.pid, "state": self.successor.state}
            if self.successor else None,
        }  # fmt: skip

    # ----------------------------------------------------------------- stopping
    def begin_stop(self, graceful: bool, reason: str, handover: bool = False) -> None:
        """Signal every worker: TERM lets in-flight requests finish, QUIT ends them now.
        ``handover``: the stop an upgrade's new master asked for by saying ready."""
        if self.stop and not self.stop.graceful:
            return  # a quick stop is already under way
        self.delay = None  # a quick stop cuts a drain delay short; a graceful one ends it
        if self.app_check is not None:  # a reload's: no generation starts during a stop
            self.app_check.cancel()
            self.app_check = None
            log.info("reload abandoned: stopping during the app's check")
        if handover and self.health_server is not None:
            self.health_server.stop_listening()  # the new master answers; ours finish
        successor = self.successor
        if successor is not None and successor.state == BOOTING:
            successor.leave()
            self.forget_successor_fds(successor)
            log.info("stopping during the upgrade: leaving the new master %d to take over",
                     successor.pid)  # fmt: skip
        self.stop = Stop(graceful, self.config.graceful_timeout, time.monotonic(), reason,
                         handover)  # fmt: skip
        self.notifier.send(STOPPING=1, STATUS=f"{'graceful' if graceful else 'quick'} stop")
        workers = list(self.gens.workers())
        log.info("%s stop (%s): %s, up to %.1fs", "graceful" if graceful else "quick",
                 reason, plural(len(workers), "worker"), self.stop.deadline - time.monotonic())  # fmt: skip
        for worker in workers:
            _send(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    def begin_delay(self, reason: str) -> bool:
        """A TERM's --drain-delay, if it owes the balancer one (False: stop now): none before
        the first generation serves (no balancer sends here yet), and none left of it when
        ``ctl drain`` took the host out of rotation long enough ago."""
        now = time.monotonic()
        delay = self.health.delay_left(self.config.drain_delay, now) if self.ready.is_set() else 0
        if delay <= 0:
            return False
        self.delay = DrainDelay(delay, now, reason)
        log.info("draining for %gs before the graceful stop (%s): health says draining, "
                 "requests are served as before", delay, reason)  # fmt: skip
        self.notifier.send(STATUS=f"draining for {delay:g}s before stopping")
        return True

    def end_delay(self) -> None:
        """The drain delay is over (or cut short): the graceful stop proper begins."""
        assert self.delay is not None
        reason = self.delay.reason
        self.delay = None
        self.begin_stop(graceful=True, reason=f"{reason}, after the drain delay")

    def enforce_stop(self, now: float) -> None:
        assert self.stop is not None
        if self.stop.nudge(now):
            for worker in self.gens.workers():
                _send(worker.pid, CUT_IDLE_SIGNAL)
        if not self.stop.overdue(now):
            return
        workers = sorted(self.gens.workers(), key=lambda w: w.pid)
        if not workers:
            return  # the last ones left by themselves as the deadline came
        log.error("stop timed out: killing workers %s", ", ".join(str(w.pid) for w in workers))
        for worker in workers:
            _send(worker.pid, signal.SIGKILL)
        if self.stop.graceful and self.exit_code == EXIT_OK:
            self.exit_code = EXIT_RUNTIME

    def cleanup(self, log_exit: bool = True) -> None:
        """Whatever happened, leave nothing behind: no worker, no fd, no socket file, no
        pidfile. The last log line gives the exit code (``log_exit``: we got as far as
        serving; a failure at start is the caller's one line)."""
        with self.inbox_lock:
            self.closed = True
            pending, self.inbox = list(self.inbox), collections.deque()
        for _, reply in pending:
            if reply is not None:
                reply.answer({"ok": False, "error": "the master stopped"})
        if self.app_check is not None:
            self.app_check.cancel()
            self.app_check = None
        for worker in list(self.gens.workers()):
            _send(worker.pid, signal.SIGKILL)
            worker.process.join()
            worker.process.close()
        if self.previous_handlers:
            self.restore_signal_handlers()
        handed_over = self.successor is not None  # the new master serves the socket files
        for listener in self.gens.listeners() or self.given_listeners:
            listener.close(unlink=not handed_over)
        for generation in self.gens:
            generation.close()
        if self.successor is not None:
            self.successor.close()
        if self.control is not None:
            self.control.close()  # its file stays if an upgrade's new master took it over
        if self.metrics is not None:
            self.metrics.close(unlink=not handed_over)
        if self.health_server is not None:
            self.health_server.close(unlink=not handed_over)
        elif self.health_listener is not None:
            self.health_listener.close(unlink=not handed_over)
        self.notifier.close()
        if ACCESS.log is not None:
            ACCESS.log.close()
            ACCESS.log = None
        self.selector.close()
        for fd in (self.wake_r, self.wake_w, self.notify_r, self.notify_w):
            os.close(fd)
        path = self.config.pidfile if self.pidfile_claimed else None
        if path and handed_over:
            path += pidfile.OLD_SUFFIX  # ours moved aside when the upgrade began
        pidfile.remove(path, self.pid)
        if log_exit:
            log.info("master %d exiting (code %d)", self.pid, self.exit_code)
        self.stopped.set()

    # ----------------------------------------------------------------- app and listeners
    def apps_to_check(self, config: Config) -> list[str]:
        """The apps a throwaway process checks (none with ``--preload``: the master imports
        those itself); the built-in demos among them are imported here too."""
        if config.preload:
            return []
        apps = [app or config.app for app in self.handlers_to_load(config)]
        import_builtins(apps)
        return apps

    def handlers_to_load(self, config: Config) -> list[str | None]:
        """The app (None: ``config.app``), unless the library gave a class, and every
        bind's own handler."""
        apps: list[str | None] = [] if self.handler is not None else [None]
        return apps + [spec.handler for spec in config.binds if spec.handler]

    def check_app(self, config: Config) -> dict[str | None, type]:
        """Check that every handler imports, so that a bad app fails here (exit 3 at start)
        before any worker forks; the master waits, it serves nothing yet (a reload checks
        beside the loop: ``do_reload``). Without ``--preload``, in a throwaway process
        (``cluster.appcheck``), and nothing is returned: each worker imports the app afresh.
        With it, here, and the workers use these very classes."""
        if not config.preload:
            if apps := self.apps_to_check(config):
                appcheck.check(apps, max(config.graceful_timeout, appcheck.LEAST_TIME),
                               self.identity)  # fmt: skip
            return {}
        return {app: load_handler(app or config.app, fresh=True)
                for app in self.handlers_to_load(config)}  # fmt: skip

    def take_inherited(self, config: Config) -> dict[str, int]:
        """The fds an upgrade or systemd passed us, by the bind text each one serves (the
        metrics endpoint's is ``metrics=URI``); the others are closed. Taken once, at start:
        a later upgrade describes its own."""
        binds: list[tuple[str, str | None]] = [(spec.text, spec.name) for spec in config.binds]
        if config.metrics and handover.ENV_FDS in os.environ:  # an upgrade passes it on
            binds.append((METRICS_TEXT + config.metrics, None))
        if config.health and handover.ENV_FDS in os.environ:
            binds.append((HEALTH_TEXT + config.health, None))
        inherited = handover.inherited_fds(os.environ, binds, os.getpid())
        for fd in handover.unused_fds(inherited, binds):
            os.close(fd)
        for name in (handover.ENV_FDS, "LISTEN_FDS", "LISTEN_PID"):
            os.environ.pop(name, None)
        return inherited

    def open_listeners(
        self, config: Config, keep: list[Listener] = (), inherited: dict[str, int] | None = None
    ) -> list[Listener]:
        """The listeners ``config`` asks for: those in ``keep`` with the same bind text as
        they are, ``inherited`` fds adopted (upgrade, systemd), the rest bound now."""
        kept = {lst.spec.text: lst for lst in keep}
        inherited = inherited or {}
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


def open_access_log(config: Config, identity: Identity | None) -> AccessLog:
    try:
        return AccessLog(config.access_log or "-", config.access_log_format,
                         as_json=config.log_format == "json",
                         owner=identity.uid if identity else None)  # fmt: skip
    except OSError as err:
        raise ConfigError(f"cannot open access log {config.access_log}: {err.strerror}") from None


def _only_wake(signum: int, frame: object) -> None:
    """Our signal handler: nothing. ``set_wakeup_fd`` already wrote the signal's number."""


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already dead; reaping will collect it


def _rand() -> float:
    """A float in [0, 1) without importing ``random``: that module reseeds itself in every
    forked child (2.5 kB from the kernel each time), a cost each fork-mode request would pay."""
    return int.from_bytes(os.urandom(4), "little") / 2**32


def live_events(
    selector: selectors.BaseSelector, events: list[tuple[selectors.SelectorKey, int]]
) -> Iterator[tuple[selectors.SelectorKey, int]]:
    """The events of one ``select`` pass whose registration still stands when their turn
    comes. One pass can report two fds of one part (a new master's exit and its pipe's end):
    the first handler unregisters both, and the second event must be dropped, not handled
    for a part that is gone (the master died of it). Dropping is safe because the selector is
    level-triggered: a registration replaced meanwhile is reported again on the next pass."""
    registered = selector.get_map()
    for key, mask in events:
        # By fd, not by file object: a socket closed by an earlier handler has no fd to look
        # up (``get_key`` raised ValueError for it, and the master died of that instead).
        if registered.get(key.fd) is key:
            yield key, mask


def _drain(fd: int) -> bytes:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)

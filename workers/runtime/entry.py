"""A worker's entry point: what runs between the master's fork and the accept loop.

With ``--user`` the worker drops root first thing (``workers.runtime.privileges``): every
fd it keeps was opened by the master, so nothing it needs is lost, and the app is imported
as that user.

A worker owns very little: its copies of the listening sockets, the write end of the master's
notify pipe, and a wakeup pipe of its own. Everything else it inherited from the master (the
master's wakeup pipe and selector, the pidfds of its siblings, listeners of other
generations) is closed first thing, so that no fd outlives its owner's intent.

The master blocks the worker's signals around the fork (``spec.HANDLED_SIGNALS``) and the
worker unblocks them only once its own handlers are in place, so a TERM sent during boot is
never lost nor handled by the master's code.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

from workers.runtime import modes, privileges, ratelog
from workers.runtime.access import ACCESS, ROLE, reopen_logs
from workers.runtime.client import (
    CUT_IDLE_SIGNAL,
    NEXT_BYTE,
    NO_DEADLINE,
    ClientSocket,
    CountingClientSocket,
    ListeningSocket,
    cut_after_grace,
    mark_requests,
)
from workers.runtime.context import Context
from workers.runtime.lifecycle import Lifecycle, set_parent_death_signal
from workers.runtime.spec import EXIT_BOOT_ERROR, HANDLED_SIGNALS, STACK_DUMP_SIGNAL, WorkerSpec

log = logging.getLogger("cluster.worker")

IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH)


def run(spec: WorkerSpec) -> None:
    """The worker's life: boot, tell the master we're ready, serve, exit."""
    lifecycle = boot(spec)
    slot = spec.scoreboard.worker_slot(spec.slot)
    slot.header.pid = os.getpid()
    ratelog.share(slot.header.log_budgets)  # one budget for the worker and its children
    try:
        handlers = [mark_requests(spec.load_handler(ep.app)) for ep in spec.endpoints]
    except Exception as err:  # an app that fails to import in the worker: a boot error
        log.error("worker %d cannot load the app: %s", os.getpid(), err)
        sys.exit(EXIT_BOOT_ERROR)
    mode = modes.get(spec.mode)
    context = Context(spec, lifecycle, slot)
    try:
        mode.serve(list(zip(spec.endpoints, handlers, strict=True)), context)
    finally:
        if ACCESS.log is not None:
            ACCESS.log.flush()
    sys.exit(context.exit_code)


def boot(spec: WorkerSpec) -> Lifecycle:
    """Undo what the worker inherited from the master, drop root, and set up its own signals."""
    for fd in spec.inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if spec.identity is not None:  # first: before any code of the app, and before the
        # parent-death signal, which a change of credentials clears
        try:
            privileges.drop(spec.identity)
        except privileges.PrivilegeError as err:
            log.error("worker %d: %s; not serving", os.getpid(), err)
            sys.exit(EXIT_BOOT_ERROR)
    lifecycle = Lifecycle(spec.keep_alive)
    signal.set_wakeup_fd(lifecycle.wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lifecycle.request_stop)
    signal.signal(CUT_IDLE_SIGNAL, lifecycle.cut_idle)
    signal.signal(signal.SIGALRM, cut_after_grace)
    signal.signal(signal.SIGINT, lifecycle.quick_stop)
    signal.signal(signal.SIGQUIT, lifecycle.quick_stop)
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, _reopen_logs)  # logrotate's, passed on by the master
    signal.signal(signal.SIGCHLD, lifecycle.child_exited)
    faulthandler.register(STACK_DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    # Master gone: end at once. KILL, not QUIT: a worker stopped (SIGSTOP) when the master
    # died would wait for a SIGCONT with QUIT pending, holding the listeners all along.
    set_parent_death_signal(signal.SIGKILL, spec.master_pid)
    ROLE.name, ROLE.generation, ROLE.pid = "worker", spec.generation, os.getpid()
    if ACCESS.log is not None:  # the master opened it: count the bytes it logs
        ListeningSocket.client_class = CountingClientSocket
    ClientSocket.request_timeout = spec.request_timeout
    ClientSocket.after_reply = NEXT_BYTE if spec.request_timeout else NO_DEADLINE
    name = f" [{spec.name}]" if spec.name else ""
    set_title(f"cluster: worker{name} {spec.mode} slot={spec.slot} gen={spec.generation}")
    return lifecycle


def _reopen_logs(signum: int, frame: object) -> None:
    reopened, failed = reopen_logs()
    if reopened:
        log.info("worker %d reopened %s", os.getpid(), ", ".join(reopened))
    for failure in failed:
        log.warning("worker %d cannot reopen %s; writing on to the old file", os.getpid(),
                    failure)  # fmt: skip


def set_title(title: str) -> None:
    """Set the process title; titles are cosmetic, so a missing setproctitle never fails us,
    nor one that cannot be imported for want of a file descriptor (EMFILE: an OSError)."""
    try:
        from setproctitle import setproctitle
    except (ImportError, OSError):
        return
    setproctitle(title)

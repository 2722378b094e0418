"""Checking that an app imports, in a throwaway process: the master never imports it.

Why not in the master: a module imported there stays in its ``sys.modules``, every worker
forked later inherits it, and re-importing the app's top module does not renew the modules
it imports (``pkg/version.py`` of ``pkg:Handler``). A HUP would then start workers that run
part of the old code. So the master forks a child that imports the apps, fresh, and reports
the first failure on a pipe; the workers import the app themselves after their fork. (With
``--preload`` the master does import it, once, and a HUP re-executes the master instead: see
``Master.do_reload``.) With ``--user`` the child drops to that user before it imports, as the
workers do: an app's import code never runs as root (unless ``--preload``).

At start the master waits for the check (``check``): it serves nothing yet. On a reload it
serves, so the check runs beside its loop (``Check``): an app whose import takes seconds (a
model to load) must not stop the master from answering health checks, reaping, respawning
and taking signals meanwhile.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
from collections.abc import Callable

from cluster.app import load_handler
from cluster.errors import AppError
from cluster.spawn import WorkerProcess
from workers.runtime.entry import set_title
from workers.runtime.lifecycle import set_parent_death_signal
from workers.runtime.privileges import Identity, PrivilegeError, drop

CHECK_FAILED = 3
# The check may take --graceful-timeout, and never less than this: a short graceful timeout
# is about stopping, and must not fail a start whose import is slow on a busy machine.
LEAST_TIME = 30.0

# What a failure of the check itself (not of the app's import) begins with.
NOT_CHECKED = "cannot check the app"


def check(apps: list[str], timeout: float, identity: Identity | None = None) -> None:
    """Import each of ``apps`` (``module:Class`` or a demo) in a forked child, as
    ``identity`` if given; raise AppError with its one-line message when one fails, or when
    the child takes over ``timeout`` seconds or cannot be forked. At start the master serves
    nothing yet, so it waits here: a ``Check`` on a selector of its own."""
    verdict: list[str | None] = []
    with selectors.DefaultSelector() as selector:
        under_way = Check(apps, timeout, identity, selector, verdict.append)
        while not verdict:
            for key, mask in selector.select(max(0.0, under_way.deadline - time.monotonic())):
                key.data(mask)
            if not verdict:
                under_way.expire(time.monotonic())
    if verdict[0] is not None:
        raise AppError(verdict[0])


class Check:
    """A reload's app check under way, a part of the master's loop: the child's report pipe
    and its pidfd sit in the master's selector and ``expire`` enforces the deadline; ``then``
    gets None (the app imports) or the one-line reason, once. The child, its pidfd and the
    pipe are owned here until the end (``cancel`` included).

    The verdict waits for the child's exit (its pidfd), not for the pipe's end: an import
    may close fds it does not know (the pipe's end then came early, and the master blocked
    in ``waitpid`` as long as the import went on: no health answers, no signals), or fork a
    helper that inherits the pipe and outlives the check (its end then came late, and an
    app that imported failed the reload as "took over 30s")."""

    def __init__(self, apps: list[str], timeout: float, identity: Identity | None,
                 selector: selectors.BaseSelector, then: Callable[[str | None], None]) -> None:  # fmt: skip
        self.selector = selector
        self.then = then
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.chunks: list[bytes] = []
        try:
            self.read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as err:
            raise AppError(f"{NOT_CHECKED}: no pipe ({err.strerror})") from None
        self.child = WorkerProcess(_import_all, (apps, write_end, identity, os.getpid()))
        try:
            self.child.start()
        except OSError as err:  # fork (no process left) or pidfd_open (no fd left)
            os.close(self.read_end)
            self.child.close()
            raise AppError(f"{NOT_CHECKED}: cannot start its process ({err.strerror})") from None
        finally:
            os.close(write_end)
        self.reading = True
        selector.register(self.read_end, selectors.EVENT_READ, self.on_readable)
        selector.register(self.child.sentinel, selectors.EVENT_READ, self.on_exit)

    def fds(self) -> list[int]:
        """Ours: a worker forked meanwhile closes them."""
        return [self.read_end, self.child.sentinel]

    def next_deadline(self) -> float:
        return self.deadline

    def on_readable(self, mask: int) -> None:
        """Gather the report; at the pipe's end stop watching it: the exit decides."""
        self.read_available()

    def read_available(self) -> None:
        while self.reading:
            try:
                chunk = os.read(self.read_end, 4096)
            except BlockingIOError:
                return
            if not chunk:
                self.reading = False
                self.selector.unregister(self.read_end)
                return
            if sum(map(len, self.chunks)) < 4096:  # the child writes one line; a helper more
                self.chunks.append(chunk)

    def on_exit(self, mask: int) -> None:
        """The child exited (its pidfd fired, so the join does not block): its report, if
        any, is in the pipe already."""
        code = self.child.join()
        self.read_available()
        message = b"".join(self.chunks)[:4096].decode(errors="replace")
        self.end()
        if code == 0:
            self.then(None)
        else:
            self.then(message or f"{NOT_CHECKED}: the check {_ended(code)}")

    def expire(self, now: float) -> None:
        if now >= self.deadline:
            self.cancel()
            self.then(f"{NOT_CHECKED}: importing it took over {self.timeout:g}s")

    def cancel(self) -> None:
        """Kill the child (a stop, or the deadline); ``then`` is not called for it."""
        os.kill(self.child.pid, signal.SIGKILL)
        self.child.join()
        self.end()

    def end(self) -> None:
        """Close what we own. A readable event for the pipe that came in the same pass of
        the selector as the exit finds ``reading`` off, and reads nothing (nor a reused fd)."""
        if self.reading:
            self.reading = False
            self.selector.unregister(self.read_end)
        self.selector.unregister(self.child.sentinel)
        os.close(self.read_end)
        self.child.close()


def _ended(code: int | None) -> str:
    """How the check's process ended, for the log: 'was killed by SIGKILL', 'exited 1'."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited {code}"


def _import_all(apps: list[str], report: int, identity: Identity | None, master: int) -> None:
    """In the child: import every app; the first failure's message goes to ``report``. It
    dies with the master (an import that hangs must not outlive a master killed meanwhile)
    and says what it is in ``ps`` (it was a second "cluster: master")."""
    set_parent_death_signal(signal.SIGKILL, master)
    set_title(f"cluster: app check of master {master}")
    signal.set_wakeup_fd(-1)  # the master's wakeup pipe is not ours to write signals into
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    try:
        if identity is not None:
            drop(identity)
        for app in apps:
            load_handler(app, fresh=True)
    except (AppError, PrivilegeError) as err:
        message = str(err)
        if identity is not None and isinstance(err, AppError):  # a file it may not read?
            message += f" (imported as user {identity.user})"
        os.write(report, message.encode(errors="replace")[:4096])
        os._exit(CHECK_FAILED)

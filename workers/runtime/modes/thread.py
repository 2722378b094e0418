"""``thread``: exactly ``threads`` handler threads per worker, as leader and followers.

The idle threads take turns at the listeners: one of them, the leader, waits in the accept
loop, and the thread that accepts a connection is the one that serves it. No queue, no
hand-off from an accepting thread to a handler thread. The leader keeps the leadership while
it serves a short request, and hands it on once the request runs long or waits for its
client (``workers.runtime.leadership``): under connection-per-request load a thread goes from
one request to the next the way a sync worker does, with no other thread woken for it.

A worker whose threads are all busy has no leader at the listener, so it accepts nothing:
new connections stay in the kernel's queue for another worker instead of queueing in this
one. The main thread only supervises: it takes the signals, checks that the master lives
while every thread is busy, and on a stop waits (bounded) for the handlers to finish.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

from workers.runtime.accept import AcceptLoop, Taken, close_all, in_lane
from workers.runtime.client import IDLE_WAIT, format_client, readable
from workers.runtime.context import CURRENT, Context, make_server
from workers.runtime.leadership import Leadership
from workers.runtime.lifecycle import master_alive
from workers.runtime.mode import Binding, Mode
from workers.runtime.spec import EXIT_CUT, PARENT_CHECK_INTERVAL

EXIT_HANDLER_EXIT = 1  # a handler raised SystemExit, or a thread failed: a crash to the master

log = logging.getLogger("cluster.worker")
# A connection taken the moment its client connected usually has its request a few
# microseconds behind: a free thread waits this long for it before it sends the connection
# to the waiting room (a round of hand-offs that costs far more).
HOT_WAIT = 0.002


class Followers:
    """``size`` handler threads that share one accept loop under a leader (``Leadership``).

    Only the leader waits in the accept loop and parks in its waiting room. A thread just
    done with a request that no longer leads may also take the next connection on its own
    (``_hot``): the loop's ``take`` has a lock of its own for that (tried, never waited for,
    on that path), and what it cannot serve at once it hands in to the room; the request
    count has ``counting``. Thread ``n`` runs its requests in scoreboard lane ``n``.
    """

    def __init__(self, size: int, loop: AcceptLoop, context: Context) -> None:
        self.loop = loop
        self.context = context
        self.leadership = Leadership(size)
        self.counting = threading.Lock()  # the request count, bumped by hot takes too
        self.left: Iterator[Taken] | None = None  # what a stop still serves, once it began
        # Daemon threads: a quick stop must not wait for them; a graceful one joins them.
        self.threads = [
            threading.Thread(target=self._work, args=(n,), name=f"handler-{n}", daemon=True)
            for n in range(size)
        ]

    def start(self) -> None:
        leadership = self.leadership

        def step_down() -> None:
            leadership.step_down(CURRENT.lane)

        def serving(busy: bool) -> None:
            # While the leader serves, a wait for a kept-alive connection's next request
            # hands the lead on; otherwise such a wait costs the check of a None.
            IDLE_WAIT.call = step_down if busy else None

        leadership.on_serving = serving
        for thread in self.threads:
            thread.start()

    def _work(self, lane: int) -> None:
        CURRENT.lane = lane
        self.leadership.enter(lane)
        try:
            self._serve(lane)
        except BaseException as exc:  # outside a request: the accept loop, a hot take, the drain
            self._failed(lane, exc)

    def _serve(self, lane: int) -> None:
        slot, lifecycle, leadership = self.context.slot, self.context.lifecycle, self.leadership
        taken: Taken | None = None
        while True:
            if taken is None:
                leadership.lead(lane)
                taken = self._next()
                if taken is None:
                    leadership.hand_on(lane)  # the next one finds the drain done, and so on
                    return
                if lifecycle.running:
                    leadership.begin(lane, self.loop.waited)
                else:  # every free thread serves the drain
                    leadership.hand_on(lane)
            try:
                in_lane(slot, lane, *taken)
            except BaseException as exc:  # SystemExit and the like: Exception is handle_error's
                self._handler_exit(exc, taken[2])
                leadership.hand_on(lane)
                return
            if leadership.end(lane):
                taken = None  # still the leader: back to the accept loop
            else:
                taken = self._hot() if lifecycle.running else None

    def _handler_exit(self, exc: BaseException, client: object) -> None:
        """A handler raised what ends a process (``sys.exit()``, KeyboardInterrupt): as in
        sync mode, the worker ends, here gracefully (the other threads finish their requests)
        and with exit code 1, for the master to replace it. Before, the exception ended its
        thread alone, in silence for SystemExit: a worker lost its lanes one by one unseen."""
        log.error("worker %d: a handler raised %s serving %s; stopping", os.getpid(),
                  type(exc).__name__ + (f"({exc})" if str(exc) else ""),
                  format_client(client))  # fmt: skip
        self._stop()

    def _failed(self, lane: int, exc: BaseException) -> None:
        """What raised outside a request (a server's own ``get_request``, a MemoryError in
        the accept loop): a bug, with its traceback, and the worker ends as it would in sync
        mode, gracefully here, with exit code 1. Left alone, the exception ended the thread
        with the leadership: the others waited for a lead that never came, and the worker
        served nothing until the watchdog found its heartbeat gone (30 s by default)."""
        log.error("worker %d: thread %d ended by %s outside a request; stopping", os.getpid(),
                  lane, type(exc).__name__, exc_info=exc)  # fmt: skip
        self._stop()
        self.leadership.hand_on(lane)

    def _stop(self) -> None:
        """The worker stops taking requests and exits 1 once the others are done."""
        context = self.context
        context.exit_code = context.exit_code or EXIT_HANDLER_EXIT
        context.lifecycle.running = False
        try:
            os.write(context.lifecycle.wake_w, b"\0")  # wake the leader out of its wait
        except OSError:
            pass

    def _hot(self) -> Taken | None:
        """Right after a request, by a thread that no longer leads (the lead went on while
        it served), the next connection already queued: under load it goes from one request
        to the next the way a sync worker does, with no other thread woken for it. None
        when nothing is queued (or what came has nothing to read yet: it goes to the waiting
        room, which the leader keeps)."""
        loop = self.loop
        if loop.room is not None and loop.room.full:
            return None
        taken = loop.take(wait=False)  # another thread taking: we go and queue as a follower
        if taken is None:
            return None
        if loop.needs_room(taken[0], taken[1]) and not readable(taken[1], HOT_WAIT):  # type: ignore[arg-type]
            # Silent still: the leader parks it, and we wait our turn.
            loop.room.hand_in(*taken, self.context.lifecycle.wake_w)  # type: ignore[union-attr, arg-type]
            return None
        with self.counting:
            self.context.counted()
        return taken

    def _next(self) -> Taken | None:
        """The next request for the leader to serve; None when the worker is done (only
        the leader calls it: the loop and the drain are its alone)."""
        context = self.context
        if context.lifecycle.running:
            taken = self.loop.next()
            if taken is not None:
                with self.counting:
                    context.counted()
                return taken
        if self.left is None:  # the first thread to see the stop sets up the drain
            # Recycled, a worker leaves the queue to the others; what it parked is its own.
            self.left = self.loop.drained(context.spec.graceful_timeout,
                                          queue=context.draining())  # fmt: skip
        return next(self.left, None)

    def join(self, within: float) -> int:
        """Wait (bounded) for the threads to finish; returns how many were still running a
        request at the end (they die with the process)."""
        deadline = time.monotonic() + within
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for thread in self.threads if thread.is_alive())

    def supervise(self) -> None:
        """The main thread's part while serving: take signals, and notice a dead master even
        when every thread is busy (the leader's accept loop checks it otherwise)."""
        lifecycle, master_pid = self.context.lifecycle, self.context.spec.master_pid
        while lifecycle.running and (alive := [t for t in self.threads if t.is_alive()]):
            alive[0].join(PARENT_CHECK_INTERVAL)
            if not master_alive(master_pid):
                lifecycle.running = False
                os.write(lifecycle.wake_w, b"\0")  # wake the leader out of its wait


def serve(bindings: list[Binding], context: Context) -> None:
    """Accept only while a handler thread is free; on TERM let the running handlers finish."""
    spec = context.spec
    servers = [
        make_server(endpoint, handler, context, n) for n, (endpoint, handler) in enumerate(bindings)
    ]
    size = MODE.lanes(spec)
    loop = AcceptLoop(servers, context, handlers=size)
    followers = Followers(size, loop, context)
    try:
        followers.start()
        context.ready()  # once every handler thread runs: ready means at its full size
        followers.supervise()
        cut = followers.join(spec.graceful_timeout + 1.0)  # the drain's own bound, and a beat
        if cut:
            log.error("worker %d: %d requests still running after --graceful-timeout %gs; "
                      "cutting them", os.getpid(), cut, spec.graceful_timeout)  # fmt: skip
            context.exit_code = EXIT_CUT
    finally:  # threads still running now are cut: they die with the process
        loop.close()
        close_all(servers)


MODE = Mode(
    name="thread",
    summary="a bounded pool of --threads handler threads per worker, as leader and followers",
    serve=serve,
    lanes=lambda sizes: sizes.threads,
)

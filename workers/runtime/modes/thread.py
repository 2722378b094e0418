"""``thread``: exactly ``threads`` handler threads per worker.

The accept loop takes a free thread *before* it accepts, so a full worker leaves new
connections in the kernel's queue for another worker instead of queueing them itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from workers.runtime.accept import AcceptLoop, Taken, close_all, in_lane
from workers.runtime.context import CURRENT, Context, make_server
from workers.runtime.lifecycle import master_alive
from workers.runtime.mode import Binding, Mode
from workers.runtime.scoreboard import WorkerSlot
from workers.runtime.spec import EXIT_CUT, PARENT_CHECK_INTERVAL
from workers.servers import BaseServer

log = logging.getLogger("cluster.worker")


class ThreadPool:
    """Exactly ``size`` handler threads fed through a queue, with a count of free ones.

    The accept loop takes a free slot *before* it accepts, so the queue never holds more than
    one request per idle thread: back-pressure stays in the kernel's listen queue. Thread
    ``n`` runs its requests in scoreboard lane ``n``.
    """

    def __init__(self, size: int, slot: WorkerSlot) -> None:
        from queue import SimpleQueue  # thread mode only: a fork-mode worker stays smaller

        self.free = threading.Semaphore(size)
        self.jobs: SimpleQueue[Taken | None] = SimpleQueue()
        self.slot = slot
        # Daemon threads: a quick stop must not wait for them; a graceful one joins them.
        self.threads = [
            threading.Thread(target=self._work, args=(n,), name=f"handler-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self, lane: int) -> None:
        CURRENT.lane = lane
        while (job := self.jobs.get()) is not None:
            try:
                in_lane(self.slot, lane, *job)
            finally:
                self.free.release()

    def acquire(self, timeout: float) -> bool:
        return self.free.acquire(timeout=timeout)

    def submit(self, server: BaseServer, request: object, client_address: object) -> None:
        """Hand a request to a thread; call only while holding a slot from ``acquire``."""
        self.jobs.put((server, request, client_address))

    def room(self, deadline: float) -> bool:
        """Wait until ``deadline`` at most for a free thread; hold it if there is one."""
        return self.free.acquire(timeout=max(0.0, deadline - time.monotonic()))

    def join(self, within: float) -> int:
        """Let every running handler finish (bounded), then end the threads; returns how
        many were still running a request at the end (they die with the process)."""
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + within
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for thread in self.threads if thread.is_alive())


def serve(bindings: list[Binding], context: Context) -> None:
    """Accept only while a handler thread is free; on TERM let the running handlers finish."""
    spec, lifecycle = context.spec, context.lifecycle
    servers = [
        make_server(endpoint, handler, context, n) for n, (endpoint, handler) in enumerate(bindings)
    ]
    loop = AcceptLoop(servers, context, handlers=MODE.lanes(spec))
    pool = ThreadPool(MODE.lanes(spec), context.slot)
    context.ready()
    try:
        while lifecycle.running:
            if not pool.acquire(timeout=PARENT_CHECK_INTERVAL):
                if not master_alive(spec.master_pid):
                    lifecycle.running = False
                continue  # all threads busy: leave connections queued for other workers
            taken = loop.next()
            if taken is None:
                pool.free.release()
                break
            context.counted()
            pool.submit(*taken)
        if context.draining():
            loop.drain(spec.graceful_timeout, pool.submit, pool.room, pool.free.release)
        else:  # recycled: the queue is the others', but what we parked is ours
            loop.serve_waiting(time.monotonic() + spec.graceful_timeout, pool.submit, pool.room)
        cut = pool.join(spec.graceful_timeout)
        if cut:
            log.error("worker %d: %d requests still running after --graceful-timeout %gs; "
                      "cutting them", os.getpid(), cut, spec.graceful_timeout)  # fmt: skip
            context.exit_code = EXIT_CUT
    finally:
        loop.close()
        close_all(servers)


MODE = Mode(
    name="thread",
    summary="a bounded pool of --threads handler threads per worker",
    serve=serve,
    lanes=lambda sizes: sizes.threads,
)

"""A generation: one config in force, with its listeners, handlers, workers and scoreboard.

The master starts generation 1 and, on every reload, a new one beside it. A generation owns
everything that one config decides: its number, the config itself, the listeners it serves
(shared with the other generations that name the same bind), the handler classes the master
preloaded for it, its target size, its workers, and its scoreboard, sized for its own mode,
threads and max_children. Its workers write into its scoreboard only, so a reload that
changes the mode or the thread count cannot send a worker past the end of its lanes.

The master holds a ``current`` generation, during a reload the ``incoming`` one, and the
older ones that still have workers finishing (``draining``). A failed reload drops the
incoming generation; the current one was never touched, so there is nothing to restore.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cluster import pool
from cluster.app import load_handler
from cluster.backoff import Backoff
from cluster.config import Config
from cluster.listeners import Listener
from cluster.sources import rules_for
from cluster.spawn import WorkerProcess
from workers.runtime import modes
from workers.runtime.mode import Mode
from workers.runtime.privileges import Identity
from workers.runtime.scoreboard import Scoreboard, SlotView
from workers.runtime.spec import Endpoint, WorkerSpec


@dataclass(eq=False)
class Worker:
    """The master's record of one worker process (identity, not value: a selector key)."""

    process: WorkerProcess
    generation: Generation
    slot: int
    spawned_at: float
    ready: bool = False
    retiring: str = ""  # why the master asked it to go ("scaled down", "hung"...)

    @property
    def pid(self) -> int:
        return self.process.pid

    def view(self) -> pool.WorkerView:
        """What the pool decisions need to know of this worker."""
        idle = self.ready and self.generation.scoreboard.is_idle(self.slot)
        return pool.WorkerView(self.pid, self.slot, self.generation.number, self.spawned_at,
                               self.ready, bool(self.retiring), idle)  # fmt: skip

    def slot_view(self) -> SlotView:
        return self.generation.scoreboard.view(self.slot)


@dataclass(eq=False)
class Generation:
    """One config's workers (see the module docstring)."""

    number: int
    config: Config
    listeners: list[Listener]
    preloaded: dict[str | None, type]  # --preload: the handler classes the master imported
    handler: type | None = None  # the library API's own handler class, used as is
    target: int = 0
    workers: dict[int, Worker] = field(default_factory=dict)  # by pid
    boot_failures: int = 0  # its workers that died before ready, in a row
    backoff: Backoff = field(default_factory=Backoff)  # per slot: failures on their own

    def __post_init__(self) -> None:
        self.target = self.target or self.config.workers
        self.uris = [listener.uri for listener in self.listeners]  # named once, while open
        self.rules = [rules_for(lst.kind, lst.spec.proxy, lst.spec.allow, self.config.allow_from,
                                self.config.proxy_allow) for lst in self.listeners]  # fmt: skip
        self.mode: Mode = modes.get(self.config.worker_class)
        self.lanes = self.mode.lanes(self.config)
        # Twice the bound: retiring workers overlap their replacements (recycling, scaling).
        self.scoreboard = Scoreboard(2 * self.config.pool_bound, self.lanes, len(self.listeners))

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self.workers.values()))

    def serving(self) -> bool:
        """Its whole target is up and ready, none of its active workers still booting."""
        active = [w for w in self.workers.values() if not w.retiring]
        return len(active) >= self.target and all(w.ready for w in active)

    def free_slots(self, count: int) -> list[int]:
        """The ``count`` lowest scoreboard slots no worker holds (fewer at capacity)."""
        return pool.free_slots((w.slot for w in self.workers.values()), count,
                               self.scoreboard.capacity)  # fmt: skip

    def add(self, process: WorkerProcess, slot: int, now: float) -> Worker:
        worker = Worker(process, self, slot, now)
        self.workers[worker.pid] = worker
        return worker

    def spec(self, slot: int, notify_fd: int, private_fds: list[int], max_requests: int,
             name: str, beat_every: float, identity: Identity | None = None) -> WorkerSpec:  # fmt: skip
        """What a worker of this generation in ``slot`` needs (the slot claimed already)."""
        config = self.config
        return WorkerSpec(
            slot=slot, generation=self.number, mode=self.mode.name, name=name,
            master_pid=os.getpid(),
            endpoints=[Endpoint(lst.sock, lst.kind, lst.spec.handler, lst.server, uri,
                                rule.proxy, rule.allow, rule.proxy_allow)
                       for lst, uri, rule in zip(self.listeners, self.uris, self.rules,
                                                 strict=True)],
            load_handler=self.loader(), notify_fd=notify_fd, scoreboard=self.scoreboard,
            inherited_fds=private_fds, threads=config.threads,
            max_children=config.max_children, graceful_timeout=config.graceful_timeout,
            timeout=config.timeout, keep_alive=config.keep_alive, max_requests=max_requests,
            beat_every=beat_every, identity=identity,
            request_timeout=config.request_timeout,
            waiting_room=config.waiting_room, max_connections=config.max_connections,
            defer_accept=config.defer_accept,
        )  # fmt: skip

    def loader(self) -> Callable[[str | None], type]:
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

    def status(self, now: float) -> list[dict]:
        """One entry per worker, from its scoreboard slot (what ``status`` reports)."""
        entries = []
        for worker in sorted(self, key=lambda w: w.slot):
            view = worker.slot_view()
            oldest = view.oldest_request()
            entries.append({
                "pid": worker.pid, "slot": worker.slot, "generation": self.number,
                "mode": self.mode.name, "lanes": self.lanes, "state": view.state,
                "requests": view.requests,
                "request_age": round(now - oldest.started, 3) if oldest else None,
                "client": oldest.client if oldest else None,
                "busy_lanes": sum(1 for lane in view.lanes if lane.started > 0),
                "heartbeat_age": round(now - view.heartbeat, 3),
                "age": round(now - worker.spawned_at, 3),
                "retiring": worker.retiring or None,
            })  # fmt: skip
        return entries

    def summary(self) -> dict:
        config = self.config
        return {"number": self.number, "mode": self.mode.name, "lanes": self.lanes,
                "threads": config.threads, "max_children": config.max_children,
                "target": self.target, "workers": len(self.workers)}  # fmt: skip

    def close(self) -> None:
        """Its last worker is gone: free the scoreboard (listeners are the master's call)."""
        self.scoreboard.close()


class Generations:
    """The master's generations, and the one owner of which is which: the ``current`` one,
    the ``incoming`` one of a reload, and the older ``draining`` ones that still have workers.

    The transitions are here (``begin``, ``promote``, ``abort``, ``gone``); the master decides
    when to make them and does the I/O (signals, logs, listeners to close)."""

    def __init__(self) -> None:
        self.current: Generation | None = None
        self.incoming: Generation | None = None
        self.draining: list[Generation] = []
        self.last_number = 0  # numbers are never reused, a failed reload's included

    def next_number(self) -> int:
        self.last_number += 1
        return self.last_number

    def __iter__(self) -> Iterator[Generation]:
        """Every generation that still has a reason to exist, oldest first."""
        yield from list(self.draining)
        if self.current is not None:
            yield self.current
        if self.incoming is not None:
            yield self.incoming

    def workers(self) -> Iterator[Worker]:
        for generation in list(self):
            yield from generation

    def steered(self) -> Generation:
        """The generation the pool is steered toward: the incoming one during a reload."""
        generation = self.incoming or self.current
        assert generation is not None
        return generation

    def find(self, pid: int) -> Worker | None:
        for generation in self:
            if pid in generation.workers:
                return generation.workers[pid]
        return None

    def listeners(self) -> list[Listener]:
        """Every listener a live generation serves, each once."""
        seen: dict[int, Listener] = {}
        for generation in self:
            for listener in generation.listeners:
                seen.setdefault(id(listener), listener)
        return list(seen.values())

    def begin(self, generation: Generation) -> None:
        self.incoming = generation

    def promotable(self) -> bool:
        """The incoming generation serves its whole target, and every older worker retires."""
        incoming = self.incoming
        return incoming is not None and incoming.serving() and not any(
            not w.retiring for g in self if g is not incoming for w in g
        )  # fmt: skip

    def promote(self) -> Generation:
        """The incoming generation becomes the current one; the current one drains."""
        assert self.current is not None and self.incoming is not None
        self.draining.append(self.current)
        self.current, self.incoming = self.incoming, None
        return self.current

    def abort(self) -> Generation:
        """A reload failed: its generation drains (the current one was never touched)."""
        assert self.incoming is not None
        failed, self.incoming = self.incoming, None
        self.draining.append(failed)
        return failed

    def gone(self) -> list[Generation]:
        """The draining generations whose last worker left, now forgotten."""
        empty = [g for g in self.draining if not g.workers]
        for generation in empty:
            self.draining.remove(generation)
        return empty

    def settled(self) -> bool:
        """No reload under way and no older generation draining."""
        return not self.draining and self.incoming is None

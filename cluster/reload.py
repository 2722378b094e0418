"""Reload (HUP): a new generation of workers replaces the old one, behind a health gate.

A mixin of ``Master`` (it reads and writes the master's state: config, listeners, workers,
generation); ``Master.run`` calls ``begin_reload`` on HUP and ``watch_reload`` every turn. The
decisions of which worker to fork or retire are ``cluster.pool.plan``'s; this module owns the
transitions: start a generation, finish it, or give it up and restore the previous one.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

from cluster.config import Config
from cluster.errors import ClusterError
from cluster.listeners import Listener, diff_binds

log = logging.getLogger("cluster.master")


@dataclass
class Reload:
    """A reload in progress: the generation we came from and what to restore on failure."""

    previous_generation: int
    previous_config: Config
    previous_listeners: list[Listener]
    previous_preloaded: dict[str | None, type]
    previous_target: int


class ReloadMixin:
    """HUP handling for ``Master``."""

    reload: Reload | None

    def begin_reload(self) -> None:
        """Re-read the config, check the app, open new binds, and start a new generation.

        Anything that fails here leaves the running generation untouched and serving.
        """
        if self.stopping:
            log.warning("reload refused: stopping")
            return
        if self.reload is not None:
            if not self.generation_ready():
                log.warning("reload refused: generation %d is still booting", self.generation)
                return
            # The last reload's generation is serving; only its predecessors still drain.
            # It becomes the generation to fall back on.
            self.reload = None
        try:
            config = self.reread_config() if self.reread_config else self.config
            self.check_app(config)
            listeners = self.open_listeners(config, keep=self.listeners)
        except ClusterError as err:
            log.error("reload failed: %s; still serving generation %d", err, self.generation)
            return
        self.reload = Reload(self.generation, self.config, self.listeners, self.preloaded,
                             self.target)  # fmt: skip
        added, removed = diff_binds([lst.spec.text for lst in self.listeners],
                                    [lst.spec.text for lst in listeners])  # fmt: skip
        self.closing.extend(lst for lst in self.listeners if lst.spec.text in removed)
        for listener in listeners:
            if listener.spec.text in added:
                log.info("listening on %s", listener.uri)
        self.config, self.listeners, self.target = config, listeners, config.workers
        self.generation += 1
        self.boot_failures = 0
        log.info("reload: starting generation %d (%d workers, %s)", self.generation,
                 self.target, config.reload_strategy)  # fmt: skip

    def watch_reload(self) -> None:
        """Finish a reload once no older worker is left (closing the listeners it removed);
        give it up if a new worker does not boot within the graceful timeout."""
        older = any(w.generation != self.generation for w in self.workers.values())
        if older:
            now, limit = time.monotonic(), self.config.graceful_timeout
            if self.reload is not None and any(
                w.generation == self.generation and not w.ready and now - w.spawned_at > limit
                for w in self.workers.values()
            ):
                self.abort_reload(f"a worker of generation {self.generation} was not ready "
                                  f"within {limit:g}s")  # fmt: skip
            return
        for listener in self.closing:
            log.info("closed %s", listener.uri)
            listener.close()
        self.closing = []
        if self.reload is not None:
            self.reload = None
            log.info("reload complete: generation %d serving with %d workers",
                     self.generation, len(self.workers))  # fmt: skip

    def generation_ready(self) -> bool:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        return len(current) >= self.target and all(w.ready for w in current)

    def abort_reload(self, why: str) -> None:
        """The health gate: the new generation failed; stop it, stay on the old one."""
        reload, self.reload = self.reload, None
        assert reload is not None
        failed = self.generation
        for worker in self.workers.values():
            if worker.generation == failed:
                worker.retiring, worker.why_retired = True, "reload failed"
                self.kill(worker, signal.SIGKILL)
        wanted = {lst.spec.text for lst in reload.previous_listeners}
        for listener in self.listeners:
            if listener.spec.text not in wanted:
                listener.close()  # opened for the failed generation only
        self.closing = [lst for lst in self.closing if lst not in reload.previous_listeners]
        self.generation, self.config = reload.previous_generation, reload.previous_config
        self.listeners, self.preloaded = reload.previous_listeners, reload.previous_preloaded
        self.target = reload.previous_target
        log.error("reload failed: %s; still serving generation %d", why, self.generation)

"""Metrics: ``--metrics tcp://127.0.0.1:9100`` (or ``unix:PATH``), served by the master.

The numbers are already in shared memory: every worker counts its requests, handler errors,
accepted connections and request durations (histogram buckets) in its scoreboard slot. A
scrape adds them up: a custom ``prometheus_client`` collector reads the scoreboards and the
master's own counts, so there is no multiprocess directory and no file. The endpoint is a
``LoopServer`` of the master's loop, so a slow or silent scraper never blocks it (no thread,
which forked workers would inherit half-way).

Counters never go down: when a worker exits, the master folds its last numbers into the
``retired`` series of each listener (``Accounts.absorb``), so ``sum by (listener)`` stays
monotonic while the per-worker series come and go with the workers.
"""

from __future__ import annotations

import logging
import selectors
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cluster.generation import Generation
from cluster.health import DOWN, DRAINING, READY, STARTING, STOPPING
from cluster.listeners import Listener
from cluster.loopserver import Conn, LoopServer
from workers.runtime.accept import listen_queue
from workers.runtime.scoreboard import BUCKETS, REJECT_REASONS, ListenerStats

log = logging.getLogger("cluster.master")

RESTART_REASONS = ("crash", "killed", "timeout", "recycle", "reload", "scale")
OPENMETRICS = "application/openmetrics-text"
HEALTH_STATES = (STARTING, READY, DRAINING, STOPPING, DOWN)


def restart_reason(retiring: str, kind: str) -> str:
    """Why a worker was replaced, in the metric's words, from the master's own."""
    if retiring == "recycled":
        return "recycle"
    if retiring == "hung":
        return "timeout"
    if retiring == "scaled down":
        return "scale"
    if retiring.startswith("replaced by generation") or retiring == "reload failed":
        return "reload"
    return "killed" if kind == "killed" else "crash"


@dataclass
class Accounts:
    """What the master counts itself: gone workers' numbers, and restarts by reason."""

    retired: dict[str, ListenerStats] = field(default_factory=dict)  # by listener URI
    restarts: Counter = field(default_factory=Counter)

    def absorb(self, generation: Generation, slot: int) -> None:
        """A worker of ``generation`` in ``slot`` is gone: keep its numbers."""
        stats = generation.scoreboard.listener_stats(slot)
        for uri, numbers in zip(generation.uris, stats, strict=False):
            self.retired[uri] = self.retired.get(uri, ListenerStats()) + numbers

    def per_listener(self, generations: Iterable[Generation]) -> dict[str, ListenerStats]:
        """Every listener's totals: the gone workers' and the live ones'."""
        totals = dict(self.retired)
        for generation in generations:
            for worker in generation:
                stats = generation.scoreboard.listener_stats(worker.slot)
                for uri, numbers in zip(generation.uris, stats, strict=False):
                    totals[uri] = totals.get(uri, ListenerStats()) + numbers
        return totals


class Collector:
    """A ``prometheus_client`` collector over the master's generations and accounts."""

    def __init__(self, source: Callable[[], dict]) -> None:
        self.source = source  # Master.metrics_source: the generations and the counts

    def describe(self) -> list:
        return []  # no fixed description: the registry then does not collect at register

    def collect(self):  # noqa: ANN201
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        now = self.source()
        labels = ["listener", "worker"]
        requests = CounterMetricFamily("cluster_requests", "Requests served.", labels=labels)
        errors = CounterMetricFamily("cluster_handler_errors", "Errors raised by handlers.",
                                     labels=labels)  # fmt: skip
        accepted = CounterMetricFamily("cluster_connections_accepted",
                                       "Connections (or datagrams) accepted.", labels=labels)  # fmt: skip
        in_progress = GaugeMetricFamily("cluster_requests_in_progress", "Requests running now.",
                                        labels=labels)  # fmt: skip
        duration = HistogramMetricFamily("cluster_request_duration_seconds",
                                         "How long requests took.", labels=labels)  # fmt: skip
        rejected = CounterMetricFamily(
            "cluster_rejected", "Connections (or datagrams) turned away before their handler: "
            "allow (source not allowed), untrusted (PROXY header from outside --proxy-allow), "
            "proxy (bad or missing PROXY header), timeout (header not complete in time).",
            labels=[*labels, "reason"],
        )  # fmt: skip

        def add(uri: str, worker: str, stats: ListenerStats) -> None:
            requests.add_metric([uri, worker], stats.requests)
            errors.add_metric([uri, worker], stats.errors)
            accepted.add_metric([uri, worker], stats.accepted)
            running, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), stats.buckets, strict=True):
                running += count
                buckets.append((_bound(bound), running))
            duration.add_metric([uri, worker], buckets, stats.duration_sum)
            for reason, count in zip(REJECT_REASONS, stats.rejected, strict=True):
                rejected.add_metric([uri, worker, reason], count)

        states: Counter = Counter()
        for generation in now["generations"]:
            for worker in generation:
                view = worker.slot_view()
                states[view.state] += 1
                for uri, stats in zip(generation.uris, view.listeners, strict=False):
                    add(uri, str(worker.pid), stats)
                busy: Counter = Counter(lane.listener for lane in view.lanes if lane.started)
                for index, uri in enumerate(generation.uris):
                    in_progress.add_metric([uri, str(worker.pid)], busy.get(index, 0))
        for uri, stats in now["accounts"].retired.items():
            add(uri, "retired", stats)
        yield from (requests, errors, accepted, in_progress, duration, rejected)
        workers = GaugeMetricFamily("cluster_workers", "Workers by state.", labels=["state"])
        for state in ("booting", "idle", "busy", "draining"):
            workers.add_metric([state], states.get(state, 0))
        yield workers
        restarts = CounterMetricFamily("cluster_worker_restarts",
                                       "Workers replaced, by reason.", labels=["reason"])  # fmt: skip
        for reason in RESTART_REASONS:
            restarts.add_metric([reason], now["accounts"].restarts.get(reason, 0))
        yield restarts
        yield GaugeMetricFamily("cluster_generation", "The generation serving.",
                                value=now["generation"])  # fmt: skip
        yield GaugeMetricFamily("cluster_uptime_seconds", "Seconds since the master started.",
                                value=now["uptime"])  # fmt: skip
        queue = GaugeMetricFamily("cluster_listen_queue",
                                  "Connections waiting in a stream listener's accept queue.",
                                  labels=["listener"])  # fmt: skip
        backlog = GaugeMetricFamily("cluster_listen_backlog", "A stream listener's backlog.",
                                    labels=["listener"])  # fmt: skip
        for listener in now["listeners"]:
            found = listen_queue(listener.sock)
            if found is not None:
                queue.add_metric([listener.uri], found[0])
                backlog.add_metric([listener.uri], found[1])
        yield from (queue, backlog)
        if now.get("health"):
            health = GaugeMetricFamily("cluster_health", "What --health reports: 1 for the "
                                       "state it is in.", labels=["state"])  # fmt: skip
            for state in HEALTH_STATES:
                health.add_metric([state], 1 if state == now["health"] else 0)
            yield health


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class MetricsServer(LoopServer):
    """HTTP on the master's loop: ``GET /metrics`` (any path), one scrape per connection."""

    name = "metrics"
    max_message = 16384
    evict_when_full = True  # a flood of half-sent scrapes drops its own oldest, not Prometheus

    def __init__(self, listener: Listener, selector: selectors.BaseSelector,
                 source: Callable[[], dict]) -> None:  # fmt: skip
        super().__init__(listener.sock, selector, listener.uri)
        self.listener = listener  # its bind text names it to an upgrade's new master
        # Everything a scrape will import is imported now, at start: an import at the first
        # scrape opens files, and a master out of fds then answered it with a traceback.
        import prometheus_client.core  # noqa: F401  (Collector.collect's)
        import prometheus_client.exposition  # noqa: F401
        import prometheus_client.openmetrics.exposition  # noqa: F401
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(source))

    def split(self, conn: Conn) -> list[bytes]:
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            return []
        head = bytes(conn.inbuf[:end])
        conn.inbuf.clear()
        return [head]

    def respond(self, conn: Conn, message: bytes) -> bytes:
        conn.close_after_write = True
        request_line, _, headers = message.partition(b"\r\n")
        if not request_line.startswith((b"GET ", b"HEAD ")):
            return _http(405, b"text/plain", b"only GET\n")
        started = time.perf_counter()
        if OPENMETRICS.encode() in headers.lower():
            from prometheus_client.openmetrics.exposition import (
                CONTENT_TYPE_LATEST,
                generate_latest,
            )
        else:
            from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
        body = generate_latest(self.registry)
        log.debug("metrics: scrape in %.1f ms", (time.perf_counter() - started) * 1000)
        if request_line.startswith(b"HEAD "):
            body = b""
        return _http(200, CONTENT_TYPE_LATEST.encode(), body)

    def refuse(self, conn: Conn, why: str) -> bytes:
        return _http(400, b"text/plain", why.encode() + b"\n")

    def close(self, unlink: bool = True) -> None:
        """``unlink``: remove a Unix socket file we made (not once a new master holds it)."""
        self.close_connections()
        self.listener.close(unlink=unlink)


def _http(code: int, content_type: bytes, body: bytes) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 405: b"Method Not Allowed"}[code]
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close"
            b"\r\n\r\n" % (code, reason, content_type, len(body))) + body  # fmt: skip

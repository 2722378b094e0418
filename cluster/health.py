"""Health: ``--health tcp://127.0.0.1:8081``, what a load balancer asks before it sends traffic.

One port answers two protocols, because the balancers in use speak one or the other:

- **HTTP** (HAProxy's ``option httpchk``, nginx, a Kubernetes readiness probe, curl):
  ``200`` while the host should get traffic, ``503`` while it is starting, draining or
  stopping, with a small JSON body (state, generation, workers, idle workers, weight).
  ``GET /live`` is the liveness answer: ``200`` whenever the master's loop runs, whatever the
  state, so that a probe never restarts a host that is only draining.
- **HAProxy's agent-check**: the agent connects and reads one line, sending nothing (or the
  line of its ``agent-send``). It gets ``ready 75%`` (in rotation, weighted by the share of
  idle capacity), ``drain`` (no new traffic, the open connections stay) or ``maint`` (starting
  or stopping). ``ready`` is also the word that takes a host out of an agent's drain or
  maint again, so recovering needs no operator on the balancer.

A client that says nothing is an agent: after ``AGENT_WAIT`` of silence it gets the agent
line and the end. The server is a ``LoopServer`` in the master's own loop, so a busy pool
never delays an answer and a silent client never blocks another.

The state has one owner, ``Health``: the operator's drain (``ctl drain`` / ``undrain``), with
the time it began; the rest of the state is read from the master's other parts (ready yet?
a drain delay or a stop under way?) through the pure ``state_of``.
"""

from __future__ import annotations

import json
import math
import selectors
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from cluster.handover import ENV_DRAINED
from cluster.listeners import Listener
from cluster.loopserver import Conn, LoopServer

STARTING, READY, DRAINING, STOPPING = "starting", "ready", "draining", "stopping"
DOWN = "down"  # ready once, but no worker serves now, and the last one forked failed to boot
AGENT_WAIT = 0.1  # seconds of silence after which a client is taken for HAProxy's agent
SMOOTHING = 2.0  # seconds: the time constant of the idle share behind the agent's weight
HTTP_METHODS = (b"GET ", b"HEAD ")
LIVE_PATHS = (b"/live", b"/livez", b"/healthz/live")


def state_of(ready: bool, drained: bool, delaying: bool, stopping: bool,
             serving: bool = True) -> str:  # fmt: skip
    """The host's state for the balancer, from the facts of the master's parts: a stop
    outranks a drain, which outranks a boot that has not finished. ``serving``: some worker
    serves now; a host that was ready and has none (they died, and their replacements cannot
    boot: new code on disk that fails, say) is down, not ready, or the balancer would send
    it clients that wait in the listen queue for nobody."""
    if stopping:
        return STOPPING
    if drained or delaying:
        return DRAINING
    if not ready:
        return STARTING
    return READY if serving else DOWN


def weight(idle_share: float) -> int:
    """The agent's weight: the share of idle capacity, in percent, at least 1 while in
    rotation. Zero would be a drain in HAProxy's eyes, and a host whose every worker is busy
    for an instant is still the one to queue at if all are (HAProxy with every weight at 0
    has no server left to send to)."""
    return max(1, min(100, round(100 * idle_share)))


def idle_share(free_lanes: int, lanes: int) -> float:
    """Free lanes of the serving workers over the lanes of the pool's target (0 to 1)."""
    return min(1.0, free_lanes / lanes) if lanes > 0 else 0.0


def smoothed(previous: float | None, since: float, share: float) -> float:
    """An exponential moving average of the idle share, over ``SMOOTHING`` seconds: one
    look at the scoreboard sees each worker busy or idle, which for short requests is a
    coin toss; the balancer's weight should follow the load, not the toss."""
    if previous is None:
        return share
    keep = math.exp(-max(0.0, since) / SMOOTHING)
    return keep * previous + (1 - keep) * share


def agent_line(report: dict) -> bytes:
    """The agent-check answer for ``report`` (``Master.health_report``)."""
    state = report["state"]
    if state == READY:
        return b"ready %d%%\n" % report["weight"]
    if state == DOWN:
        return b"down\n"
    return b"drain\n" if state == DRAINING else b"maint\n"


def http_reply(report: dict, request_line: bytes) -> bytes:
    """The HTTP answer to one request line: 200 or 503 with the report as JSON."""
    method, _, rest = request_line.partition(b" ")
    path = rest.partition(b" ")[0].split(b"?")[0]
    live = path in LIVE_PATHS
    code = 200 if live or report["state"] == READY else 503
    body = json.dumps(report, separators=(",", ":")).encode() + b"\n"
    reason = b"OK" if code == 200 else b"Service Unavailable"
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n" % (code, reason, len(body)))  # fmt: skip
    return head + (b"" if method == b"HEAD" else body)


@dataclass
class Health:
    """The one owner of the operator's drain: out of rotation since when (None: in)."""

    drained_since: float | None = None
    idle: float | None = None  # the smoothed idle share (``smoothed``), and when it was
    idle_at: float = 0.0

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str], now: float) -> Health:
        """An upgrade's new master keeps the old one's drain (and since when), taking the
        variable out of the environment so that nothing else inherits it."""
        text = env.pop(ENV_DRAINED, "")
        try:
            return cls(now - max(0.0, float(text))) if text else cls()
        except ValueError:
            return cls()

    @property
    def drained(self) -> bool:
        return self.drained_since is not None

    def drain(self, now: float) -> bool:
        """Out of rotation; False if it already was (the first time counts)."""
        if self.drained_since is not None:
            return False
        self.drained_since = now
        return True

    def undrain(self) -> bool:
        """Back in rotation; False if it was not out."""
        was, self.drained_since = self.drained_since is not None, None
        return was

    def weigh(self, share: float, now: float) -> int:
        """The agent's weight now: this look at the idle share, folded into the average."""
        self.idle = smoothed(self.idle, now - self.idle_at, share)
        self.idle_at = now
        return weight(self.idle)

    def delay_left(self, delay: float, now: float) -> float:
        """How much of ``--drain-delay`` a stop still owes the balancer: a host drained by
        the operator long enough ago is out of rotation already."""
        if self.drained_since is None:
            return delay
        return max(0.0, delay - (now - self.drained_since))


class HealthServer(LoopServer):
    """HTTP and agent-check on the master's loop (see the module docstring)."""

    name = "health"
    max_message = 8192
    idle_timeout = 1.0  # a health check that has not sent its request by then is dropped
    greeting_wait = AGENT_WAIT
    evict_when_full = True  # a flood of half-sent checks drops its own oldest, not the next check

    def __init__(self, listener: Listener, selector: selectors.BaseSelector,
                 report: Callable[[], dict]) -> None:  # fmt: skip
        super().__init__(listener.sock, selector, listener.uri)
        self.listener = listener  # its bind text names it to an upgrade's new master
        self.report = report  # Master.health_report: read afresh for every answer

    def greet(self, conn: Conn) -> bytes:
        """A silent client is HAProxy's agent."""
        return agent_line(self.report())

    def split(self, conn: Conn) -> list[bytes]:
        data = bytes(conn.inbuf)
        if data.startswith(HTTP_METHODS) or any(m.startswith(data) for m in HTTP_METHODS):
            end = data.find(b"\r\n\r\n")
            if end < 0:
                end = data.find(b"\n\n")  # a hand-typed request
            if end < 0:
                return []
        elif b"\n" not in data and b"\r" not in data and b"\0" not in data:
            return []  # an agent-send line, still coming
        conn.inbuf.clear()
        return [data]

    def respond(self, conn: Conn, message: bytes) -> bytes:
        conn.close_after_write = True
        first = message.split(b"\n", 1)[0].rstrip(b"\r")
        if first.startswith(HTTP_METHODS):
            return http_reply(self.report(), first)
        if first[-8:-1] == b"HTTP/1.":  # another method: health is read-only
            return (b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n")  # fmt: skip
        return agent_line(self.report())  # agent-send's line, whatever it says

    def refuse(self, conn: Conn, why: str) -> bytes:
        return b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def answer_now(self) -> None:
        """The master is about to exit: every check it accepted gets its answer now, from
        what it sent so far (a silent one is an agent), rather than a closed connection,
        which the balancer would count as a failed check (an upgrade's old master exits
        within milliseconds of the handover)."""
        for conn in list(self.conns.values()):
            if not conn.close_after_write:
                try:
                    conn.inbuf += conn.sock.recv(self.max_message)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    continue
                messages = self.split(conn) if conn.inbuf else []
                if messages:
                    conn.outbuf += self.respond(conn, messages[0])
                elif not conn.inbuf:
                    conn.outbuf += self.greet(conn)
            try:
                conn.sock.send(conn.outbuf)  # a few hundred bytes: the send buffer takes them
            except OSError:
                pass

    def close(self, unlink: bool = True) -> None:
        """``unlink``: remove a Unix socket file we made (not once a new master holds it)."""
        self.answer_now()
        self.close_connections()
        self.listener.close(unlink=unlink)

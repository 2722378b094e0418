"""The scoreboard: one shared-memory slot per worker, written by that worker, read by the master.

It lives in an anonymous ``MAP_SHARED`` mapping that the master creates before it forks, so
nothing touches the disk (a heartbeat file on a slow disk stalls workers) and every worker
inherits it. Each generation has its own, sized for its mode. A slot holds:

- the worker's identity and state, and its heartbeat (``SlotHeader``);
- one *lane* per request it can run at once (1 in sync mode, ``threads`` in thread mode,
  ``max_children`` in fork mode): the request's start, its client, its reads' progress;
- per listener, the connections (or datagrams) it accepted;
- per lane and listener, the requests finished, the errors its handlers raised, the
  request durations as histogram buckets (``BUCKETS``) with their sum, and the connections
  turned away before their handler, by reason (``REJECT_REASONS``): what the master's
  metrics add up at scrape time, with no file and no lock.

Writes need no lock because every field has exactly one writer: the worker's main thread
writes the header and the accept counts, each handler thread (or, in fork mode, the worker
for each child, and the child its errors) writes its own lane. A reader may see a lane
mid-update; the master only acts on a lane that has looked overdue for a whole
``--timeout``, and a counter read one request early is as good as one read later. (One
field has several writers on purpose: when a rejection was last logged, shared by a worker
and its fork-mode children so that they log rejections at the same rate as one process;
a race there costs at most one extra log line.)

On the request path the numbers are written through one ``memoryview`` of doubles over the
whole mapping (counts are exact in a double up to 2**53), which is the cheapest store Python
has: a lane is begun with its start time and client, and ended with its duration's bucket,
its sum and its count.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from bisect import bisect_left
from dataclasses import dataclass
from time import monotonic

from workers.runtime.ratelog import KINDS, SharedBudget

EMPTY, BOOTING, IDLE, DRAINING = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "empty", BOOTING: "booting", IDLE: "idle", DRAINING: "draining"}
CLIENT_BYTES = 64
# Request duration bucket bounds, in seconds (Prometheus' "le"), and an overflow bucket.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Why a connection was turned away before its handler ran (workers.runtime.gate): a source
# outside the allow list, a PROXY header from an untrusted peer, a bad or missing header,
# a header not complete in time.
REJECT_REASONS = ("allow", "untrusted", "proxy", "timeout")
# Per lane and listener: errors, duration sum, then a count per bucket and the overflow (the
# requests are the sum of the buckets: one store less per request), then the rejections.
ERRORS, DURATION_SUM, FIRST_BUCKET = 0, 1, 2
FIRST_REJECT = FIRST_BUCKET + len(BUCKETS) + 1
STAT_FIELDS = FIRST_REJECT + len(REJECT_REASONS)


class Lane(ctypes.Structure):
    """One request in flight (``started`` > 0) or none (``started`` == 0).

    ``io`` and ``idle`` are written by the request's connection (``workers.runtime.client``)
    as the handler reads from its client: ``io`` is +T while a read has waited since T, -T
    once the last read returned at T, 0 before any; ``idle`` is T while the connection waits
    for its next request since T (between requests, as the handler marks them), else 0.
    """

    _fields_ = [
        ("started", ctypes.c_double),  # time.monotonic() when the request began; 0: idle
        ("io", ctypes.c_double),
        ("idle", ctypes.c_double),
        ("listener", ctypes.c_double),  # the index of the listener the request came from
        ("port", ctypes.c_double),  # the client's port; -1 for a client with none (Unix)
        ("host", ctypes.c_char * CLIENT_BYTES),  # its host, or its Unix path (often empty)
    ]


IO_OFFSET = Lane.io.offset // 8  # the io field, in doubles from the start of its lane
LISTENER_OFFSET = Lane.listener.offset // 8
PORT_OFFSET = Lane.port.offset // 8
assert Lane.idle.offset == Lane.io.offset + 8  # a connection writes idle at io's index + 1
assert ctypes.sizeof(Lane) % 8 == 0


class SlotHeader(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int32),
        ("generation", ctypes.c_int32),
        ("state", ctypes.c_int32),
        ("lanes", ctypes.c_int32),
        ("booted", ctypes.c_double),  # monotonic time the worker was forked
        ("heartbeat", ctypes.c_double),  # monotonic time the worker's loop last woke
        ("updated", ctypes.c_double),  # monotonic time of the last state change
        # the worker's log budgets (workers.runtime.ratelog), spent by its request children too
        ("log_budgets", SharedBudget * KINDS),
        # 1 while its generation's replacements fail to boot: --max-requests waits (the master's)
        ("hold_recycling", ctypes.c_int32),
    ]


def format_client(client_address: object) -> bytes:
    """A short text for a client address that has no port: its Unix path, or ``unix``."""
    if isinstance(client_address, bytes):
        return client_address[:CLIENT_BYTES] or b"unix"
    return str(client_address).encode()[:CLIENT_BYTES] or b"unix"


def client_text(host: bytes, port: float) -> str:
    """``host:port``, or the host alone (a Unix path) for a client with no port."""
    name = host.decode(errors="replace")
    return f"{name}:{int(port)}" if port >= 0 else name


@dataclass(frozen=True)
class LaneView:
    started: float
    requests: int
    client: str
    io: float = 0.0
    idle: float = 0.0
    listener: int = 0


@dataclass(frozen=True)
class ListenerStats:
    """One worker's numbers for one listener (summed over its lanes)."""

    accepted: int = 0
    requests: int = 0
    errors: int = 0
    duration_sum: float = 0.0
    buckets: tuple[int, ...] = (0,) * (len(BUCKETS) + 1)  # per bucket, not cumulative
    rejected: tuple[int, ...] = (0,) * len(REJECT_REASONS)  # per reason

    def __add__(self, other: ListenerStats) -> ListenerStats:
        return ListenerStats(
            self.accepted + other.accepted, self.requests + other.requests,
            self.errors + other.errors, self.duration_sum + other.duration_sum,
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True)),
            tuple(a + b for a, b in zip(self.rejected, other.rejected, strict=True)),
        )  # fmt: skip


@dataclass(frozen=True)
class SlotView:
    """A copy of one slot, taken by the master: what status and the timeout checks read."""

    slot: int
    pid: int
    generation: int
    state: str  # booting | idle | busy | draining
    booted: float
    heartbeat: float
    requests: int
    lanes: tuple[LaneView, ...]
    listeners: tuple[ListenerStats, ...] = ()

    def oldest_request(self) -> LaneView | None:
        busy = [lane for lane in self.lanes if lane.started > 0]
        return min(busy, key=lambda lane: lane.started) if busy else None


class WorkerSlot:
    """A worker's handle on its own slot (after the fork, in the worker)."""

    def __init__(self, header: SlotHeader, lanes: ctypes.Array, doubles: memoryview,
                 base: int, accepted: int, stats: int, listeners: int) -> None:  # fmt: skip
        self.header = header
        self.lanes = lanes
        self.doubles = doubles  # the whole mapping as doubles: the cheapest store from Python
        self._base = base  # the mapping's address
        self._accepted = accepted  # index in ``doubles`` of this slot's accept counts
        self._stats = stats  # index in ``doubles`` of this slot's lane x listener stats
        self._listeners = listeners
        self._lane_size = ctypes.sizeof(Lane) // 8
        self._lane0 = (ctypes.addressof(lanes) - base) // 8
        self._records = [lanes[n] for n in range(len(lanes))]  # ctypes indexing is slow
        self._hosts: list[object] = [None] * len(lanes)  # the host each lane's record holds
        self._io_at = [self._lane0 + n * self._lane_size + IO_OFFSET for n in range(len(lanes))]

    def io_index(self, lane: int) -> int:
        """Where lane ``lane``'s ``io`` field is in ``doubles`` (``idle`` is the next one)."""
        return self._io_at[lane]

    def stats_index(self, lane: int, listener: int) -> int:
        """Where the numbers of ``lane`` for ``listener`` begin in ``doubles``."""
        return self._stats + (lane * self._listeners + listener) * STAT_FIELDS

    def accepted_index(self, listener: int) -> int:
        return self._accepted + listener

    def set_state(self, state: int) -> None:
        self.header.state = state
        self.header.updated = time.monotonic()

    def beat(self) -> None:
        self.header.heartbeat = time.monotonic()

    def begin(self, lane: int, client_address: object, listener: int = 0) -> None:
        doubles, at = self.doubles, self._lane0 + lane * self._lane_size
        # set_client's work, inline: on the request path a call here cost 0.4 us a request.
        if type(client_address) is tuple:
            host = client_address[0]
            if host != self._hosts[lane]:  # most clients come from the host the last one did
                self._records[lane].host = str(host).encode()[:CLIENT_BYTES]
                self._hosts[lane] = host
            doubles[at + PORT_OFFSET] = client_address[1]
        else:
            self._records[lane].host = format_client(client_address)
            self._hosts[lane] = None
            doubles[at + PORT_OFFSET] = -1.0
        doubles[at + IO_OFFSET] = doubles[at + IO_OFFSET + 1] = 0.0
        doubles[at + LISTENER_OFFSET] = listener
        doubles[at] = monotonic()  # ``started``: the lane's first field

    def set_client(self, lane: int, client_address: object) -> None:
        """The client of ``lane``'s request, once a PROXY header named the original one
        (``begin`` wrote the peer's)."""
        at = self._lane0 + lane * self._lane_size
        if type(client_address) is tuple:
            host = client_address[0]
            if host != self._hosts[lane]:  # most clients come from the host the last one did
                self._records[lane].host = str(host).encode()[:CLIENT_BYTES]
                self._hosts[lane] = host
            self.doubles[at + PORT_OFFSET] = client_address[1]
        else:
            self._records[lane].host = format_client(client_address)
            self._hosts[lane] = None
            self.doubles[at + PORT_OFFSET] = -1.0

    def rejected(self, lane: int, listener: int, reason: int) -> None:
        """One connection from ``listener`` turned away in ``lane`` (``REJECT_REASONS``)."""
        self.doubles[self._stats + (lane * self._listeners + listener) * STAT_FIELDS
                     + FIRST_REJECT + reason] += 1.0  # fmt: skip

    def end(self, lane: int, listener: int = 0) -> float:
        """The request in ``lane`` (from ``listener``) is over: count it and its duration,
        which it returns."""
        doubles, at = self.doubles, self._lane0 + lane * self._lane_size
        duration = monotonic() - doubles[at]
        doubles[at] = 0.0
        stats = self._stats + (lane * self._listeners + listener) * STAT_FIELDS
        doubles[stats + DURATION_SUM] += duration
        doubles[stats + FIRST_BUCKET + bisect_left(BUCKETS, duration)] += 1.0
        return duration


class Scoreboard:
    """``capacity`` slots of ``lanes`` lanes each, for ``listeners`` listeners, in one shared
    anonymous mapping."""

    def __init__(self, capacity: int, lanes: int, listeners: int = 1) -> None:
        self.capacity = capacity
        self.lane_count = max(1, lanes)
        self.listener_count = max(1, listeners)
        self._slot_type = type(
            "Slot", (ctypes.Structure,),
            {"_fields_": [
                ("header", SlotHeader), ("lanes", Lane * self.lane_count),
                ("accepted", ctypes.c_double * self.listener_count),
                ("stats", ctypes.c_double * (self.lane_count * self.listener_count
                                             * STAT_FIELDS)),
            ]},
        )  # fmt: skip
        size = ctypes.sizeof(self._slot_type) * capacity
        self.recycling_held = 0  # the master's word to every slot (``hold_recycling``)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)  # zero-filled by the kernel
        self._slots = (self._slot_type * capacity).from_buffer(self._map)
        self._doubles = memoryview(self._map).cast("d")

    def claim(self, slot: int, pid: int, generation: int) -> None:
        """Reset a slot for a newly forked worker (the master does this right after fork)."""
        ctypes.memset(ctypes.addressof(self._slots[slot]), 0, ctypes.sizeof(self._slot_type))
        header = self._slots[slot].header
        header.pid, header.generation, header.lanes = pid, generation, self.lane_count
        header.booted = header.heartbeat = header.updated = time.monotonic()
        header.state = BOOTING
        header.hold_recycling = self.recycling_held

    def hold_recycling(self, hold: bool) -> bool:
        """Tell every worker of this generation to postpone (or resume) its recycling by
        ``--max-requests``; whether that changed anything."""
        if self.recycling_held == int(hold):
            return False
        self.recycling_held = int(hold)
        for record in self._slots:
            record.header.hold_recycling = self.recycling_held
        return True

    def release(self, slot: int) -> None:
        self._slots[slot].header.state = EMPTY
        self._slots[slot].header.pid = 0

    def worker_slot(self, slot: int) -> WorkerSlot:
        record = self._slots[slot]
        base = ctypes.addressof(self._slots)
        return WorkerSlot(
            record.header, record.lanes, self._doubles, base,
            (ctypes.addressof(record.accepted) - base) // 8,
            (ctypes.addressof(record.stats) - base) // 8, self.listener_count,
        )  # fmt: skip

    def is_idle(self, slot: int) -> bool:
        """Ready and running no request: what the pool decisions ask of every worker on each
        turn of the master's loop, without copying the slot."""
        record = self._slots[slot]
        return record.header.state == IDLE and not any(lane.started for lane in record.lanes)

    def _tally(self, slot: int) -> tuple[list[int], tuple[ListenerStats, ...]]:
        """One pass over a slot's numbers: the requests per lane, and per listener its
        accepts, requests, errors, duration sum and buckets (summed over the lanes)."""
        record = self._slots[slot]
        numbers = record.stats[:]  # one copy out of shared memory, then plain floats
        width = len(BUCKETS) + 1
        per_lane = [0] * self.lane_count
        per_listener = []
        for listener in range(self.listener_count):
            errors = total = 0.0
            buckets = [0.0] * width
            rejected = [0.0] * len(REJECT_REASONS)
            for lane in range(self.lane_count):
                at = (lane * self.listener_count + listener) * STAT_FIELDS
                errors += numbers[at + ERRORS]
                total += numbers[at + DURATION_SUM]
                counts = numbers[at + FIRST_BUCKET : at + FIRST_BUCKET + width]
                per_lane[lane] += int(sum(counts))
                buckets = [b + c for b, c in zip(buckets, counts, strict=True)]
                turned = numbers[at + FIRST_REJECT : at + STAT_FIELDS]
                rejected = [r + t for r, t in zip(rejected, turned, strict=True)]
            per_listener.append(ListenerStats(int(record.accepted[listener]), int(sum(buckets)),
                                              int(errors), total, tuple(int(b) for b in buckets),
                                              tuple(int(r) for r in rejected)))  # fmt: skip
        return per_lane, tuple(per_listener)

    def listener_stats(self, slot: int) -> tuple[ListenerStats, ...]:
        """One slot's numbers per listener, summed over its lanes."""
        return self._tally(slot)[1]

    def view(self, slot: int) -> SlotView:
        record = self._slots[slot]
        header = record.header
        per_lane, listeners = self._tally(slot)
        lanes = tuple(
            LaneView(
                lane.started,
                per_lane[n],
                client_text(lane.host, lane.port),
                lane.io,
                lane.idle,
                int(lane.listener),
            )  # fmt: skip
            for n, lane in enumerate(record.lanes)
        )
        state = STATE_NAMES.get(header.state, "unknown")
        if state == "idle" and any(lane.started > 0 for lane in lanes):
            state = "busy"
        return SlotView(
            slot=slot, pid=header.pid, generation=header.generation, state=state,
            booted=header.booted, heartbeat=header.heartbeat,
            requests=sum(per_lane), lanes=lanes, listeners=listeners,
        )  # fmt: skip

    def close(self) -> None:
        """Unmap, unless a WorkerSlot still points into the mapping (then GC unmaps later)."""
        self._doubles.release()
        del self._slots
        try:
            self._map.close()
        except BufferError:
            pass

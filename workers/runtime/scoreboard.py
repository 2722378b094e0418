"""The scoreboard: one shared-memory slot per worker, written by that worker, read by the master.

It lives in an anonymous ``MAP_SHARED`` mapping that the master creates before it forks, so
nothing touches the disk (a heartbeat file on a slow disk stalls workers) and every worker
inherits it. Each slot holds the worker's identity and state, and one *lane* per request it
can run at once (1 in sync mode, ``threads`` in thread mode, ``max_children`` in fork mode).

Writes need no lock because every field has exactly one writer: the worker's main thread
writes the slot, each handler thread (or, in fork mode, the worker for each child) writes its
own lane. A reader may see a lane mid-update; the master only acts on a lane that has looked
overdue for a whole ``--timeout``, so a torn read costs nothing. On the request path a worker
writes a lane twice: the start time and client when a request begins, and the start time
(back to 0) and its count when it ends.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass

EMPTY, BOOTING, IDLE, DRAINING = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "empty", BOOTING: "booting", IDLE: "idle", DRAINING: "draining"}
CLIENT_BYTES = 64


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
        ("requests", ctypes.c_uint64),  # requests this lane has finished
        ("client", ctypes.c_char * CLIENT_BYTES),
    ]


IO_OFFSET = Lane.io.offset // 8  # the io field, in doubles from the start of its lane
assert Lane.idle.offset == Lane.io.offset + 8  # a connection writes idle at io's index + 1


class SlotHeader(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int32),
        ("generation", ctypes.c_int32),
        ("state", ctypes.c_int32),
        ("lanes", ctypes.c_int32),
        ("booted", ctypes.c_double),  # monotonic time the worker was forked
        ("heartbeat", ctypes.c_double),  # monotonic time the worker's loop last woke
        ("updated", ctypes.c_double),  # monotonic time of the last state change
    ]


def format_client(client_address: object) -> bytes:
    """A short text for the client address: ``host:port``, or the Unix path (often empty)."""
    if isinstance(client_address, tuple):
        return b"%s:%d" % (str(client_address[0]).encode(), client_address[1])
    if isinstance(client_address, bytes):
        return client_address[:CLIENT_BYTES] or b"unix"
    return str(client_address).encode()[:CLIENT_BYTES] or b"unix"


@dataclass(frozen=True)
class LaneView:
    started: float
    requests: int
    client: str
    io: float = 0.0
    idle: float = 0.0


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

    def oldest_request(self) -> LaneView | None:
        busy = [lane for lane in self.lanes if lane.started > 0]
        return min(busy, key=lambda lane: lane.started) if busy else None


class WorkerSlot:
    """A worker's handle on its own slot (after the fork, in the worker)."""

    def __init__(self, header: SlotHeader, lanes: ctypes.Array, doubles: memoryview,
                 base: int) -> None:  # fmt: skip
        self.header = header
        self.lanes = lanes
        self.doubles = doubles  # the whole mapping as doubles: the cheapest store from Python
        self._base = base

    def io_index(self, lane: int) -> int:
        """Where lane ``lane``'s ``io`` field is in ``doubles`` (``idle`` is the next one)."""
        return (ctypes.addressof(self.lanes[lane]) - self._base) // 8 + IO_OFFSET

    def set_state(self, state: int) -> None:
        self.header.state = state
        self.header.updated = time.monotonic()

    def beat(self) -> None:
        self.header.heartbeat = time.monotonic()

    def begin(self, lane: int, client_address: object) -> None:
        record = self.lanes[lane]
        record.client = format_client(client_address)
        record.io = record.idle = 0.0
        record.started = time.monotonic()

    def end(self, lane: int) -> None:
        record = self.lanes[lane]
        record.started = 0.0
        record.requests += 1


class Scoreboard:
    """``capacity`` slots of ``lanes`` lanes each, in one shared anonymous mapping."""

    def __init__(self, capacity: int, lanes: int) -> None:
        self.capacity = capacity
        self.lane_count = max(1, lanes)
        self._slot_type = type(
            "Slot", (ctypes.Structure,),
            {"_fields_": [("header", SlotHeader), ("lanes", Lane * self.lane_count)]},
        )  # fmt: skip
        size = ctypes.sizeof(self._slot_type) * capacity
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

    def release(self, slot: int) -> None:
        self._slots[slot].header.state = EMPTY
        self._slots[slot].header.pid = 0

    def worker_slot(self, slot: int) -> WorkerSlot:
        record = self._slots[slot]
        return WorkerSlot(record.header, record.lanes, self._doubles,
                          ctypes.addressof(self._slots))  # fmt: skip

    def is_idle(self, slot: int) -> bool:
        """Ready and running no request: what the pool decisions ask of every worker on each
        turn of the master's loop, without copying the slot."""
        record = self._slots[slot]
        return record.header.state == IDLE and not any(lane.started for lane in record.lanes)

    def view(self, slot: int) -> SlotView:
        record = self._slots[slot]
        header = record.header
        lanes = tuple(
            LaneView(
                lane.started,
                lane.requests,
                lane.client.decode(errors="replace"),
                lane.io,
                lane.idle,
            )  # fmt: skip
            for lane in record.lanes
        )
        state = STATE_NAMES.get(header.state, "unknown")
        if state == "idle" and any(lane.started > 0 for lane in lanes):
            state = "busy"
        return SlotView(
            slot=slot, pid=header.pid, generation=header.generation, state=state,
            booted=header.booted, heartbeat=header.heartbeat,
            requests=sum(lane.requests for lane in lanes), lanes=lanes,
        )  # fmt: skip

    def close(self) -> None:
        """Unmap, unless a WorkerSlot still points into the mapping (then GC unmaps later)."""
        self._doubles.release()
        del self._slots
        try:
            self._map.close()
        except BufferError:
            pass

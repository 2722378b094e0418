"""What the progress marks cost on the request path: one read from a client, with and without.

``--timeout`` measures a request's progress: each accepted connection is a
``workers.runtime.client.ClientSocket``, whose ``recv``/``recv_into`` write the time into its
scoreboard lane before and after the read. This times that read against the plain socket's,
on a socketpair with the bytes already there (so the system call is as short as it gets and
the marks' share is at its largest), in nanoseconds per read, the median of several runs.

    python scripts/progresscost.py
"""

from __future__ import annotations

import socket
import statistics
import time

from workers.runtime.client import ClientSocket
from workers.runtime.scoreboard import Scoreboard

READS = 200_000
RUNS = 5
PAYLOAD = b"x" * 64


def per_read(sock: socket.socket, peer: socket.socket, between: bool) -> float:
    """Nanoseconds per ``recv`` of 64 bytes that are already waiting."""
    recv, send = sock.recv, peer.send
    mark = getattr(sock, "between_requests", None) if between else None
    started = time.perf_counter_ns()
    for _ in range(READS):
        send(PAYLOAD)
        if mark is not None:
            mark()
        recv(64)
    return (time.perf_counter_ns() - started) / READS


def main() -> None:
    board = Scoreboard(1, 1)
    slot = board.worker_slot(0)
    a, peer = socket.socketpair()
    plain = socket.socket(a.family, a.type, a.proto, fileno=a.detach())
    b, peer2 = socket.socketpair()
    marked = ClientSocket(b.family, b.type, b.proto, fileno=b.detach())
    marked.between = False
    marked._deadline = time.monotonic() + 3600  # a request deadline runs, as with the default
    marked.attach(slot.doubles, slot.io_index(0))
    results = {"plain socket": [], "ClientSocket (a read within a request)": [],
               "ClientSocket (the wait for the next request)": []}  # fmt: skip
    for _ in range(RUNS):  # interleaved, so that drift hits each alike
        results["plain socket"].append(per_read(plain, peer, False))
        results["ClientSocket (a read within a request)"].append(per_read(marked, peer2, False))
        results["ClientSocket (the wait for the next request)"].append(
            per_read(marked, peer2, True)
        )
    base = statistics.median(results["plain socket"])
    print(f"{'read':<46} {'ns per read':>12} {'extra':>8}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<46} {median:12.0f} {median - base:+8.0f}")
    for sock in (plain, peer, marked, peer2):
        sock.close()


if __name__ == "__main__":
    main()

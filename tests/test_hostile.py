"""Hostile and broken clients: each is cut off alone, and the well-behaved ones never notice.

The promises of docs/security.md, each against a real cluster: silent connections wait in
the worker's waiting room instead of a handler; a client that drips bytes is cut at
``--request-timeout`` however often it sends one; resets, odd datagrams and running out of
file descriptors cost the log a bounded number of lines.
"""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import struct
import threading
import time

import pytest

from tests.conftest import read_line, tcp_connect, udp_roundtrip, unix_dgram_roundtrip
from tests.procs import accept_queue_length, alive, children, wait_for

pytestmark = pytest.mark.timeout(60)

REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
DRIP = b"GET / HTTP/1.1\r\nX-Drip: " + b"a" * 4096  # never a whole request


def request_latency(address: tuple[str, int]) -> float:
    """One HTTP request on a new connection: seconds until the whole reply came (inf if
    it failed)."""
    started = time.monotonic()
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(REQUEST)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    except OSError:
        return float("inf")
    return time.monotonic() - started if reply.startswith(b"HTTP/1.1 200") else float("inf")


class GoodClient(threading.Thread):
    """A request every ``period`` seconds until ``until`` (monotonic); keeps (when, latency)."""

    def __init__(self, address: tuple[str, int], until: float, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.address, self.until, self.period = address, until, period
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        while (now := time.monotonic()) < self.until:
            self.samples.append((now, request_latency(self.address)))
            time.sleep(max(0.0, now + self.period - time.monotonic()))  # the pace, not a wait

    def worst(self, after: float = 0.0) -> float:
        return max(latency for when, latency in self.samples if when >= after)


class Dripper(threading.Thread):
    """Connects and sends one byte of a request that never ends every ``period`` seconds, until
    the server closes or resets; ``cut_at`` is when that happened."""

    def __init__(self, address: tuple[str, int], period: float, until: float) -> None:
        super().__init__(daemon=True)
        self.sock = tcp_connect(address)
        self.port = self.sock.getsockname()[1]
        self.period, self.until = period, until
        self.cut_at: float | None = None

    def run(self) -> None:
        sock = self.sock
        try:
            for byte in DRIP:
                if time.monotonic() > self.until:
                    return
                sock.send(bytes([byte]))
                if select.select([sock], [], [], self.period)[0]:
                    sock.recv(4096)  # end-of-file, or a 400 just before it
                    self.cut_at = time.monotonic()
                    return
        except OSError:
            self.cut_at = time.monotonic()
        finally:
            sock.close()


def silent_clients(address: object, count: int) -> list[socket.socket]:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    socks = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.connect(address)
        socks.append(sock)
    return socks


@pytest.mark.parametrize("held_by", ["kernel", "room"])
def test_sync_ten_silent_clients_against_two_workers_delay_no_reply_past_half_a_second(
    start_cluster, held_by
) -> None:
    """By default the kernel holds them (TCP_DEFER_ACCEPT); without it, the waiting room."""
    room_only = ["--no-defer-accept"] if held_by == "room" else []
    cluster = start_cluster("http-hello", "-w", "2", "-b", "127.0.0.1:0", *room_only)
    address = cluster.address()
    silent = silent_clients(address, 10)
    try:
        good = GoodClient(address, time.monotonic() + 1.0, period=0.05)
        good.run()
        assert len(good.samples) >= 10
        assert good.worst() <= 0.5, good.samples
    finally:
        for sock in silent:
            sock.close()


def test_silent_unix_clients_wait_in_the_room_and_are_cut_at_the_request_timeout(
    start_cluster, tmp_path
) -> None:
    path = str(tmp_path / "s.sock")
    cluster = start_cluster("echo", "-w", "1", "-b", f"unix:{path}", "--request-timeout", "0.5")
    silent = silent_clients(path, 5)
    try:
        # The one sync worker is free for a client that speaks, all along.
        with socket.socket(socket.AF_UNIX) as good:
            good.settimeout(2)
            good.connect(path)
            good.sendall(b"hello\n")
            assert read_line(good) == b"hello\n"
        for sock in silent:  # ...and the silent ones are closed at their deadline
            sock.settimeout(5)
            assert sock.recv(10) == b""
        cluster.wait_log("cut client .*sent nothing within --request-timeout 0.5s")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.slow
def test_sync_drippers_are_cut_at_the_request_timeout_and_service_recovers_in_time(
    start_cluster,
) -> None:
    """10 drip clients (a byte every 0.2 s), 2 workers, ``--request-timeout 0.5``: each dripper
    holds a worker for 0.5 s at most, so the queue of them is gone after 0.5 x 10 / 2 s, and
    replies are back under 0.5 s within 0.5 x 10 / 2 + 2 = 4.5 s of the attack's start. Each
    cut is logged once."""
    timeout, drippers, workers = 0.5, 10, 2
    cluster = start_cluster("http-hello", "-w", str(workers), "-b", "127.0.0.1:0",
                            "--request-timeout", str(timeout), "--access-log", "-")  # fmt: skip
    address = cluster.address()
    start = time.monotonic()
    recovered_by = start + timeout * drippers / workers + 2
    attack = [Dripper(address, 0.2, until=start + 20) for _ in range(drippers)]
    for dripper in attack:
        dripper.start()
    good = GoodClient(address, recovered_by + 1.0)
    good.run()
    for dripper in attack:
        dripper.join(10)
    assert all(d.cut_at is not None and d.cut_at < recovered_by for d in attack), [
        None if d.cut_at is None else round(d.cut_at - start, 2) for d in attack
    ]
    assert good.worst(after=recovered_by) <= 0.5, good.samples
    for dripper in attack:  # one line per cut, naming the client
        port = dripper.port
        wait_for(lambda port=port: f"cut client 127.0.0.1:{port}:" in cluster.log, 5,
                 f"the cut of {port} logged")  # fmt: skip
        assert cluster.log.count(f"cut client 127.0.0.1:{port}:") == 1
        # Its worker held it no longer than the timeout (the access log's duration).
        (held,) = re.findall(rf"127\.0\.0\.1:{port} \S+ pid=\d+ ([\d.]+)ms", cluster.log)
        assert float(held) <= timeout * 1000 + 300, held


def test_thread_mode_serves_well_behaved_clients_through_drip_and_silent_attacks(
    start_cluster,
) -> None:
    cluster = start_cluster("http-hello", "-w", "2", "-k", "thread", "--threads", "16",
                            "-b", "127.0.0.1:0")  # fmt: skip
    address = cluster.address()
    start = time.monotonic()
    attack = [Dripper(address, 0.2, until=start + 1.2) for _ in range(10)]
    for dripper in attack:
        dripper.start()
    silent = silent_clients(address, 10)
    try:
        good = GoodClient(address, start + 1.0, period=0.05)
        good.run()
        assert len(good.samples) >= 10
        assert good.worst() <= 0.5, good.samples
        assert all(d.cut_at is None for d in attack)  # the attack went on all along
    finally:
        for sock in silent:
            sock.close()
        for dripper in attack:
            dripper.join(5)


def test_thread_mode_max_connections_leaves_the_excess_in_the_listen_queue(
    start_cluster,
) -> None:
    """2 threads and ``--max-connections 3``: one place in the waiting room. Of 4 silent
    connections, the worker holds one; the other 3 stay in the kernel's queue."""
    cluster = start_cluster(
        "echo",
        "-w",
        "1",
        "-k",
        "thread",
        "--threads",
        "2",
        "--max-connections",
        "3",
        "-b",
        "127.0.0.1:0",
        "--no-defer-accept",
    )  # fmt: skip (silent clients reach the room)
    address = cluster.address()
    silent = silent_clients(address, 4)
    try:
        wait_for(lambda: accept_queue_length(address[1]) == 3, 5, "3 connections queued")
        silent[0].sendall(b"first\n")  # the parked one speaks: served by a thread
        silent[0].settimeout(5)
        assert read_line(silent[0]) == b"first\n"
        # Now both threads could take one, but one place in the room is all that is free:
        # one more is accepted and parked, and the others still wait in the queue.
        wait_for(lambda: accept_queue_length(address[1]) == 2, 5, "one more accepted")
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("mode", ["sync", "fork"])
def test_resets_and_half_closes_end_only_their_own_request_in_few_log_lines(
    start_cluster, mode: str
) -> None:
    """Fork mode too: each request is a process of its own there, and they all spend from
    their worker's budget (in its scoreboard slot), not from a fresh one each."""
    cluster = start_cluster("testapps:StdlibHTTP", "-w", "2", "-k", mode, "-b", "127.0.0.1:0")
    workers = children(cluster.pid)
    address = cluster.address()
    before = len(cluster.log.splitlines())
    linger = struct.pack("ii", 1, 0)
    for n in range(300):
        sock = tcp_connect(address)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if n % 2 else b"GET / HT")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()  # RST
    assert request_latency(address) < 5  # served as ever
    wait_for(lambda: cluster.log.count("reset") >= 1, 5, "a line about the resets")
    lines = cluster.log.splitlines()[before:]
    client_lines = [line for line in lines if "127.0.0.1" in line or "Traceback" in line]
    assert not [line for line in lines if "Traceback" in line]
    # Within the budget, per worker. Fork mode's children spend from it without a lock: two
    # at the same instant may both take its last line, a few lines over at most (one
    # process per request made it 150 and more).
    slack = 0 if mode == "sync" else 10
    assert len(client_lines) <= 2 * 20 + slack, client_lines[:50]
    assert workers == children(cluster.pid) and all(alive(pid) for pid in workers)


def test_datagrams_of_every_size_are_echoed_and_the_worker_lives_on(
    start_cluster, tmp_path
) -> None:
    path = str(tmp_path / "d.sock")
    cluster = start_cluster("echo", "-w", "1", "-b", "udp://127.0.0.1:0", "-b",
                            f"unix-dgram:{path}")  # fmt: skip
    (worker,) = cluster.workers()
    udp = cluster.address("udp")
    for size in (0, 1, 8193, 65507):
        payload = bytes(n % 251 for n in range(size))
        assert udp_roundtrip(udp, payload) == payload, size
        assert unix_dgram_roundtrip(path, payload, str(tmp_path / f"c{size}")) == payload, size
    assert cluster.workers() == [worker] and alive(worker)


def test_a_worker_near_its_fd_limit_logs_one_line_per_episode(start_cluster) -> None:
    """Clients keep more connections open than the worker has fds for: accepts fail and
    succeed by turns. That is one episode: one line when it begins, one when it ends."""
    cluster = start_cluster("echo", "-w", "1", "-k", "thread", "--threads", "64", "-b",
                            "127.0.0.1:0")  # fmt: skip
    (worker,) = cluster.workers()
    address = cluster.address()
    used = len(os.listdir(f"/proc/{worker}/fd"))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (used + 4, hard))
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # clients come and go, some always waiting
            sock = tcp_connect(address)
            sock.sendall(b"x\n")
            socks.append(sock)
            if len(socks) > 8:
                socks.pop(0).close()
        wait_for(lambda: "cannot accept" in cluster.log, 5, "the episode's first line")
        assert cluster.log.count("cannot accept") == 1
    finally:
        for sock in socks:
            sock.close()
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (1024, hard))
    with tcp_connect(address) as sock:
        sock.sendall(b"back\n")
        assert read_line(sock) == b"back\n"
    assert cluster.log.count("cannot accept") == 1


def test_defer_accept_keeps_silent_tcp_clients_in_the_kernel(start_cluster) -> None:
    """No waiting room, one sync worker: only the kernel's TCP_DEFER_ACCEPT (on by default)
    keeps the silent clients from holding the worker (with --no-defer-accept, the good request
    waits behind them)."""
    cluster = start_cluster("http-hello", "-w", "1", "-b", "127.0.0.1:0", "--no-waiting-room",
                            "--request-timeout", "5")  # fmt: skip
    address = cluster.address()
    silent = silent_clients(address, 3)
    try:
        assert request_latency(address) <= 0.5
    finally:
        for sock in silent:
            sock.close()

"""``loadtest``: drive a running cluster (or any echo / HTTP server) with load and report.

    python scripts/loadtest.py TARGET (--duration S | --requests N) [options]
    python -m cluster.loadtest ...                     (the same)

The design, in the order a run goes:

- **Plan** (pure): ``parse_target`` turns the target URI into a ``Target``; ``make_plan`` checks
  the ``LoadConfig`` (a bound is mandatory, only loopback or Unix targets unless the user names
  the host with ``allow_remote``) and splits connections and the request budget over the client
  processes. Nothing touches the network before the plan is valid, so refusals are cheap and
  exact (exit 2, one line).
- **Clients**: ``processes`` forked client processes (``multiprocess``, fork context), each an
  event loop over its share of the ``concurrency`` connections ("lanes") with ``selectors``.
  One loop per process rather than one thread per connection: a request costs a ``send``, a
  share of one ``epoll_wait`` and a ``recv``, with no GIL hand-offs, which is what lets one
  Python process drive tens of thousands of requests per second. A lane has at most one
  request in flight.
- **Open and closed loop**: without ``rate`` a lane sends its next request as soon as the last
  one completed (closed loop). With ``rate`` every lane has a schedule of *intended* send times
  and latency is measured from the intended time, not from the moment the request could
  finally go out: a stalled server then shows up as latency instead of silently lowering the
  offered load (coordinated omission).
- **Measurements**: each process records latencies in microseconds into an HDR histogram per
  second of the run, and counts errors by kind (``ERROR_KINDS``). At the end each process sends
  its encoded histograms through a pipe and ``summarize`` (pure apart from decoding) merges
  them into the totals and the per-second timeline.
- **Reporting**: ``format_summary`` (pure) for the terminal, ``result_to_json`` for ``--json``,
  ``plot`` for ``--plot``; events (``Events.mark`` in-process, or lines ``UNIX_TIME LABEL``
  appended to an ``--events`` file by another process) are placed on the timeline.

Library use, e.g. from a chaos script that acts on the master from another thread::

    from cluster.loadtest import Events, LoadConfig, run
    events = Events()
    threading.Thread(target=chaos, args=(events,)).start()   # calls events.mark("HUP sent")
    result = run(LoadConfig("tcp://127.0.0.1:8000", duration=10, concurrency=8), events=events)
    assert result.error_count == 0, result.errors

Every loop stops by itself: at the end of ``duration``, when the request budget is spent, or
at ``HARD_CAP_SECONDS`` whatever was asked; client processes also stop when their parent dies.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import ipaddress
import itertools
import json
import math
import os
import select
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from hdrh.histogram import HdrHistogram

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

HARD_CAP_SECONDS = 3600.0  # no run lasts longer, whatever the bounds say
ERROR_KINDS = ("refused", "reset", "timeout", "wrong reply", "other")
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))
STREAM_KINDS = ("tcp", "unix", "http")
DATAGRAM_KINDS = ("udp", "unix-dgram")
CONNECT_MODES = ("persistent", "per-request")
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
MAX_HTTP_HEAD = 65536
MAX_EXAMPLES = 3  # distinct error messages kept per kind, to tell the user what went wrong

# HDR histogram range: 1 us .. twice the hard cap (open-loop latency can exceed the timeout,
# being measured from the intended send time), 3 significant digits.
HDR_LOWEST_US = 1
HDR_HIGHEST_US = int(2 * HARD_CAP_SECONDS * 1_000_000)
HDR_DIGITS = 3

DUE, RETRY = 0, 1  # timer kinds: an open-loop send, a retry after EAGAIN
TIMER_SCAN = 0.02  # how often a client loop checks timeouts, stop flag and parent
START_MARGIN = 0.02  # seconds between "all clients ready" and the common start time


class UsageError(Exception):
    """A bad command line or config: the CLI prints it on one line and exits 2."""


# ----------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """Where to send load. ``host``/``port`` for inet kinds, ``path`` for unix kinds and the
    HTTP request path for ``http``."""

    uri: str
    kind: str  # tcp | udp | unix | unix-dgram | http
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def stream(self) -> bool:
        return self.kind in STREAM_KINDS

    @property
    def unix(self) -> bool:
        return self.kind in ("unix", "unix-dgram")

    @property
    def host_header(self) -> str:
        """``Host:`` value: IPv6 literals need their brackets back."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _split_host_port(rest: str, uri: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); the port may default (http only)."""
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise UsageError(f"bad target {uri!r}: unbalanced [ ] around an IPv6 address")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if ":" in host:
            raise UsageError(f"bad target {uri!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise UsageError(f"bad target {uri!r}: no host")
    if not port_text:
        if default_port is None:
            raise UsageError(f"bad target {uri!r}: no port")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad target {uri!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"bad target {uri!r}: port {port} out of range 1..65535")
    return host, port


def parse_target(uri: str) -> Target:
    """Parse ``tcp://H:P`` (or just ``H:P``), ``udp://H:P``, ``unix:PATH``, ``unix-dgram:PATH``
    or ``http://H[:P][/path]`` (the bind syntax of the cluster, so URIs from its ``listening on``
    lines can be pasted as they are)."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise UsageError(
            f"bad target {uri!r}: expected tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, "
            "unix-dgram:PATH or http://HOST:PORT/PATH"
        )
    if "://" not in uri and scheme not in ("unix", "unix-dgram", "tcp", "udp", "http"):
        host, port = _split_host_port(uri, uri)  # HOST:PORT or [V6]:PORT, as for bind: tcp
        return Target(uri, "tcp", host=host, port=port)
    if scheme in ("unix", "unix-dgram"):
        path = rest[2:] if rest.startswith("///") else rest
        if not path:
            raise UsageError(f"bad target {uri!r}: no socket path")
        return Target(uri, scheme, path=path)
    if scheme not in ("tcp", "udp", "http"):
        hint = " (TLS is not supported)" if scheme == "https" else ""
        raise UsageError(f"bad target {uri!r}: unknown scheme {scheme!r}{hint}")
    if not rest.startswith("//"):
        raise UsageError(f"bad target {uri!r}: expected {scheme}://HOST:PORT")
    rest = rest[2:]
    if scheme == "http":
        slash = rest.find("/")
        authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        if any(c in path for c in " \r\n"):
            raise UsageError(f"bad target {uri!r}: spaces or line breaks in the path")
        host, port = _split_host_port(authority, uri, default_port=80)
        return Target(uri, "http", host=host, port=port, path=path)
    host, port = _split_host_port(rest, uri)
    return Target(uri, scheme, host=host, port=port)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) or the name ``localhost``; nothing that needs a
    resolver to tell, so a typo cannot turn a local test into load on someone else's host."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def check_allowed(target: Target, allow_remote: Iterable[str]) -> None:
    """Refuse a non-local target unless the user named exactly that host."""
    if target.unix or is_loopback_host(target.host):
        return
    if target.host.lower() in {h.lower().strip("[]") for h in allow_remote}:
        return
    raise UsageError(
        f"refusing to load {target.host!r}: not loopback; if you mean it, "
        f"name it with --allow-remote {target.host}"
    )


# ----------------------------------------------------------------------------- config
@dataclass
class LoadConfig:
    """What to run. At least one of ``duration`` and ``requests`` is required; with both the
    run stops at whichever comes first."""

    target: str
    duration: float | None = None  # seconds
    requests: int | None = None  # total over all connections
    concurrency: int = 1  # connections (lanes), each with one request in flight at most
    processes: int = 1  # client processes the connections are spread over
    connect: str = "persistent"  # or per-request (stream targets)
    rate: float | None = None  # total requests/s, open loop; None: closed loop
    payload: int = 64  # bytes per echo request
    timeout: float = 5.0  # per request, seconds
    max_errors: int = 0  # the run passes (exit 0) with at most this many errors
    allow_remote: tuple[str, ...] = ()  # non-loopback hosts the user named explicitly
    events_file: str | None = None  # read at the end: lines "UNIX_TIMESTAMP LABEL"


@dataclass(frozen=True)
class Plan:
    """A validated config plus everything the client processes need, all picklable."""

    config: LoadConfig
    target: Target
    processes: int
    lanes: tuple[int, ...]  # lanes per process
    budgets: tuple[int | None, ...]  # requests per process (None: unbounded)
    run_seconds: float  # duration, or the hard cap when only a request count bounds the run
    family: int = socket.AF_UNIX
    address: Any = None  # sockaddr the clients connect to


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one, largest first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _positive(value: float | None, flag: str) -> None:
    """Durations, rates and timeouts: NaN and inf would slip through a plain ``> 0``."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UsageError(f"{flag} must be a positive number, got {value}")


def validate(config: LoadConfig) -> Target:
    """Every check that needs no network, in the order a user would fix them."""
    if config.duration is None and config.requests is None:
        raise UsageError("no bound: give --duration SECONDS and/or --requests N")
    _positive(config.duration, "--duration")
    if config.duration is not None and config.duration > HARD_CAP_SECONDS:
        raise UsageError(f"--duration {config.duration} exceeds the cap of {HARD_CAP_SECONDS:g} s")
    if config.requests is not None and config.requests < 1:
        raise UsageError(f"--requests must be at least 1, got {config.requests}")
    if config.concurrency < 1:
        raise UsageError(f"--concurrency must be at least 1, got {config.concurrency}")
    if config.processes < 1:
        raise UsageError(f"--processes must be at least 1, got {config.processes}")
    _positive(config.rate, "--rate")
    _positive(config.timeout, "--timeout")
    if config.max_errors < 0:
        raise UsageError(f"--max-errors must be at least 0, got {config.max_errors}")
    if config.connect not in CONNECT_MODES:
        raise UsageError(f"--connect must be one of {', '.join(CONNECT_MODES)}")
    target = parse_target(config.target)
    check_allowed(target, config.allow_remote)
    if not target.stream and config.connect != "persistent":
        raise UsageError(f"--connect {config.connect} applies to stream targets, not {target.kind}")
    limit = MAX_DATAGRAM if not target.stream else 64 * 1024 * 1024
    if not 1 <= config.payload <= limit:
        raise UsageError(f"--payload must be within 1..{limit} bytes, got {config.payload}")
    return target


def make_plan(config: LoadConfig, resolve: bool = True) -> Plan:
    """Validate and split the work; ``resolve=False`` keeps it pure for tests."""
    target = validate(config)
    processes = min(config.processes, config.concurrency)  # a process without lanes is idle
    lanes = tuple(split_evenly(config.concurrency, processes))
    if config.requests is None:
        budgets: tuple[int | None, ...] = (None,) * processes
    else:
        budgets = tuple(split_evenly(config.requests, processes))
    run_seconds = config.duration if config.duration is not None else HARD_CAP_SECONDS
    family, address = (socket.AF_UNIX, target.path) if target.unix else (socket.AF_INET, None)
    if resolve and not target.unix:
        family, address = resolve_address(target)
    return Plan(config, target, processes, lanes, budgets, run_seconds, family, address)


def resolve_address(target: Target) -> tuple[int, Any]:
    """The first address ``getaddrinfo`` gives for the target, resolved once in the parent."""
    socktype = socket.SOCK_STREAM if target.stream else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socktype)
    except socket.gaierror as err:
        raise UsageError(f"cannot resolve {target.host!r}: {err.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


# ----------------------------------------------------------------------------- errors
_REFUSED = {errno.ECONNREFUSED, errno.ENOENT}
_RESET = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN}


def classify_errno(code: int | None) -> str:
    """Map an errno to an error kind: what the user can act on, not the syscall's name."""
    if code in _REFUSED:
        return "refused"
    if code in _RESET:
        return "reset"
    if code == errno.ETIMEDOUT:
        return "timeout"
    return "other"


def describe(err: OSError) -> str:
    """``ECONNREFUSED: Connection refused``: short and stable enough to group examples by."""
    name = errno.errorcode.get(err.errno or 0, "error")
    return f"{name}: {err.strerror or err}"


# ----------------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class HttpResponse:
    """One parsed response: enough to judge success and whether the connection stays open."""

    status: int
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """Status line and headers; ValueError when they are not HTTP."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line[:80]!r}")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return parts[0].decode(), status, headers


def _dechunk(data: bytes, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body from ``data[start:]``: (body, end) or None while incomplete."""
    chunks = []
    pos = start
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";", 1)[0].strip(), 16)  # ValueError: unparseable
        pos = eol + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", pos - 2)  # no trailers: the CRLF right after 0\r\n
            return (b"".join(chunks), end + 4) if end >= 0 else None
        if len(data) < pos + size + 2:
            return None
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        chunks.append(data[pos : pos + size])
        pos += size + 2


def parse_http_response(data: bytes, eof: bool = False) -> tuple[HttpResponse, int] | None:
    """Parse one response from the start of ``data``: (response, bytes consumed), or None while
    more bytes are needed. ``eof`` says the server closed: it completes a body that runs to the
    end of the connection. Raises ValueError for anything unparseable."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HTTP_HEAD:
            raise ValueError("response head larger than 64 KiB")
        if eof:
            raise ValueError("connection closed inside the response head")
        return None
    version, status, headers = _parse_head(data[:end])
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    start = end + 4
    if 100 <= status < 200 or status in (204, 304):
        return HttpResponse(status, headers, b"", keep_alive), start
    if "chunked" in headers.get("transfer-encoding", "").lower():
        decoded = _dechunk(data, start)
        if decoded is None:
            if eof:
                raise ValueError("connection closed inside a chunked body")
            return None
        return HttpResponse(status, headers, decoded[0], keep_alive), decoded[1]
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length < 0:
            raise ValueError("negative Content-Length")
        if len(data) < start + length:
            if eof:
                raise ValueError("connection closed inside the body")
            return None
        return HttpResponse(status, headers, data[start : start + length], keep_alive), (
            start + length
        )
    if not eof:  # the body runs until the server closes
        return None
    return HttpResponse(status, headers, data[start:], False), len(data)


def http_request(target: Target, close: bool) -> bytes:
    """The one GET every lane sends, built once."""
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "User-Agent: cluster-loadtest",
        "Accept: */*",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True, order=True)
class Event:
    """Something that happened during the run (``time`` is a UNIX timestamp)."""

    time: float
    label: str


class Events:
    """A thread-safe in-process event log: a chaos thread calls ``mark`` while ``run`` runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Event] = []

    def mark(self, label: str, when: float | None = None) -> Event:
        """Record that something happened now (or at ``when``); safe from any thread."""
        event = Event(time.time() if when is None else when, label)
        with self._lock:
            self._items.append(event)
        return event

    def snapshot(self) -> list[Event]:
        """A copy, so that the caller can read while other threads still mark."""
        with self._lock:
            return list(self._items)


def parse_events(text: str) -> tuple[list[Event], list[str]]:
    """Lines ``UNIX_TIMESTAMP LABEL`` -> events, plus the lines that could not be read (blank
    lines and ``#`` comments are skipped silently)."""
    events, bad = [], []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        stamp, _, label = stripped.partition(" ")
        try:
            when = float(stamp)
        except ValueError:
            bad.append(line)
            continue
        if not math.isfinite(when):
            bad.append(line)
            continue
        events.append(Event(when, label.strip() or "event"))
    return events, bad


def read_events(path: str) -> tuple[list[Event], list[str]]:
    """Events from a file a scenario appended to; a missing file means no events."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return parse_events(fh.read())
    except FileNotFoundError:
        return [], []


def append_event(path: str, label: str, when: float | None = None) -> None:
    """Append one event line (for scenarios in another process); O_APPEND keeps lines whole."""
    stamp = time.time() if when is None else when
    line = f"{stamp:.6f} {' '.join(label.split())}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- client loop
def new_histogram() -> HdrHistogram:
    """Every histogram with the same range and precision, so that any two can be added."""
    return HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)


class Lane:
    """One connection (or datagram socket) with at most one request in flight.

    The client loop calls ``begin`` to start a request and ``on_event`` when the socket is
    ready; the lane calls back ``client.succeed`` or ``client.fail`` exactly once per request.
    Subclasses define the protocol: what to send and when a reply is complete and right.
    """

    __slots__ = (
        "client", "index", "sock", "state", "intended", "deadline", "due", "out", "buf",
        "expected", "got", "retry_at", "generation",
    )  # fmt: skip

    IDLE, CONNECTING, SENDING, WAITING, RETRY = range(5)

    def __init__(self, client: Client, index: int) -> None:
        self.client = client
        self.index = index
        self.sock: socket.socket | None = None
        self.state = Lane.IDLE
        self.intended = 0.0
        self.deadline = 0.0
        self.due = 0.0  # open loop: the next intended send time
        self.out: bytes | memoryview = b""
        self.buf = b""
        self.expected = b""
        self.got = 0  # stream echo: bytes of the reply matched so far
        self.retry_at = 0.0
        self.generation = 0

    # -- connection
    def make_socket(self) -> socket.socket:
        """Non-blocking, so one loop can drive every lane; no Nagle delay on small requests."""
        plan = self.client.plan
        kind = socket.SOCK_STREAM if plan.target.stream else socket.SOCK_DGRAM
        sock = socket.socket(plan.family, kind)
        sock.setblocking(False)
        if plan.family != socket.AF_UNIX and plan.target.stream:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def open(self) -> None:
        """Start connecting; may finish at once (unix), later (tcp) or fail."""
        sock = self.make_socket()
        self.sock = sock
        code = sock.connect_ex(self.client.plan.address)
        if code == 0:
            self.client.selector.register(sock, selectors.EVENT_READ, self)
            self.send_request()
        elif code == errno.EINPROGRESS:
            self.state = Lane.CONNECTING
            self.client.selector.register(sock, selectors.EVENT_WRITE, self)
        elif code == errno.EAGAIN:  # unix listener backlog full: try again shortly
            self.close()
            self.wait_retry()
        else:
            self.close()
            self.client.fail(self, classify_errno(code), describe(OSError(code, os.strerror(code))))

    def wait_retry(self, delay: float = 0.002) -> None:
        """EAGAIN (a full unix backlog or datagram queue): try again shortly, same deadline."""
        self.state = Lane.RETRY
        self.retry_at = time.monotonic() + delay
        self.client.push_timer(self.retry_at, RETRY, self)

    def close(self) -> None:
        """Drop the connection (after an error, per request, or at the end)."""
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        try:
            self.client.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # -- request
    def begin(self, intended: float, now: float) -> None:
        """Start one request whose latency counts from ``intended``; connect first if need be."""
        self.intended = intended
        self.deadline = now + self.client.timeout
        self.buf = b""
        self.got = 0
        try:
            if self.sock is None:
                self.open()
            else:
                self.send_request()
        except OSError as err:
            self.close()
            self.client.fail(self, classify_errno(err.errno), describe(err))

    def request_bytes(self) -> bytes:
        """What to send for the next request (protocol-specific)."""
        raise NotImplementedError

    def send_request(self) -> None:
        """Send at once when the socket takes it all (the usual case); else finish on writable."""
        data = self.request_bytes()
        assert self.sock is not None
        sent = self.sock.send(data)
        if sent < len(data):
            self.out = memoryview(data)[sent:]  # slices without copying the rest
            self.state = Lane.SENDING
            self.client.selector.modify(
                self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self
            )
        else:
            self.state = Lane.WAITING

    def on_event(self, mask: int) -> None:
        """The selector's call: finish a connect, send the rest, or read the reply."""
        if self.state == Lane.IDLE:
            # EOF (a kept-alive connection the server closed) or unsolicited bytes between
            # requests: drop the connection quietly; the next request opens a new one.
            self.close()
            return
        try:
            if self.state == Lane.CONNECTING:
                self.connected()
            elif self.state == Lane.SENDING and mask & selectors.EVENT_WRITE:
                self.send_more()
            if self.state in (Lane.WAITING, Lane.SENDING) and mask & selectors.EVENT_READ:
                self.on_readable()
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            self.close()
            self.client.fail(self, classify_errno(err.errno), describe(err))

    def connected(self) -> None:
        """A non-blocking connect finished: its outcome is in SO_ERROR."""
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        self.client.selector.modify(self.sock, selectors.EVENT_READ, self)
        self.send_request()

    def send_more(self) -> None:
        """The rest of a large request, as the socket drains."""
        assert self.sock is not None
        sent = self.sock.send(self.out)
        self.out = self.out[sent:]
        if not self.out:
            self.state = Lane.WAITING
            self.client.selector.modify(self.sock, selectors.EVENT_READ, self)

    def on_readable(self) -> None:
        """Read what arrived; decide whether the reply is complete and right."""
        raise NotImplementedError

    def reply_done(self, keep_open: bool) -> None:
        """A complete, correct reply."""
        if not keep_open:
            self.close()
        self.client.succeed(self)

    def wrong(self, why: str) -> None:
        """A complete reply that is not the right one: the stream is out of step, reconnect."""
        self.close()
        self.client.fail(self, "wrong reply", why)


class StreamEchoLane(Lane):
    """Send the payload, read exactly as many bytes back, compare."""

    __slots__ = ()

    def request_bytes(self) -> bytes:
        """A fresh payload, kept to compare the echo against."""
        self.expected = data = self.client.next_payload()
        return data

    def on_readable(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(262144)
        if not data:
            self.close()
            self.client.fail(self, "reset", "unexpected EOF: the server closed the connection")
            return
        expected = self.expected
        start = self.got
        end = start + len(data)
        # Compare each chunk as it comes (no growing buffer): large payloads stay linear.
        if start == 0 and data == expected:
            self.reply_done(self.client.persistent)
        elif end > len(expected) or memoryview(expected)[start:end] != data:
            self.wrong(_diff(expected, data, start))
        elif end == len(expected):
            self.reply_done(self.client.persistent)
        else:
            self.got = end


def _diff(expected: bytes, got: bytes, offset: int = 0) -> str:
    """Where an echo reply (``got``, from byte ``offset`` on) parts from what was sent: for the
    error examples."""
    if offset + len(got) > len(expected):
        return f"{offset + len(got)} bytes back for {len(expected)} sent"
    part = expected[offset : offset + len(got)]
    at = next((i for i, (a, b) in enumerate(zip(part, got, strict=False)) if a != b), 0)
    return f"byte {offset + at} differs: sent {part[at : at + 8]!r}, got {got[at : at + 8]!r}"


class HttpLane(Lane):
    """Send a GET, parse the response, require a 2xx; honour the server's keep-alive."""

    __slots__ = ()

    def request_bytes(self) -> bytes:
        """The same GET every time (built once per client)."""
        return self.client.http_request

    def on_readable(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(262144)
        buf = self.buf + data if self.buf else data
        try:
            parsed = parse_http_response(buf)
            if parsed is None and not data:
                parsed = parse_http_response(buf, eof=True)  # a body that runs to the close
        except ValueError as err:
            if data:
                self.wrong(f"unparseable response: {err}")
            else:
                self.close()
                self.client.fail(self, "reset", f"unexpected EOF: {err}")
            return
        if parsed is None:
            self.buf = buf
            return
        response, used = parsed
        self.buf = b""
        if used != len(buf):
            self.wrong(f"{len(buf) - used} bytes after the response")
        elif not 200 <= response.status < 300:
            self.wrong(f"HTTP status {response.status}")
        else:
            self.reply_done(self.client.persistent and response.keep_alive and bool(data))


class DatagramLane(Lane):
    """One datagram out, the reply datagram must be identical. A connected socket, so that
    ICMP port-unreachable (udp) or a missing path (unix-dgram) reports as ``refused``."""

    __slots__ = ("bound_path",)

    def __init__(self, client: Client, index: int) -> None:
        super().__init__(client, index)
        self.bound_path: str | None = None

    def make_socket(self) -> socket.socket:
        """unix-dgram: bind a path in the client's temp dir, or the server cannot reply."""
        sock = super().make_socket()
        if self.client.plan.target.kind == "unix-dgram":
            # The server replies to our address: an unbound unix datagram socket has none.
            self.generation += 1
            path = os.path.join(self.client.tempdir(), f"{self.index}-{self.generation}")
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                raise
            self.bound_path = path
        return sock

    def close(self) -> None:
        """Also remove the bound path, so no socket files are left behind."""
        super().close()
        if self.bound_path is not None:
            try:
                os.unlink(self.bound_path)
            except FileNotFoundError:
                pass
            self.bound_path = None

    def open(self) -> None:
        """Connect (datagram: just fixes the peer) and send at once."""
        sock = self.make_socket()
        self.sock = sock
        sock.connect(self.client.plan.address)  # immediate for datagrams; raises on ENOENT
        self.client.selector.register(sock, selectors.EVENT_READ, self)
        self.send_request()

    def request_bytes(self) -> bytes:
        """A fresh payload, kept to compare the reply datagram against."""
        self.expected = data = self.client.next_payload()
        return data

    def send_request(self) -> None:
        """One datagram; a full server queue is retried, not counted as an error."""
        assert self.sock is not None
        try:
            self.sock.send(self.request_bytes())
        except BlockingIOError:  # the server's queue is full
            self.wait_retry(0.001)
            return
        self.state = Lane.WAITING

    def on_readable(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if data != self.expected:
            self.wrong(_diff(self.expected, data))
        else:
            self.reply_done(True)


LANE_CLASSES: dict[str, type[Lane]] = {
    "tcp": StreamEchoLane,
    "unix": StreamEchoLane,
    "http": HttpLane,
    "udp": DatagramLane,
    "unix-dgram": DatagramLane,
}


class Client:
    """The event loop of one client process: its lanes, its budget, its measurements."""

    def __init__(self, plan: Plan, index: int, t0: float, stop: Any, counters: Any) -> None:
        config = plan.config
        self.plan = plan
        self.index = index
        self.t0 = t0
        self.end = t0 + plan.run_seconds
        self.stop_flag = stop
        self.counters = counters
        self.parent = os.getppid()
        self.timeout = config.timeout
        self.persistent = config.connect == "persistent"
        self.budget = plan.budgets[index]
        self.selector = selectors.DefaultSelector()
        fileno = getattr(self.selector, "fileno", None)  # epoll's own fd, for wait_precisely
        self.poll_fd: int | None = fileno() if fileno is not None else None
        if self.poll_fd is not None and self.poll_fd >= 1024:  # beyond select()'s FD_SETSIZE
            self.poll_fd = None
        self.timers: list[tuple[float, int, int, Lane]] = []
        self.tiebreak = itertools.count()
        self.ready: deque[Lane] = deque()
        self.stopping = False
        self.aborted = False
        self._tempdir: str | None = None
        self.http_request = http_request(plan.target, close=not self.persistent)
        self.filler = bytes((i * 7 + 1) & 0xFF for i in range(config.payload))
        self.seq = index << 40
        # measurements
        self.requests = 0
        self.errors = 0
        self.error_counts = dict.fromkeys(ERROR_KINDS, 0)
        self.examples: dict[str, list[str]] = {kind: [] for kind in ERROR_KINDS}
        self.second = 0
        self.hist = new_histogram()
        self.sec_requests = 0
        self.sec_errors = dict.fromkeys(ERROR_KINDS, 0)
        self.seconds: list[dict[str, Any]] = []
        self.last_completion = t0
        first = sum(plan.lanes[:index])
        lane_class = LANE_CLASSES[plan.target.kind]
        self.lanes = [lane_class(self, first + i) for i in range(plan.lanes[index])]
        self.rate = config.rate
        self.interval = config.concurrency / self.rate if self.rate else 0.0
        # Completions after the end (requests in flight then) count in the last second.
        self.max_second = max(math.ceil(plan.run_seconds) - 1, 0)
        if self.rate:
            for lane in self.lanes:  # spread the first sends over one interval
                lane.due = t0 + lane.index / self.rate
                self.push_timer(lane.due, DUE, lane)
        else:
            self.ready.extend(self.lanes)

    def tempdir(self) -> str:
        """Created on first use (unix-dgram client addresses), removed in ``close``."""
        if self._tempdir is None:
            self._tempdir = tempfile.mkdtemp(prefix="loadtest-")
        return self._tempdir

    def next_payload(self) -> bytes:
        """The payload with a per-request sequence number up front, so a stale or duplicated
        reply can never pass for the current one."""
        self.seq += 1
        filler = self.filler
        if len(filler) < 8:
            return filler
        return self.seq.to_bytes(8, "big") + filler[8:]

    def push_timer(self, when: float, kind: int, lane: Lane) -> None:
        """Queue a timer; the counter breaks ties so lanes are never compared."""
        heapq.heappush(self.timers, (when, next(self.tiebreak), kind, lane))

    # -- outcomes
    def _account(self, now: float) -> None:
        """Note a completion time; a new second closes the current one's histogram."""
        self.last_completion = now
        second = min(int(now - self.t0), self.max_second)
        if second != self.second:
            self._flush_second()
            self.second = second

    def _flush_second(self) -> None:
        """Encode the finished second: memory stays bounded however long the run."""
        if self.sec_requests:
            self.seconds.append(
                {
                    "second": self.second,
                    "requests": self.sec_requests,
                    "errors": {k: v for k, v in self.sec_errors.items() if v},
                    "hist": self.hist.encode() if self.hist.get_total_count() else b"",
                }
            )
            self.hist.reset()
            self.sec_requests = 0
            self.sec_errors = dict.fromkeys(ERROR_KINDS, 0)

    def succeed(self, lane: Lane) -> None:
        """A correct reply: record its latency from the intended send time."""
        now = time.monotonic()
        self._account(now)
        micros = int((now - lane.intended) * 1_000_000)
        self.hist.record_value(min(max(micros, HDR_LOWEST_US), HDR_HIGHEST_US))
        self.requests += 1
        self.sec_requests += 1
        self.after(lane, now)

    def fail(self, lane: Lane, kind: str, message: str) -> None:
        """A failed request: count it by kind and keep a few distinct messages."""
        now = time.monotonic()
        self._account(now)
        self.requests += 1
        self.errors += 1
        self.sec_requests += 1
        self.error_counts[kind] += 1
        self.sec_errors[kind] += 1
        examples = self.examples[kind]
        if len(examples) < MAX_EXAMPLES and message not in examples:
            examples.append(message)
        lane.state = Lane.IDLE
        self.after(lane, now)

    def after(self, lane: Lane, now: float) -> None:
        """Schedule the lane's next request: at once (closed loop) or at its next intended
        time (open loop); through ``ready`` so that a lane failing instantly cannot recurse."""
        lane.state = Lane.IDLE
        if self.rate:
            self.push_timer(lane.due, DUE, lane)  # may be past: then it goes out at once
        else:
            self.ready.append(lane)

    def take_ticket(self, now: float) -> bool:
        """May another request start? Not past the end, not beyond the budget."""
        if self.stopping:
            return False
        if now >= self.end:
            self.stopping = True  # exact end: the scan alone would overshoot by up to 20 ms
            return False
        if self.budget is not None:
            if self.budget <= 0:
                return False
            self.budget -= 1
        return True

    # -- loop
    def in_flight(self) -> list[Lane]:
        """Lanes with a request under way (connecting, sending, waiting, retrying)."""
        return [lane for lane in self.lanes if lane.state != Lane.IDLE]

    def run(self) -> None:
        """The loop: start ready lanes, fire due timers, wait for sockets; until the end."""
        poll = self.selector.select
        ready = self.ready
        timers = self.timers
        counters = self.counters
        slot = 2 * self.index
        monotonic = time.monotonic
        next_scan = monotonic() + TIMER_SCAN
        while True:
            now = monotonic()
            if now >= next_scan:
                self.scan(now)
                next_scan = now + TIMER_SCAN
                if self.aborted or (self.stopping and not self.in_flight()):
                    break
            for _ in range(len(ready)):
                lane = ready.popleft()
                if lane.state != Lane.IDLE:
                    continue
                if self.take_ticket(now):
                    lane.begin(now, now)
                elif not self.stopping and self.budget is not None and not self.in_flight():
                    self.stopping = True  # budget spent and nothing left in flight
            while timers and timers[0][0] <= now:
                when, _, kind, lane = heapq.heappop(timers)
                self.on_timer(when, kind, lane, now)
            if self.stopping and not self.in_flight():
                break
            wait = next_scan - now
            if ready:
                wait = 0
            elif timers and timers[0][0] - now < wait:
                wait = self.wait_precisely(timers[0][0] - now)
            for key, mask in poll(max(wait, 0)):
                key.data.on_event(mask)
            counters[slot] = self.requests
            counters[slot + 1] = self.errors
        counters[slot] = self.requests
        counters[slot + 1] = self.errors

    def wait_precisely(self, seconds: float) -> float:
        """Sleep until a timer or a socket event, to the microsecond; return what is left for
        the selector to wait. epoll rounds its timeout up to whole milliseconds, which would
        add up to 1 ms of our own lateness to every open-loop latency; select() on the epoll
        fd itself wakes on its events too, with microsecond timeouts."""
        if self.poll_fd is None or seconds <= 0:
            return seconds
        select.select([self.poll_fd], [], [], seconds)
        return 0.0

    def on_timer(self, when: float, kind: int, lane: Lane, now: float) -> None:
        """A due open-loop send, or a retry after EAGAIN. Entries left over from a request
        that has since timed out no longer match the lane's state and are dropped."""
        if kind == RETRY:
            if lane.state == Lane.RETRY and lane.retry_at == when:
                deadline = lane.deadline
                lane.state = Lane.IDLE
                lane.begin(lane.intended, now)
                lane.deadline = deadline  # a retry does not extend the request's time
            return
        if lane.state != Lane.IDLE or when != lane.due:
            return
        if self.take_ticket(now):
            intended = lane.due
            lane.due += self.interval
            lane.begin(intended, now)  # latency from the intended time, not from now

    def scan(self, now: float) -> None:
        """Time out overdue requests; notice the end, the stop flag and an orphaned client."""
        if now >= self.end:
            self.stopping = True  # no new requests; those in flight may still finish
        if self.stop_flag.value or os.getppid() != self.parent:
            self.stopping = self.aborted = True  # abandon what is in flight
        if self.budget is not None and self.budget <= 0 and not self.in_flight():
            self.stopping = True
        for lane in self.lanes:
            if lane.state != Lane.IDLE and now > lane.deadline:
                lane.close()
                self.fail(lane, "timeout", f"no complete reply within {self.timeout:g} s")

    def close(self) -> None:
        """Close every socket and remove the temp dir, whatever happened."""
        for lane in self.lanes:
            lane.close()
        self.selector.close()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)

    def report(self) -> dict[str, Any]:
        """Everything the parent merges: picklable, histograms encoded."""
        self._flush_second()
        return {
            "index": self.index,
            "requests": self.requests,
            "errors": self.error_counts,
            "examples": self.examples,
            "seconds": self.seconds,
            "last_completion": self.last_completion - self.t0,
            "aborted": self.aborted,
        }


def _client_main(plan: Plan, index: int, shared: Any, conn: Any) -> None:
    """Entry of a client process: set up, say ready, wait for the common start, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it sets the stop flag
    client = None
    try:
        conn.send(("ready", index))
        if not shared.go.wait(timeout=60) or shared.stop.value:
            return  # the parent gave up before the start
        t0 = shared.start.value
        client = Client(plan, index, t0, shared.stop, shared.counters)
        delay = t0 - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the common start time the parent chose for every process
        client.run()
        conn.send(("result", client.report()))
    except BaseException:
        try:
            conn.send(("crash", traceback.format_exc()))
        except OSError:
            pass  # the parent is gone: nobody to tell
    finally:
        if client is not None:
            client.close()
        conn.close()


# ----------------------------------------------------------------------------- orchestration
@dataclass
class Progress:
    """What the live progress line shows, once a second."""

    elapsed: float
    requests: int
    errors: int
    rate: float  # requests per second over the last interval


@dataclass
class Shared:
    """Shared-memory state between the parent and its client processes."""

    go: Any  # Event: the start time is set
    start: Any  # RawValue('d'): the common monotonic start time
    stop: Any  # RawValue('b'): stop now (Ctrl-C, watchdog)
    counters: Any  # RawArray('q'): requests and errors per process, for progress


class ClientCrash(RuntimeError):
    """A client process died or raised: a bug in the tool, not an error of the target."""


def _spawn(plan: Plan) -> tuple[list[Any], list[Any], Shared]:
    """Fork the client processes; each gets the write end of its own result pipe."""
    import multiprocess

    ctx = multiprocess.get_context("fork")
    shared = Shared(
        go=ctx.Event(),
        start=ctx.RawValue("d", 0.0),
        stop=ctx.RawValue("b", 0),
        counters=ctx.RawArray("q", 2 * plan.processes),
    )
    procs, readers = [], []
    for index in range(plan.processes):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_client_main,
            args=(plan, index, shared, writer),
            name=f"loadtest-client-{index}",
            daemon=True,
        )
        proc.start()
        writer.close()  # the child owns the write end; EOF on ours means it is gone
        procs.append(proc)
        readers.append(reader)
    return procs, readers, shared


def _end_clients(procs: list[Any], readers: list[Any]) -> None:
    """Join every client process by pid; kill the ones that do not end in time."""
    for reader in readers:
        reader.close()
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.01))
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)


def _collect(
    plan: Plan,
    procs: list[Any],
    readers: list[Any],
    shared: Shared,
    progress: Callable[[Progress], None] | None,
) -> tuple[list[dict[str, Any]], float, float, bool]:
    """Start the clients together, relay progress, gather their reports."""
    from multiprocess.connection import wait

    ready = 0
    deadline = time.monotonic() + 30
    while ready < len(readers):
        if not wait(readers, timeout=max(deadline - time.monotonic(), 0)):
            raise ClientCrash("client processes did not start within 30 s")
        for reader in readers:
            if reader.poll():
                tag, payload = _recv(reader)
                if tag != "ready":
                    raise ClientCrash(f"client process failed at start:\n{payload}")
                ready += 1
    t0 = time.monotonic() + START_MARGIN
    started_at = time.time() + START_MARGIN
    shared.start.value = t0
    shared.go.set()

    reports: list[dict[str, Any]] = []
    pending = list(readers)
    watchdog = t0 + plan.run_seconds + plan.config.timeout + 5
    interrupted = False
    last = (t0, 0)
    next_tick = t0 + 1
    while pending:
        try:
            now = time.monotonic()
            if now > watchdog + 10:
                raise ClientCrash("client processes did not stop: killed")
            if now > watchdog:
                shared.stop.value = 1
            for reader in wait(pending, timeout=max(min(next_tick, watchdog) - now, 0)):
                pending.remove(reader)
                tag, payload = _recv(reader)
                if tag != "result":
                    raise ClientCrash(f"client process failed:\n{payload}")
                reports.append(payload)
            now = time.monotonic()
            if now >= next_tick:
                counts = shared.counters[:]
                requests, errors = sum(counts[0::2]), sum(counts[1::2])
                rate = (requests - last[1]) / max(now - last[0], 1e-9)
                last = (now, requests)
                next_tick += 1
                if progress is not None:
                    progress(Progress(now - t0, requests, errors, rate))
        except KeyboardInterrupt:
            interrupted = True
            shared.stop.value = 1  # clients abandon what is in flight and report
    return reports, t0, started_at, interrupted


def _recv(reader: Any) -> tuple[str, Any]:
    """A client's message; a client that died before sending counts as a crash."""
    try:
        return reader.recv()
    except EOFError:
        return ("crash", "the process exited without a report")


def run(
    config: LoadConfig,
    events: Events | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> Result:
    """Run the load test and return the merged result. Raises ``UsageError`` for a bad config
    before any process starts, ``ClientCrash`` if a client process fails."""
    plan = make_plan(config)
    procs, readers, shared = _spawn(plan)
    try:
        reports, _, started_at, interrupted = _collect(plan, procs, readers, shared, progress)
    finally:
        shared.stop.value = 1
        shared.go.set()  # a client still waiting for the start must not wait 60 s
        _end_clients(procs, readers)
    recorded = events.snapshot() if events is not None else []
    bad_lines: list[str] = []
    if config.events_file:
        from_file, bad_lines = read_events(config.events_file)
        recorded += from_file
    result = summarize(plan, reports, started_at, recorded)
    result.interrupted = interrupted
    result.bad_event_lines = bad_lines
    return result


# ----------------------------------------------------------------------------- results
@dataclass
class Result:
    """The merged outcome of a run. Latencies in microseconds."""

    config: LoadConfig
    target: Target
    started_at: float  # UNIX time of the common start
    duration: float  # seconds from the start to the last completion (or the end of duration)
    requests: int  # completed: successes + errors
    ok: int
    errors: dict[str, int]  # by kind, every kind present
    error_examples: dict[str, list[str]]
    percentiles: dict[str, int]  # p50 p90 p99 p99.9 max (us), plus mean
    timeline: list[dict[str, Any]]  # one entry per second
    events: list[Event] = field(default_factory=list)
    histogram: HdrHistogram | None = field(default=None, repr=False)
    interrupted: bool = False
    bad_event_lines: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    def passed(self, max_errors: int | None = None) -> bool:
        limit = self.config.max_errors if max_errors is None else max_errors
        return self.error_count <= limit

    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if self.passed() else EXIT_ERRORS


def percentiles_of(hist: HdrHistogram) -> dict[str, int]:
    """The summary's percentiles (us); zeros when nothing succeeded."""
    if hist.get_total_count() == 0:
        return {name: 0 for name, _ in PERCENTILES} | {"max": 0, "mean": 0}
    values = {name: int(hist.get_value_at_percentile(p)) for name, p in PERCENTILES}
    values["max"] = int(hist.get_max_value())
    values["mean"] = int(round(hist.get_mean_value()))
    return values


def merge_timeline(
    reports: Sequence[dict[str, Any]], duration: float
) -> tuple[list[dict[str, Any]], HdrHistogram]:
    """Per-second entries of every process added up, plus the whole run's histogram."""
    seconds: dict[int, dict[str, Any]] = {}
    total = new_histogram()
    for report in reports:
        for entry in report["seconds"]:
            slot = seconds.setdefault(
                entry["second"],
                {"requests": 0, "errors": dict.fromkeys(ERROR_KINDS, 0), "hist": new_histogram()},
            )
            slot["requests"] += entry["requests"]
            for kind, count in entry["errors"].items():
                slot["errors"][kind] += count
            if entry["hist"]:
                slot["hist"].decode_and_add(entry["hist"])
    last = max(seconds, default=-1)
    timeline = []
    for second in range(last + 1):  # seconds with no completion at all show as zeros
        slot = seconds.get(second)
        hist = slot["hist"] if slot else new_histogram()
        errors = slot["errors"] if slot else dict.fromkeys(ERROR_KINDS, 0)
        requests = slot["requests"] if slot else 0
        span = min(1.0, duration - second) if second == last else 1.0
        span = max(span, 1e-3)
        total.add(hist)
        timeline.append(
            {
                "second": second,
                "span": round(span, 6),
                "requests": requests,
                "errors": sum(errors.values()),
                "errors_by_kind": {k: v for k, v in errors.items() if v},
                "throughput": requests / span,
                "p50_us": int(hist.get_value_at_percentile(50)) if hist.total_count else None,
                "p99_us": int(hist.get_value_at_percentile(99)) if hist.total_count else None,
            }
        )
    return timeline, total


def summarize(
    plan: Plan, reports: Sequence[dict[str, Any]], started_at: float, events: Sequence[Event] = ()
) -> Result:
    """Merge the per-process reports into one result (no I/O)."""
    config = plan.config
    requests = sum(r["requests"] for r in reports)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    examples: dict[str, list[str]] = {kind: [] for kind in ERROR_KINDS}
    for report in reports:
        for kind, count in report["errors"].items():
            errors[kind] += count
        for kind, messages in report["examples"].items():
            for message in messages:
                if len(examples[kind]) < MAX_EXAMPLES and message not in examples[kind]:
                    examples[kind].append(message)
    last = max((r["last_completion"] for r in reports), default=0.0)
    aborted = any(r.get("aborted") for r in reports)
    if (
        config.duration is not None
        and not aborted
        and (config.requests is None or requests < config.requests)
    ):
        last = max(last, config.duration)  # a duration-bound run lasted its duration
    duration = max(last, 1e-6)
    timeline, total = merge_timeline(reports, duration)
    for entry in timeline:
        entry["time"] = round(started_at + entry["second"], 6)
    return Result(
        config=config,
        target=plan.target,
        started_at=started_at,
        duration=duration,
        requests=requests,
        ok=requests - sum(errors.values()),
        errors=errors,
        error_examples={k: v for k, v in examples.items() if v},
        percentiles=percentiles_of(total),
        timeline=timeline,
        events=sorted(events),
        histogram=total,
    )


def format_latency(micros: float) -> str:
    """Human units: 310 us, 2.10 ms, 1.23 s."""
    if micros < 1000:
        return f"{micros:.0f} us"
    if micros < 1_000_000:
        return f"{micros / 1000:.2f} ms"
    return f"{micros / 1_000_000:.2f} s"


def describe_mode(config: LoadConfig, target: Target) -> str:
    """One phrase for how the load was applied."""
    parts = []
    if target.stream:
        parts.append(config.connect)
    noun = "connection" if target.stream else "socket"
    parts.append(f"{config.concurrency} {noun}{'s' if config.concurrency != 1 else ''}")
    parts.append(f"{config.processes} process{'es' if config.processes != 1 else ''}")
    parts.append(f"open loop at {config.rate:g} req/s" if config.rate else "closed loop")
    if target.kind != "http":
        parts.append(f"{config.payload} B payload")
    return ", ".join(parts)


def format_summary(result: Result) -> str:
    """The end-of-run report, one fact per line."""
    config = result.config
    lines = [
        f"target      {result.target.uri}  ({describe_mode(config, result.target)})",
        f"requests    {result.requests} in {result.duration:.2f} s = "
        f"{result.throughput:.0f} req/s" + ("  (interrupted)" if result.interrupted else ""),
        f"successes   {result.ok}",
    ]
    kinds = ", ".join(f"{k} {n}" for k, n in result.errors.items() if n)
    lines.append(f"errors      {result.error_count}" + (f"  ({kinds})" if kinds else ""))
    for kind, messages in result.error_examples.items():
        for message in messages:
            lines.append(f"  {kind}: {message}")
    p = result.percentiles
    lines.append(
        "latency     "
        + "  ".join(f"{name} {format_latency(p[name])}" for name in ("p50", "p90", "p99", "p99.9"))
        + f"  max {format_latency(p['max'])}"
    )
    if config.rate:
        lines.append(
            f"rate        target {config.rate:g} req/s, achieved {result.throughput:.0f} req/s"
        )
    for event in result.events:
        lines.append(f"event       +{event.time - result.started_at:7.3f} s  {event.label}")
    for bad in result.bad_event_lines:
        lines.append(f"event       ignored unreadable line {bad!r}")
    verdict = "PASS" if result.passed() else "FAIL"
    lines.append(f"verdict     {verdict} ({result.error_count} errors, max {config.max_errors})")
    return "\n".join(lines)


def result_to_json(result: Result) -> dict[str, Any]:
    """The whole result as plain JSON data (``--json``)."""
    config = asdict(result.config)
    config["allow_remote"] = list(result.config.allow_remote)
    return {
        "tool": "cluster.loadtest",
        "config": config,
        "target": asdict(result.target),
        "started_at": result.started_at,
        "duration_s": result.duration,
        "interrupted": result.interrupted,
        "totals": {
            "requests": result.requests,
            "ok": result.ok,
            "errors": result.error_count,
            "throughput_rps": result.throughput,
            "passed": result.passed(),
        },
        "errors": result.errors,
        "error_examples": result.error_examples,
        "latency_us": result.percentiles,
        "timeline": result.timeline,
        "events": [
            {"time": e.time, "t": e.time - result.started_at, "label": e.label}
            for e in result.events
        ],
    }


def write_json(result: Result, path: str) -> None:
    """``--json``: the full result, for scripts and later comparison."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result_to_json(result), fh, indent=2)
        fh.write("\n")


def plot(result: Result, path: str) -> None:
    """Throughput and latency (p50, p99) per second, with each event as a labelled line.

    Steps rather than lines: each value is a count over its whole second, and a dip must not
    look like it started before the second it belongs to."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    timeline = result.timeline
    edges = [entry["second"] for entry in timeline] + [
        timeline[-1]["second"] + timeline[-1]["span"] if timeline else 0.0
    ]
    figure, (top, bottom) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6))
    top.set_title(f"{result.target.uri}: {describe_mode(result.config, result.target)}", fontsize=9)
    if timeline:
        top.stairs([e["throughput"] for e in timeline], edges, color="tab:blue", label="req/s")
        errors = [e["errors"] / e["span"] for e in timeline]
        if any(errors):
            top.stairs(errors, edges, color="tab:red", label="errors/s")
        for name, color in (("p50_us", "tab:green"), ("p99_us", "tab:orange")):
            values = [e[name] / 1000 if e[name] else math.nan for e in timeline]
            bottom.stairs(values, edges, color=color, label=name[:3])
        top.legend(loc="lower right", fontsize=8)
        bottom.legend(loc="upper right", fontsize=8)
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since start")
    if any(e["p99_us"] for e in timeline):
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        bottom.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(ticker.NullFormatter())
    for event in result.events:
        at = event.time - result.started_at
        for axis in (top, bottom):
            axis.axvline(at, color="tab:purple", linestyle="--", linewidth=1)
        top.annotate(
            event.label, xy=(at, 0.98), xycoords=("data", "axes fraction"), rotation=90,
            va="top", ha="right", fontsize=8, color="tab:purple",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
        )  # fmt: skip
    top.set_xlim(left=0, right=max(result.duration, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


# ----------------------------------------------------------------------------- command line
class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line; defaults mirror ``LoadConfig`` so both entry points agree."""
    parser = OneLineParser(
        prog="loadtest",
        description="Drive a server with load: echo (tcp, udp, unix, unix-dgram) or HTTP GET. "
        "Prints a summary; exit 0 when errors <= --max-errors, 1 otherwise, 2 for usage errors.",
    )
    parser.add_argument("target", metavar="TARGET",
                        help="tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, unix-dgram:PATH or "
                        "http://HOST:PORT/PATH; HOST may be [IPV6]")  # fmt: skip
    add = parser.add_argument
    add("-d", "--duration", type=float, metavar="S", help="run this many seconds")
    add("-n", "--requests", type=int, metavar="N", help="stop after N requests in total")
    add("-c", "--concurrency", type=int, default=1, metavar="C",
        help="connections, each with one request in flight (default 1). A sync-mode cluster "
        "serves one persistent connection per worker: keep C <= workers there")  # fmt: skip
    add("-p", "--processes", type=int, default=1, metavar="P",
        help="client processes the connections are spread over (default 1)")  # fmt: skip
    add("--connect", choices=CONNECT_MODES, default="persistent",
        help="stream targets: one connection per lane, or a new one per request")  # fmt: skip
    add("-r", "--rate", type=float, metavar="R",
        help="open loop: R requests/s in total, latency from the intended send time "
        "(default: closed loop)")  # fmt: skip
    add("--payload", type=int, default=64, metavar="BYTES", help="echo payload size (default 64)")
    add("--timeout", type=float, default=5.0, metavar="S", help="per request (default 5)")
    add("--max-errors", type=int, default=0, metavar="N",
        help="exit 0 with at most N errors (default 0)")  # fmt: skip
    add("--json", metavar="FILE", help="write the full result as JSON")
    add("--plot", metavar="FILE.png", help="draw throughput and latency over time")
    add("--events", metavar="FILE",
        help="read events (lines 'UNIX_TIMESTAMP LABEL') from FILE at the end")  # fmt: skip
    add("--allow-remote", action="append", default=[], metavar="HOST",
        help="allow this non-loopback host as a target (repeatable)")  # fmt: skip
    add("-q", "--quiet", action="store_true", help="no live progress line")
    return parser


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Flags -> the same ``LoadConfig`` that library users build themselves."""
    return LoadConfig(
        target=args.target,
        duration=args.duration,
        requests=args.requests,
        concurrency=args.concurrency,
        processes=args.processes,
        connect=args.connect,
        rate=args.rate,
        payload=args.payload,
        timeout=args.timeout,
        max_errors=args.max_errors,
        allow_remote=tuple(args.allow_remote),
        events_file=args.events,
    )


def progress_line(progress: Progress) -> str:
    """The live line: elapsed, requests, recent rate, errors."""
    return (
        f"[{progress.elapsed:6.1f} s] {progress.requests} requests  "
        f"{progress.rate:.0f} req/s  {progress.errors} errors"
    )


def terminal_progress(stream: Any) -> Callable[[Progress], None]:
    """Rewrite one line in place on a terminal."""

    def show(progress: Progress) -> None:
        stream.write("\r\033[K" + progress_line(progress))
        stream.flush()

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: returns the exit code (0 pass, 1 too many errors, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        make_plan(config, resolve=False)  # refuse before anything starts
        for path in (args.json, args.plot):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise UsageError(f"cannot write {path}: no such directory")
    except UsageError as err:
        print(f"loadtest: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    live = not args.quiet and sys.stderr.isatty()
    try:
        result = run(config, progress=terminal_progress(sys.stderr) if live else None)
    except UsageError as err:
        print(f"loadtest: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ClientCrash as err:
        print(f"loadtest: {err}", file=sys.stderr)
        return EXIT_ERRORS
    finally:
        if live:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    print(format_summary(result), flush=True)
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return result.exit_code()


if __name__ == "__main__":
    sys.exit(main())

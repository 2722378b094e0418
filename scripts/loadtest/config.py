"""What to run and how it is split: ``LoadConfig``, its validation (no network) and
``make_plan``, which turns it into the ``Plan`` every client process gets.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from typing import Any

from loadtest.errors import UsageError
from loadtest.targets import Target, check_allowed, parse_target

HARD_CAP_SECONDS = 3600.0  # no run lasts longer, whatever the bounds say
CONNECT_MODES = ("persistent", "per-request")
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4


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

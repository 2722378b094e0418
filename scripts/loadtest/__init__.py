"""``loadtest``: drive a running cluster (or any echo / HTTP server) with load and report.

    cluster loadtest TARGET (--duration S | --requests N) [options]
    python -m loadtest ...                     (the same)

A tool for the product, not part of it: the top-level package ``loadtest`` (source in
``scripts/loadtest/``) ships with prefork-cluster, but its dependencies (multiprocess,
hdrhistogram, matplotlib) come only with the optional extra ``prefork-cluster[loadtest]``.
It uses ``cluster`` (the bind grammar, the one-line parser); ``cluster`` never imports it.

The design, in the order a run goes (the module that holds each part in brackets):

- **Plan** (pure): ``parse_target`` turns the target URI into a ``Target`` (``targets``);
  ``make_plan`` checks the ``LoadConfig`` (a bound is mandatory, only loopback or Unix targets
  unless the user names the host with ``allow_remote``) and splits connections and the request
  budget over the client processes (``config``). Nothing touches the network before the plan is
  valid, so refusals are cheap and exact (exit 2, one line; ``UsageError`` in ``errors``).
- **Clients**: ``processes`` forked client processes (``multiprocess``, fork context; forked and
  gathered by ``run`` in ``runner``), each an event loop (``Client`` in ``clients``) over its
  share of the ``concurrency`` connections ("lanes", ``lanes``) with ``selectors``.
  One loop per process rather than one thread per connection: a request costs a ``send``, a
  share of one ``epoll_wait`` and a ``recv``, with no GIL hand-offs, which is what lets one
  Python process drive tens of thousands of requests per second. A lane has at most one
  request in flight. HTTP requests and responses are written and parsed by hand (``http``).
- **Open and closed loop**: without ``rate`` a lane sends its next request as soon as the last
  one completed (closed loop). With ``rate`` every lane has a schedule of *intended* send times
  and latency is measured from the intended time, not from the moment the request could
  finally go out: a stalled server then shows up as latency instead of silently lowering the
  offered load (coordinated omission).
- **Measurements**: each process records latencies in microseconds into an HDR histogram per
  second of the run (``histograms``), and counts errors by kind (``ERROR_KINDS``, ``errors``).
  At the end each process sends its encoded histograms through a pipe and ``summarize`` (pure
  apart from decoding; ``results``) merges them into the totals and the per-second timeline.
- **Reporting**: ``format_summary`` (pure) for the terminal, ``result_to_json`` for ``--json``,
  ``plot`` for ``--plot`` (``report``); events (``Events.mark`` in-process, or lines
  ``UNIX_TIME LABEL`` appended to an ``--events`` file by another process; ``events``) are
  placed on the timeline. The command line is ``main`` in ``cli``.

Library use, e.g. from a chaos script that acts on the master from another thread::

    from loadtest import Events, LoadConfig, run
    events = Events()
    threading.Thread(target=chaos, args=(events,)).start()   # calls events.mark("HUP sent")
    result = run(LoadConfig("tcp://127.0.0.1:8000", duration=10, concurrency=8), events=events)
    assert result.error_count == 0, result.errors

Every loop stops by itself: at the end of ``duration``, when the request budget is spent, or
at ``HARD_CAP_SECONDS`` whatever was asked; client processes also stop when their parent dies.

This package re-exports every public name, so ``from loadtest import X`` works for all of
them.
"""

from loadtest.cli import (
    OneLineParser,
    build_parser,
    config_from_args,
    main,
    progress_line,
    terminal_progress,
)
from loadtest.clients import (
    TIMER_SCAN,
    Client,
)
from loadtest.config import (
    CONNECT_MODES,
    HARD_CAP_SECONDS,
    MAX_DATAGRAM,
    LoadConfig,
    Plan,
    make_plan,
    resolve_address,
    split_evenly,
    validate,
)
from loadtest.errors import (
    ERROR_KINDS,
    MAX_ERROR_TIMES,
    MAX_EXAMPLES,
    ClientCrash,
    UsageError,
    classify_errno,
    describe,
)
from loadtest.events import (
    Event,
    Events,
    append_event,
    parse_events,
    read_events,
)
from loadtest.histograms import (
    HDR_DIGITS,
    HDR_HIGHEST_US,
    HDR_LOWEST_US,
    new_histogram,
)
from loadtest.http import (
    MAX_HTTP_HEAD,
    HttpResponse,
    http_request,
    parse_http_response,
)
from loadtest.lanes import (
    DUE,
    LANE_CLASSES,
    RETRY,
    DatagramLane,
    HttpLane,
    Lane,
    StreamEchoLane,
)
from loadtest.report import (
    describe_mode,
    format_latency,
    format_summary,
    plot,
    result_to_json,
    write_json,
)
from loadtest.results import (
    EXIT_ERRORS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PERCENTILES,
    Result,
    merge_timeline,
    percentiles_of,
    summarize,
)
from loadtest.runner import (
    START_MARGIN,
    Progress,
    Shared,
    run,
)
from loadtest.targets import (
    DATAGRAM_KINDS,
    STREAM_KINDS,
    Target,
    check_allowed,
    is_loopback_host,
    parse_target,
)

__all__ = [
    "CONNECT_MODES",
    "Client",
    "ClientCrash",
    "DATAGRAM_KINDS",
    "DUE",
    "DatagramLane",
    "ERROR_KINDS",
    "EXIT_ERRORS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Event",
    "Events",
    "HARD_CAP_SECONDS",
    "HDR_DIGITS",
    "HDR_HIGHEST_US",
    "HDR_LOWEST_US",
    "HttpLane",
    "HttpResponse",
    "LANE_CLASSES",
    "Lane",
    "LoadConfig",
    "MAX_DATAGRAM",
    "MAX_ERROR_TIMES",
    "MAX_EXAMPLES",
    "MAX_HTTP_HEAD",
    "OneLineParser",
    "PERCENTILES",
    "Plan",
    "Progress",
    "RETRY",
    "Result",
    "START_MARGIN",
    "STREAM_KINDS",
    "Shared",
    "StreamEchoLane",
    "TIMER_SCAN",
    "Target",
    "UsageError",
    "append_event",
    "build_parser",
    "check_allowed",
    "classify_errno",
    "config_from_args",
    "describe",
    "describe_mode",
    "format_latency",
    "format_summary",
    "http_request",
    "is_loopback_host",
    "main",
    "make_plan",
    "merge_timeline",
    "new_histogram",
    "parse_events",
    "parse_http_response",
    "parse_target",
    "percentiles_of",
    "plot",
    "progress_line",
    "read_events",
    "resolve_address",
    "result_to_json",
    "run",
    "split_evenly",
    "summarize",
    "terminal_progress",
    "validate",
    "write_json",
]

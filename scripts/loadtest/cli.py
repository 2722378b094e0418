"""The command line: the argument parser, the live progress line and ``main``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cluster.errors import OneLineParser
from loadtest.config import CONNECT_MODES, LoadConfig, make_plan
from loadtest.errors import ClientCrash, UsageError
from loadtest.report import format_summary, plot, write_json
from loadtest.results import EXIT_ERRORS, EXIT_USAGE
from loadtest.runner import Progress, run


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


def check_lazy_dependencies(plot: bool) -> None:
    """The extra's modules that are imported only when needed (multiprocess to run, matplotlib
    to plot): raise ``ModuleNotFoundError`` for a missing one now rather than after the run.
    (``hdrh`` is imported with the package itself.)"""
    for name in ("multiprocess", "matplotlib") if plot else ("multiprocess",):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: returns the exit code (0 pass, 1 too many errors, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_lazy_dependencies(plot=bool(args.plot))
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
    # INT (Ctrl-C) ends a run early with the report of what it did. A parent that ignores
    # INT (a background job of a non-interactive shell does) passes SIG_IGN on, and Python
    # then leaves it ignored: the run could not be stopped (multihost's load, for one).
    signal.signal(signal.SIGINT, signal.default_int_handler)
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

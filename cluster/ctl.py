"""``cluster ctl``: talk to a running master over its control socket.

    cluster ctl [--control PATH] [--json] status | top [--once] | scale N | incr [N] | decr [N]
                | reload | upgrade | stop | quit | reopen-logs | config | drain | undrain

Exit codes: 0 the master did it; 1 the master answered with an error; 2 a usage error; 3 no
master answered at PATH (the message names it).

``status`` is a table like Apache's server-status (one row per worker, then the totals and
the listeners); ``top`` redraws it every second with requests per second, until Ctrl-C
(``--once``: one frame, for scripts); ``--json`` prints the master's reply as it came. Tables
and colour are ``rich``'s, imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence

from cluster import commands
from cluster.errors import OneLineParser
from cluster.text import plural

PIPE_WIDTH = 200  # columns of the tables written to a pipe (no terminal to fit)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_CONTROL = "run/cluster.ctl"  # where `make run` puts it
ENV_CONTROL = "CLUSTER_CONTROL"
TIMEOUT = 10.0


class Unreachable(Exception):
    """No master answered at the control socket's path."""


def ask(path: str, message: dict, timeout: float = TIMEOUT) -> dict:
    """Send one command, return the master's reply (Unreachable when nobody answers)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)  # blocking: a full backlog makes us wait, not fail
            sock.settimeout(timeout)
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as err:
        raise Unreachable(f"no master at {path}: {err.strerror or err}") from None
    if not data:
        raise Unreachable(f"no master at {path}: it closed the connection without a reply")
    return json.loads(data)


def build_parser(prog: str = "cluster ctl") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="Talk to a running master over its control "
                           "socket.")  # fmt: skip
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH",
                        help=f"the master's control socket (default: ${ENV_CONTROL}, else "
                        f"{DEFAULT_CONTROL})")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the master's reply as JSON")
    sub = parser.add_subparsers(dest="name", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)  # fmt: skip
    for name, summary in commands.COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary)
        if name in commands.TAKES_COUNT:
            default = commands.TAKES_COUNT[name]
            command.add_argument("n", type=int, nargs="?" if default else None, metavar="N")
    top = sub.add_parser("top", help="a live view of the workers, refreshed every second")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    path = args.control or os.environ.get(ENV_CONTROL) or DEFAULT_CONTROL
    try:
        if args.name == "top":
            return top(path, once=args.once, interval=args.interval)
        message = {"cmd": args.name}
        if getattr(args, "n", None) is not None:
            message["n"] = args.n
        try:
            commands.from_message(message)  # a usage error is ours to say, before connecting
        except commands.CommandError as err:
            print(f"cluster: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        answer = ask(path, message)
    except Unreachable as err:
        print(f"cluster: error: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif not answer.get("ok"):
        pass
    elif args.name == "status":
        render_status(answer)
    else:
        print(summarize(args.name, answer))
    if not answer.get("ok"):
        print(f"cluster: error: {answer.get('error', 'the master refused')}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def summarize(name: str, answer: dict) -> str:
    """One line for a command that changes something."""
    if name in ("scale", "incr", "decr"):
        return f"pool target: {plural(answer['target'], 'worker')}"
    if name == "reload":
        if answer.get("folded"):  # "after": what the reload under way waits for
            after = {"check": "the app's check under way ends"}.get(
                answer.get("after", ""), "the booting generation serves"
            )
            return f"reload: folded into the one that starts once {after}"
        if "new_master" in answer:
            return f"reload: new master {answer['new_master']} (--preload)"
        if answer.get("checking"):
            return f"reload: generation {answer['generation']} starts once the app imports"
        return f"reload: generation {answer['generation']} starting"
    if name == "upgrade":
        return f"upgrade: new master {answer['new_master']} starting"
    if name == "config":
        return json.dumps(answer["config"], indent=2, sort_keys=True)
    if name in ("drain", "undrain"):
        health = answer["health"]
        where = "out of rotation" if health["drained"] else "in rotation"
        return f"{name}: {where}; health says {health['state']}"
    if name == "reopen-logs":
        reopened = answer.get("reopened", [])
        return "reopened: " + (", ".join(reopened) if reopened else "nothing (logs go to stderr)")
    return f"{name}: done"


# ------------------------------------------------------------------------------ tables
def status_tables(status: dict, rates: dict[int, float] | None = None,
                  listener_rates: dict[str, float] | None = None) -> list:  # fmt: skip
    """The status as rich renderables: the workers, the totals, the listeners (busiest
    first, with their rates, in ``top``)."""
    from rich.markup import escape
    from rich.table import Table

    workers = Table(title=escape(f"master {status['pid']} [{status['name']}], generation "
                                 f"{status['generation']}, up {_age(status['uptime'])}"),
                    title_justify="left")  # fmt: skip
    for column in ("slot", "pid", "gen", "mode", "state", "reqs"):
        workers.add_column(column, justify="left" if column in ("mode", "state") else "right")
    if rates is not None:
        workers.add_column("req/s", justify="right")
    for column in ("busy", "req age", "client", "beat", "age"):
        workers.add_column(column, justify="right" if column != "client" else "left")
    style = {"idle": "green", "busy": "yellow", "booting": "cyan", "draining": "magenta"}
    for w in status["workers"]:
        state = escape(w["state"] + (f" ({w['retiring']})" if w.get("retiring") else ""))
        row = [str(w["slot"]), str(w["pid"]), str(w["generation"]), w["mode"],
               f"[{style.get(w['state'], 'red')}]{state}[/]", str(w["requests"])]  # fmt: skip
        if rates is not None:
            row.append(f"{rates.get(w['pid'], 0.0):.0f}")
        row += [f"{w['busy_lanes']}/{w['lanes']}",
                _age(w["request_age"]) if w["request_age"] is not None else "-",
                escape(w["client"] or "-"), _age(w["heartbeat_age"]), _age(w["age"])]  # fmt: skip
        workers.add_row(*row)
    states: dict[str, int] = {}
    for w in status["workers"]:
        states[w["state"]] = states.get(w["state"], 0) + 1
    totals = Table(title="totals", title_justify="left", show_header=False)
    totals.add_column()
    totals.add_column(justify="right")
    totals.add_row("workers", f"{plural(len(status['workers']), 'worker')} (target "
                   f"{status['target']}, {status['mode']})")  # fmt: skip
    for state, count in sorted(states.items()):
        totals.add_row(f"  {state}", str(count))
    totals.add_row("requests served", str(sum(w["requests"] for w in status["workers"])))
    if health := status.get("health"):
        drained = " (ctl drain)" if health["drained"] else ""
        totals.add_row("health", f"{health['state']}{drained}, weight {health['weight']}%")
    if rates is not None:
        totals.add_row("requests per second", f"{sum(rates.values()):.0f}")
    listeners = Table(title="listeners", title_justify="left")
    listeners.add_column("listener")
    for column in ("accepted", "requests", "errors"):
        listeners.add_column(column, justify="right")
    if listener_rates is not None:
        listeners.add_column("req/s", justify="right")
    entries = status.get("listener_stats", [])
    if listener_rates is not None:
        entries = sorted(entries, key=lambda e: -listener_rates.get(e["uri"], 0.0))
    for entry in entries:
        row = [escape(entry["uri"]), str(entry["accepted"]), str(entry["requests"]),
               str(entry["errors"])]  # fmt: skip
        if listener_rates is not None:
            row.append(f"{listener_rates.get(entry['uri'], 0.0):.0f}")
        listeners.add_row(*row)
    if not status.get("listener_stats"):
        for uri in status["listeners"]:
            listeners.add_row(uri, "-", "-", "-")
    return [workers, totals, listeners]


def make_console():  # noqa: ANN201
    """rich's console; on a pipe (``ctl status | grep``) a wide one: rich gives a pipe 80
    columns, and the tables then cut their values short ("14.…" for an age of 14.8s)."""
    from rich.console import Console

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=PIPE_WIDTH)


def render_status(status: dict) -> None:
    console = make_console()
    for table in status_tables(status):
        console.print(table)


def top(path: str, once: bool, interval: float) -> int:
    """Redraw the status every ``interval`` seconds with requests per second, until Ctrl-C."""
    from rich.console import Group
    from rich.live import Live

    console = make_console()
    previous, previous_at = None, 0.0

    def frame() -> Group:
        nonlocal previous, previous_at
        status, now = ask(path, {"cmd": "status"}), time.monotonic()
        rates: dict[int, float] = {}
        listener_rates: dict[str, float] = {}
        if previous is not None:
            span = max(now - previous_at, 1e-6)
            before = {w["pid"]: w["requests"] for w in previous["workers"]}
            for w in status["workers"]:
                rates[w["pid"]] = max(0, w["requests"] - before.get(w["pid"], w["requests"])) / span
            seen = {e["uri"]: e["requests"] for e in previous.get("listener_stats", [])}
            for e in status.get("listener_stats", []):
                listener_rates[e["uri"]] = max(0, e["requests"] - seen.get(e["uri"], 0)) / span
        previous, previous_at = status, now
        return Group(*status_tables(status, rates, listener_rates))

    if once:
        frame()
        time.sleep(min(interval, 1.0))  # two samples a moment apart: a rate, not a guess
        console.print(frame())
        return EXIT_OK
    try:
        with Live(frame(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(frame())
    except KeyboardInterrupt:
        return EXIT_OK


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"

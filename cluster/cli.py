"""``cluster``: the command line. Parses flags into a Config and runs the master.

Errors the user can fix print one line and exit with the contract's code (2 usage, 3 app,
4 bind); only a bug in us may print a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from cluster import config as config_module
from cluster import logs
from cluster.app import BUILTIN_APPS
from cluster.errors import ClusterError, OneLineParser
from workers.runtime import modes


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("prefork-cluster")
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    """``--version``, looked up only when asked for: ``importlib.metadata`` pulls in about 40
    modules (email, zipfile, csv, tempfile and with it ``random``, whose at-fork hook reseeds
    every forked child), which the master would otherwise carry into every worker."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:  # fmt: skip
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"cluster {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cluster", description="A prefork socket-server cluster.")
    parser.add_argument("--version", action=VersionAction,
                        help="show the installed version and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser,
                                metavar="COMMAND")  # fmt: skip
    run = sub.add_parser(
        "run",
        help="serve an app",
        description="Bind the listeners once, prefork a pool of workers, and supervise them.",
        argument_default=argparse.SUPPRESS,  # only flags the user gave override the config file
    )
    run.add_argument(
        "app", nargs="?",
        help=f"module:Class (a request handler class) or a built-in demo: {', '.join(BUILTIN_APPS)} "
        "(default: echo)",
    )  # fmt: skip
    run.add_argument(
        "-b", "--bind", action="append", metavar="URI",
        help="listener, repeatable (default tcp://127.0.0.1:8000): tcp://HOST:PORT, HOST:PORT, "
        "[IPV6]:PORT, udp://HOST:PORT, unix:PATH, unix-dgram:PATH, fd://N; "
        "append =module:Class to serve that listener with its own handler; options after ?: "
        "proxy=v1|v2|any (a PROXY header first), allow=CIDR[,CIDR], name=N (systemd); "
        "unix:PATH?mode=0660&owner=U&group=G sets the socket file's mode and owner",
    )  # fmt: skip
    run.add_argument(
        "-w", "--workers", type=int, metavar="N", help="initial pool size (default: CPUs)"
    )
    run.add_argument("--max-workers", type=int, metavar="N",
                     help="upper bound of the pool for scaling (default: 4 per CPU)")  # fmt: skip
    run.add_argument("-k", "--worker-class", choices=modes.names(),
                     help="; ".join(f"{m.name}: {m.summary}" for m in modes.MODES.values()))  # fmt: skip
    run.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="thread mode: handler threads per worker (default 16)",
    )
    run.add_argument("--max-children", type=int, metavar="N",
                     help="fork mode: concurrent children per worker (default 40)")  # fmt: skip
    run.add_argument("--backlog", type=int, metavar="N", help="listen() backlog (default 2048)")
    run.add_argument("--reuse-port", action="store_true", help="set SO_REUSEPORT on inet listeners")
    run.add_argument("--graceful-timeout", type=float, metavar="S",
                     help="how long a stop waits for in-flight requests (default 30)")  # fmt: skip
    run.add_argument("--reload-strategy", choices=config_module.RELOAD_STRATEGIES,
                     help="HUP: all (default) starts a whole new generation, then retires the "
                     "old; rolling replaces one worker at a time")  # fmt: skip
    run.add_argument("--min-spare", type=int, metavar="N",
                     help="adaptive pool: fork workers while fewer than N are idle (default off)")  # fmt: skip
    run.add_argument("--max-spare", type=int, metavar="N",
                     help="adaptive pool: retire one idle worker a second while more than N are idle")  # fmt: skip
    run.add_argument("--timeout", type=float, metavar="S",
                     help="kill a worker whose current request makes no progress for S seconds "
                     "(waiting for the client's bytes is progress), after dumping its stack; "
                     "also the idle heartbeat watchdog's interval (default 30; 0: no request "
                     "timeout, heartbeat every 30 s)")  # fmt: skip
    run.add_argument("--keep-alive", type=float, metavar="S",
                     help="close a connection that waits for its next request longer than S "
                     "seconds (http.server handlers and the demos mark those waits; default 5; "
                     "0: never)")  # fmt: skip
    run.add_argument("--request-timeout", type=float, metavar="S",
                     help="cut a client that has not sent a whole request S seconds after it "
                     "began (from the connection's accept, or the request's first byte), "
                     "however often it sends a byte (default 30; 0: never)")  # fmt: skip
    run.add_argument("--waiting-room", action=argparse.BooleanOptionalAction,
                     help="new connections whose client has sent nothing yet wait in the "
                     "worker's epoll, not in a handler (default on; handlers that speak first "
                     "say speaks_first = True and skip it)")  # fmt: skip
    run.add_argument("--defer-accept", action=argparse.BooleanOptionalAction,
                     help="TCP_DEFER_ACCEPT on TCP listeners: the kernel holds a new connection "
                     "until its client sends something, for a second (default on; off by "
                     "itself for handlers that say speaks_first = True)")  # fmt: skip
    run.add_argument("--max-connections", type=int, metavar="N",
                     help="connections a worker holds at once, in its handlers and its "
                     "waiting room; the rest wait in the listen queue (default: handlers + 64)")  # fmt: skip
    run.add_argument("--max-requests", type=int, metavar="N",
                     help="recycle a worker after N requests (default 0: never)")  # fmt: skip
    run.add_argument("--max-requests-jitter", type=int, metavar="J",
                     help="add a random 0..J to each worker's --max-requests")  # fmt: skip
    run.add_argument(
        "--pidfile", metavar="PATH", help="write the master's pid here; removed on exit"
    )
    run.add_argument("--name", metavar="NAME", help="shown in process titles (default: the app)")
    run.add_argument("--control", metavar="PATH",
                     help="a control socket (mode 0600) for `cluster ctl` (default: none)")  # fmt: skip
    run.add_argument("--metrics", metavar="URI",
                     help="serve Prometheus metrics here: tcp://HOST:PORT or unix:PATH "
                     "(default: none)")  # fmt: skip
    run.add_argument("--health", metavar="URI",
                     help="serve health here (tcp://HOST:PORT or unix:PATH): HTTP 200 while "
                     "ready, 503 while starting, draining or stopping (GET /live: 200 while the "
                     "master runs), and HAProxy's agent-check (default: none)")  # fmt: skip
    run.add_argument("--drain-delay", type=float, metavar="S",
                     help="on TERM, report draining for S seconds while still serving, then "
                     "stop gracefully (default 0)")  # fmt: skip
    run.add_argument("--log-level", metavar="LEVEL", help="debug, info (default), warning, error")
    run.add_argument("--log-format", choices=("text", "json"),
                     help="text (default), or json: one object per line")  # fmt: skip
    run.add_argument("--log-file", metavar="PATH",
                     help="write the log here instead of stderr (USR1 reopens it)")  # fmt: skip
    run.add_argument("--access-log", metavar="PATH",
                     help="one line per request, to PATH or - (stderr); default: none")  # fmt: skip
    run.add_argument("--access-log-format", metavar="FORMAT",
                     help="str.format fields: time, client, listener, pid, duration_ms, "
                     "bytes_in, bytes_out, request, status")  # fmt: skip
    run.add_argument("--allow-from", action="append", metavar="CIDR",
                     help="serve only clients from these networks (repeatable, or comma-"
                     "separated); the default of listeners without ?allow= (default: everyone)")  # fmt: skip
    run.add_argument("--proxy-allow", action="append", metavar="CIDR",
                     help="sources trusted to send the PROXY header of ?proxy= listeners "
                     "(repeatable, or comma-separated; default: 127.0.0.0/8 and ::1)")  # fmt: skip
    run.add_argument("--preload", action="store_true",
                     help="import the app in the master only; workers use that copy")  # fmt: skip
    run.add_argument("--user", metavar="USER",
                     help="run the workers as USER (a name or a uid) once the master, as root, "
                     "has bound the listeners; app code never runs as root (default: as the "
                     "master)")  # fmt: skip
    run.add_argument("--group", metavar="GROUP",
                     help="with --user: the workers' group (default: USER's primary group); "
                     "supplementary groups are cleared")  # fmt: skip
    run.add_argument("--umask", metavar="MASK",
                     help="octal umask (like 027) of the master and workers: the pidfile, log "
                     "files and unix: sockets without mode= (default: inherited)")  # fmt: skip
    run.add_argument("--config", metavar="FILE", help="TOML file with the long flags as keys")
    ctl = sub.add_parser("ctl", help="talk to a running master over its control socket",
                         description="Talk to a running master over its control socket.")  # fmt: skip
    from cluster import ctl as ctl_module

    ctl_module.add_arguments(ctl)
    sub.add_parser(
        "loadtest", help="drive a server with load and report (see `cluster loadtest --help`)",
        add_help=False,
    )  # fmt: skip
    return parser


def config_from_args(args: argparse.Namespace) -> config_module.Config:
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    path = flags.get("config")
    file_values = config_module.read_toml(path) if path else {}
    return config_module.build(file_values, flags)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:  # its own parser: `cluster loadtest --help` documents it
        try:  # imported lazily: the load tester and its dependencies are an optional extra
            from loadtest import main as loadtest_main

            return loadtest_main(argv[1:])
        except ModuleNotFoundError as err:
            if err.name is None or err.name.startswith(("loadtest.", "cluster.", "workers.")):
                raise  # one of our own modules: a bug, not a missing extra
            print("cluster: error: the load tester is an optional extra: "
                  "pip install 'prefork-cluster[loadtest]'", file=sys.stderr)  # fmt: skip
            return 2
    parser = build_parser()
    if not argv:  # the usage and the subcommands, and the exit code of a usage error
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    if args.command == "ctl":
        from cluster import ctl

        return ctl.run(args)
    try:
        config = config_from_args(args)
        if config.umask_bits is not None:  # before the first file we create: the log file
            os.umask(config.umask_bits)
        identity = config.identity
        logs.setup(config.log_level, config.log_format, config.log_file,
                   owner=identity.uid if identity else None)  # fmt: skip
        from cluster.master import Master  # after validation: `--help` and bad flags stay fast

        return Master(config, reread_config=lambda: config_from_args(args), upgradable=True).run()
    except ClusterError as err:
        print(f"cluster: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one settings object of the master, filled from defaults, a TOML file and flags.

Every field is a long flag of ``cluster run`` (``graceful_timeout`` is ``--graceful-timeout``) and
a key of the ``--config`` TOML file; flags given on the command line win over the file.
``validate`` is a pure function so that tests check every rule without starting a process.
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from cluster import users
from cluster.errors import ConfigError
from cluster.listeners import BindSpec, parse_bind
from cluster.sources import DEFAULT_PROXY_ALLOW, networks
from cluster.text import shown
from workers.runtime import modes
from workers.runtime.access import DEFAULT_ACCESS_FORMAT, format_error
from workers.runtime.privileges import Identity

RELOAD_STRATEGIES = ("all", "rolling")
DEFAULT_BIND = "tcp://127.0.0.1:8000"
# Upper bounds, so that no accepted value overflows where it ends up: the kernel's timeouts
# (a year of seconds fits any of them), listen()'s int, and the scoreboard, which is sized
# pool x lanes per worker up front.
MAX_SECONDS = 365 * 86400.0
MAX_COUNT = 2**31 - 1
COUNT_LIMITS = {"workers": 4096, "max_workers": 4096, "threads": 4096, "max_children": 4096,
                "min_spare": 4096, "max_spare": 4096, "backlog": 65535}  # fmt: skip


@dataclass
class Config:
    """What to serve and how; see ``docs/configuration.md`` for each field."""

    app: str = "echo"
    bind: list[str] = field(default_factory=lambda: [DEFAULT_BIND])
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_workers: int = 0  # 0: no bound beyond what the machine allows (see ``pool_bound``)
    worker_class: str = modes.DEFAULT
    threads: int = 16
    max_children: int = 40
    backlog: int = 2048
    reuse_port: bool = False
    graceful_timeout: float = 30.0
    timeout: float = 30.0  # kill a worker whose request makes no progress this long; 0: never
    keep_alive: float = 5.0  # close a connection idle between requests this long; 0: never
    request_timeout: float = 30.0  # the deadline for reading one request; 0: none
    waiting_room: bool = True  # silent new connections wait in a room, not in a handler
    defer_accept: bool = True  # TCP_DEFER_ACCEPT: the kernel holds silent connections a while
    max_connections: int = 0  # per worker, in handlers and the room; 0: handlers + 64
    max_requests: int = 0  # recycle a worker after this many requests; 0: never
    max_requests_jitter: int = 0
    reload_strategy: str = "all"  # all: a whole new generation, then retire the old; rolling
    min_spare: int = 0  # adaptive pool: keep at least this many idle workers (0: off)
    max_spare: int = 0  # adaptive pool: retire idle workers beyond this many (0: off)
    pidfile: str | None = None
    control: str | None = None  # the control socket's path (none unless asked)
    metrics: str | None = None  # the Prometheus endpoint: tcp://HOST:PORT or unix:PATH
    health: str | None = (
        None  # HTTP 200/503 and HAProxy's agent-check: tcp://HOST:PORT or unix:PATH
    )
    drain_delay: float = 0.0  # on TERM, report draining this long while serving, then stop
    name: str = ""
    log_level: str = "info"
    log_format: str = "text"  # text | json
    log_file: str | None = None  # default: stderr
    access_log: str | None = None  # a path, or - for stderr; none by default
    access_log_format: str = DEFAULT_ACCESS_FORMAT
    preload: bool = False
    # Who may connect (cluster/sources.py): the allow list of listeners without ?allow=
    # (empty: everyone), and the sources trusted to send PROXY headers (?proxy= listeners).
    allow_from: list[str] = field(default_factory=list)
    proxy_allow: list[str] = field(default_factory=lambda: list(DEFAULT_PROXY_ALLOW))
    user: str | int | None = None  # workers drop to this user (a name or a uid) after the bind
    group: str | int | None = None  # ... and group (default: the user's primary group)
    umask: str | int | None = None  # octal text ("027") or, from TOML, an int (0o027)
    config: str | None = None

    @property
    def binds(self) -> list[BindSpec]:
        return [parse_bind(text) for text in self.bind]

    @property
    def identity(self) -> Identity | None:
        """Whom the workers run as (``--user``/``--group`` resolved), None: as the master."""
        return users.identity(self.user, self.group)

    @property
    def umask_bits(self) -> int | None:
        return users.parse_umask(self.umask)

    @property
    def pool_bound(self) -> int:
        """The largest pool we ever run: ``--max-workers`` or, unset, 4 per CPU and no less than workers."""
        return self.max_workers or max(self.workers, 4 * (os.cpu_count() or 1))


FIELD_TYPES: dict[str, object] = typing.get_type_hints(Config)  # name -> declared type


def limit(name: str) -> float:
    """The largest value a numeric field accepts (see MAX_SECONDS and COUNT_LIMITS)."""
    return MAX_SECONDS if FIELD_TYPES.get(name) is float else COUNT_LIMITS.get(name, MAX_COUNT)


def flag(name: str) -> str:
    """How the command line spells a field: ``graceful_timeout`` -> ``--graceful-timeout``."""
    return "--" + name.replace("_", "-")


def validate(config: Config, spell: Callable[[str], str] = flag) -> Config:
    """Raise ConfigError naming the first bad value; return the config unchanged otherwise.

    ``spell`` names a field in the messages: the command line's flag by default, the
    keyword itself for the library (``workers must be at least 1``)."""
    for name, value in vars(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{spell(name)} must be a finite number, got {value}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > limit(name):
            raise ConfigError(
                f"{spell(name)} must be at most {int(limit(name))}, got {shown(value)}"
            )
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and "\0" in text for text in texts):
            raise ConfigError(f"{spell(name)} must not contain a NUL character, got {shown(value)}")
    at_least_1 = ("workers", "threads", "max_children", "backlog")
    for name in at_least_1:
        if getattr(config, name) < 1:
            raise ConfigError(f"{spell(name)} must be at least 1, got {getattr(config, name)}")
    for name in ("graceful_timeout", "timeout", "keep_alive", "request_timeout", "max_requests",
                 "max_requests_jitter", "min_spare", "max_spare", "max_connections",
                 "drain_delay"):  # fmt: skip
        if getattr(config, name) < 0:
            raise ConfigError(f"{spell(name)} must not be negative, got {getattr(config, name)}")
    if config.max_workers and config.max_workers < config.workers:
        raise ConfigError(f"{spell('max_workers')} {config.max_workers} is below "
                          f"{spell('workers')} {config.workers}")  # fmt: skip
    if config.worker_class not in modes.MODES:
        raise ConfigError(f"{spell('worker_class')} must be one of {', '.join(modes.names())}, "
                          f"got {shown(config.worker_class)}")  # fmt: skip
    if config.reload_strategy not in RELOAD_STRATEGIES:
        raise ConfigError(f"{spell('reload_strategy')} must be all or rolling, "
                          f"got {shown(config.reload_strategy)}")  # fmt: skip
    handlers = modes.get(config.worker_class).lanes(config)
    if config.max_connections and config.max_connections < handlers:
        raise ConfigError(f"{spell('max_connections')} {config.max_connections} is below the "
                          f"{handlers} connections a {config.worker_class} worker serves at "
                          "once")  # fmt: skip
    if config.max_spare and config.max_spare < config.min_spare:
        raise ConfigError(f"{spell('max_spare')} {config.max_spare} is below "
                          f"{spell('min_spare')} {config.min_spare}")  # fmt: skip
    if config.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{spell('log_level')} must be debug, info, warning, error or "
                          f"critical, got {shown(config.log_level)}")  # fmt: skip
    if not config.bind:
        raise ConfigError(f"at least one {spell('bind')} is needed")
    if config.log_format not in ("text", "json"):
        raise ConfigError(
            f"{spell('log_format')} must be text or json, got {shown(config.log_format)}"
        )
    if problem := format_error(config.access_log_format):
        raise ConfigError(f"bad {spell('access_log_format')} {shown(config.access_log_format)}: "
                          f"{problem}")  # fmt: skip
    if config.metrics and parse_bind(config.metrics).kind not in ("tcp", "unix"):
        raise ConfigError(f"{spell('metrics')} must be tcp://HOST:PORT or unix:PATH, "
                          f"got {shown(config.metrics)}")  # fmt: skip
    if config.health is not None and not _plain_stream_uri(config.health):
        raise ConfigError(f"{spell('health')} must be tcp://HOST:PORT or unix:PATH, "
                          f"got {shown(config.health)}")  # fmt: skip
    for name in ("allow_from", "proxy_allow"):
        values = getattr(config, name)
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{spell(name)} must be a list of CIDRs, got {shown(values)}")
        networks(values, spell(name))
    for endpoint in (config.metrics, config.health):
        if endpoint:
            parse_bind(endpoint).owner_ids()
    binds = config.binds  # parse every URI now, so that a bad one fails before binding any
    for spec in binds:
        spec.owner_ids()  # and resolve a socket file's owner= and group=
    proxied = [b.text for b in binds if b.proxy is not None and b.kind in ("tcp", "udp")]
    if proxied and not networks(config.proxy_allow, spell("proxy_allow")):
        raise ConfigError(f"{spell('proxy_allow')} is empty: no source could send the PROXY "
                          f"header {proxied[0]!r} requires")  # fmt: skip
    users.parse_umask(config.umask, spell("umask"))
    identity = users.identity(config.user, config.group, spell("user"), spell("group"))
    if identity is not None and (
        problem := users.switch_problem(identity, os.geteuid(), os.getegid(), spell("user"))
    ):
        raise ConfigError(problem)
    return config


def _plain_stream_uri(uri: str) -> bool:
    """A stream address for one of the master's own endpoints: no handler and none of the
    options of a served listener (it speaks its own protocol); a Unix socket's mode=,
    owner= and group= are fine."""
    try:
        spec = parse_bind(uri)
    except ConfigError:
        return False
    served = {"proxy", "allow", "name"} & {key for key, _ in spec.options}
    return spec.kind in ("tcp", "unix") and spec.handler is None and not served


def read_toml(path: str) -> dict[str, object]:
    """Read a config file into {field: value}; unknown keys and bad TOML are ConfigErrors."""
    import tomllib  # here, not at the top: every import of the master is paid by each fork

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"bad config file {path}: {err}") from None
    except UnicodeDecodeError as err:  # tomllib decodes the whole file first
        raise ConfigError(f"bad config file {path}: not UTF-8 (byte {err.start})") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"bad config file {path}: values nested too deeply") from None
    known = {f.name for f in fields(Config)}
    values: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise ConfigError(f"bad config file {path}: unknown key {shown(key)}")
        if name in ("bind", "allow_from", "proxy_allow") and isinstance(value, str):
            value = [value]
        values[name] = value
    return values


def build(
    file_values: dict[str, object],
    flag_values: dict[str, object],
    spell: Callable[[str], str] = flag,
) -> Config:
    """Defaults, overlaid by the file, overlaid by the flags the user actually gave."""
    config = Config()
    for source in (file_values, flag_values):
        for name, value in source.items():
            if FIELD_TYPES[name] == list[str] and isinstance(value, str | tuple):
                value = [value] if isinstance(value, str) else list(value)  # one value; a tuple
            if not fits(value, FIELD_TYPES[name]):
                raise ConfigError(f"bad value for {spell(name)}: {shown(value)} "
                                  f"(expected {describe_type(FIELD_TYPES[name])})")  # fmt: skip
            setattr(config, name, value)
    return validate(config, spell)


def fits(value: object, expected: object) -> bool:
    """Whether ``value`` (from TOML or a caller) has a field's declared type: ``int``,
    ``float``, ``bool``, ``str``, unions of them with None, and lists of them. A bool is not a
    number here (``workers = true``), an int is a float (``timeout = 5``)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return any(fits(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(fits(item, args[0]) for item in value)
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected) if isinstance(expected, type) else True


def describe_type(expected: object) -> str:
    """``a whole number``, ``a list of strings``, ``a string or nothing``: for the message."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is list:
        return f"a list of {describe_type(args[0]).removeprefix('a ')}s"
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
             type(None): "nothing"}  # fmt: skip
    return names.get(expected, getattr(expected, "__name__", str(expected)))  # type: ignore[call-overload]

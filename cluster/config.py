"""The one settings object of the master, filled from defaults, a TOML file and flags.

Every field is a long flag of ``cluster run`` (``graceful_timeout`` is ``--graceful-timeout``) and
a key of the ``--config`` TOML file; flags given on the command line win over the file.
``validate`` is a pure function so that tests check every rule without starting a process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from cluster.errors import ConfigError
from cluster.listeners import BindSpec, parse_bind
from workers.runtime import modes
from workers.runtime.access import DEFAULT_ACCESS_FORMAT, format_error

RELOAD_STRATEGIES = ("all", "rolling")
DEFAULT_BIND = "tcp://127.0.0.1:8000"


@dataclass
class Config:
    """What to serve and how; see ``docs/configuration.md`` for each field."""

    app: str = "echo"
    bind: list[str] = field(default_factory=lambda: [DEFAULT_BIND])
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_workers: int = 0  # 0: no bound beyond what the machine allows (see ``pool_bound``)
    worker_class: str = modes.DEFAULT
    threads: int = 8
    max_children: int = 40
    backlog: int = 2048
    reuse_port: bool = False
    graceful_timeout: float = 30.0
    timeout: float = 30.0  # kill a worker whose request makes no progress this long; 0: never
    keep_alive: float = 5.0  # close a connection idle between requests this long; 0: never
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
    config: str | None = None

    @property
    def binds(self) -> list[BindSpec]:
        return [parse_bind(text) for text in self.bind]

    @property
    def pool_bound(self) -> int:
        """The largest pool we ever run: ``--max-workers`` or, unset, 4 per CPU and no less than workers."""
        return self.max_workers or max(self.workers, 4 * (os.cpu_count() or 1))


def flag(name: str) -> str:
    """How the command line spells a field: ``graceful_timeout`` -> ``--graceful-timeout``."""
    return "--" + name.replace("_", "-")


def validate(config: Config, spell: Callable[[str], str] = flag) -> Config:
    """Raise ConfigError naming the first bad value; return the config unchanged otherwise.

    ``spell`` names a field in the messages: the command line's flag by default, the
    keyword itself for the library (``workers must be at least 1``)."""
    at_least_1 = ("workers", "threads", "max_children", "backlog")
    for name in at_least_1:
        if getattr(config, name) < 1:
            raise ConfigError(f"{spell(name)} must be at least 1, got {getattr(config, name)}")
    for name in ("graceful_timeout", "timeout", "keep_alive", "max_requests", "drain_delay",
                 "max_requests_jitter", "min_spare", "max_spare"):  # fmt: skip
        if getattr(config, name) < 0:
            raise ConfigError(f"{spell(name)} must not be negative, got {getattr(config, name)}")
    if config.max_workers and config.max_workers < config.workers:
        raise ConfigError(f"{spell('max_workers')} {config.max_workers} is below "
                          f"{spell('workers')} {config.workers}")  # fmt: skip
    if config.worker_class not in modes.MODES:
        raise ConfigError(f"{spell('worker_class')} must be one of {', '.join(modes.names())}, "
                          f"got {config.worker_class!r}")  # fmt: skip
    if config.reload_strategy not in RELOAD_STRATEGIES:
        raise ConfigError(f"{spell('reload_strategy')} must be all or rolling, "
                          f"got {config.reload_strategy!r}")  # fmt: skip
    if config.max_spare and config.max_spare < config.min_spare:
        raise ConfigError(f"{spell('max_spare')} {config.max_spare} is below "
                          f"{spell('min_spare')} {config.min_spare}")  # fmt: skip
    if config.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"{spell('log_level')} must be debug, info, warning, error or "
                          f"critical, got {config.log_level!r}")  # fmt: skip
    if not config.bind:
        raise ConfigError(f"at least one {spell('bind')} is needed")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"{spell('log_format')} must be text or json, got {config.log_format!r}")
    if problem := format_error(config.access_log_format):
        raise ConfigError(f"bad {spell('access_log_format')} {config.access_log_format!r}: "
                          f"{problem}")  # fmt: skip
    if config.metrics and parse_bind(config.metrics).kind not in ("tcp", "unix"):
        raise ConfigError(f"{spell('metrics')} must be tcp://HOST:PORT or unix:PATH, "
                          f"got {config.metrics!r}")  # fmt: skip
    if config.health is not None and not _plain_stream_uri(config.health):
        raise ConfigError(f"{spell('health')} must be tcp://HOST:PORT or unix:PATH, "
                          f"got {config.health!r}")  # fmt: skip
    config.binds  # noqa: B018  parse every URI now, so that a bad one fails before binding any
    return config


def _plain_stream_uri(uri: str) -> bool:
    """A stream address with nothing after it: no handler, no options (the master's own
    endpoints serve their own protocol)."""
    try:
        spec = parse_bind(uri)
    except ConfigError:
        return False
    return spec.kind in ("tcp", "unix") and spec.handler is None and not spec.options


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
    known = {f.name for f in fields(Config)}
    values: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known or name == "config":
            raise ConfigError(f"bad config file {path}: unknown key {key!r}")
        if name == "bind" and isinstance(value, str):
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
            expected = type(getattr(config, name))
            if (
                expected in (int, float)
                and not isinstance(value, int | float)
                or (expected is bool and not isinstance(value, bool))
            ):
                raise ConfigError(f"bad value for {spell(name)}: {value!r}")
            setattr(config, name, value)
    return validate(config, spell)

"""The one settings object of the master, filled from defaults, a TOML file and flags.

Every field is a long flag of ``cluster run`` (``graceful_timeout`` is ``--graceful-timeout``) and
a key of the ``--config`` TOML file; flags given on the command line win over the file.
``validate`` is a pure function so that tests check every rule without starting a process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from cluster.errors import ConfigError
from cluster.listeners import BindSpec, parse_bind
from workers.runtime import modes

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
    name: str = ""
    log_level: str = "info"
    preload: bool = False
    config: str | None = None

    @property
    def binds(self) -> list[BindSpec]:
        return [parse_bind(text) for text in self.bind]

    @property
    def pool_bound(self) -> int:
        """The largest pool we ever run: ``--max-workers`` or, unset, 4 per CPU and no less than workers."""
        return self.max_workers or max(self.workers, 4 * (os.cpu_count() or 1))


def validate(config: Config) -> Config:
    """Raise ConfigError naming the first bad value; return the config unchanged otherwise."""
    if config.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {config.workers}")
    if config.max_workers and config.max_workers < config.workers:
        raise ConfigError(f"--max-workers {config.max_workers} is below --workers {config.workers}")
    if config.worker_class not in modes.MODES:
        raise ConfigError(
            f"--worker-class must be one of {', '.join(modes.names())}, got {config.worker_class!r}"
        )
    if config.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {config.threads}")
    if config.max_children < 1:
        raise ConfigError(f"--max-children must be at least 1, got {config.max_children}")
    if config.backlog < 1:
        raise ConfigError(f"--backlog must be at least 1, got {config.backlog}")
    if config.graceful_timeout < 0:
        raise ConfigError(f"--graceful-timeout must not be negative, got {config.graceful_timeout}")
    if config.timeout < 0:
        raise ConfigError(f"--timeout must not be negative, got {config.timeout}")
    if config.keep_alive < 0:
        raise ConfigError(f"--keep-alive must not be negative, got {config.keep_alive}")
    if config.max_requests < 0 or config.max_requests_jitter < 0:
        raise ConfigError(
            f"--max-requests and --max-requests-jitter must not be negative, got "
            f"{config.max_requests} and {config.max_requests_jitter}"
        )
    if config.reload_strategy not in RELOAD_STRATEGIES:
        raise ConfigError(
            f"--reload-strategy must be all or rolling, got {config.reload_strategy!r}"
        )
    if (
        config.min_spare < 0
        or config.max_spare < 0
        or (config.max_spare and config.max_spare < config.min_spare)
    ):
        raise ConfigError(
            f"--min-spare {config.min_spare} and --max-spare {config.max_spare} must be "
            "0 or more, with max-spare >= min-spare"
        )
    if config.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(
            f"--log-level must be debug, info, warning, error or critical, got {config.log_level!r}"
        )
    if not config.bind:
        raise ConfigError("at least one --bind is needed")
    config.binds  # noqa: B018  parse every URI now, so that a bad one fails before binding any
    return config


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


def build(file_values: dict[str, object], flag_values: dict[str, object]) -> Config:
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
                raise ConfigError(f"bad value for {name.replace('_', '-')}: {value!r}")
            setattr(config, name, value)
    return validate(config)

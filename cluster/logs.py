"""Logging: the master's and workers' log (text or JSON, stderr or a file), and the access log.

- ``--log-format text`` (the default) writes ``TIME [PID] [LEVEL] message``; ``json`` writes
  one object per line: ``ts``, ``level``, ``pid``, ``role`` (master or worker),
  ``generation``, ``msg``, and any extra fields of the record (``exc`` for a traceback).
- ``--log-file PATH`` writes there instead of stderr. USR1 (or ``ctl reopen-logs``) reopens
  it in the master and in every worker, for logrotate: a file moved away is left behind,
  and writing goes on in a new file at PATH. With ``--user`` the master (root) makes each
  log file it opens the worker user's, as nginx and gunicorn do, so that workers, which
  reopen by path after the master did, may open it too.
- ``--access-log PATH|-`` writes one line per request from the workers
  (``workers.runtime.access``), in ``--access-log-format`` or as JSON with
  ``--log-format json``.

Workers inherit the master's handlers across the fork and say who they are with
``set_role``; nothing here imports anything a worker would not have anyway.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from workers.runtime.access import ROLE
from workers.runtime.privileges import give_to

TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"
_RECORD_KEYS = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _iso(record.created), "level": record.levelname.lower(),
            "pid": record.process, "role": ROLE.name, "generation": ROLE.generation,
            "msg": record.getMessage(),
        }  # fmt: skip
        for key, value in vars(record).items():
            if key not in _RECORD_KEYS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ReopenableFile(logging.StreamHandler):
    """A log file that ``reopen()`` opens afresh at its path (after logrotate moved it);
    ``owner``: the worker user's uid, given the file each time the master opens it."""

    def __init__(self, path: str, owner: int | None = None) -> None:
        self.path = path
        self.owner = owner
        super().__init__(self._open())

    def reopen(self) -> None:
        """Raises OSError when the path cannot be opened; writing goes on to the old file."""
        # No close of the old stream here: a thread (or this one, interrupted by the USR1
        # handler inside emit) may be writing to it; it closes once nothing refers to it.
        self.stream = self._open()

    def _open(self):  # noqa: ANN202
        stream = open(self.path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        give_to(stream.fileno(), self.owner)
        return stream


def setup(level: str, fmt: str = "text", path: str | None = None, owner: int | None = None) -> None:
    """The root logger, for the master (and, inherited, its workers); ``owner``: see
    ``ReopenableFile``."""
    from cluster.errors import ConfigError

    try:
        handler: logging.Handler = (
            ReopenableFile(path, owner) if path else logging.StreamHandler(sys.stderr)
        )
    except OSError as err:
        raise ConfigError(f"cannot open log file {path}: {err.strerror}") from None
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _iso(seconds: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))
        + f".{int(seconds % 1 * 1000):03d}"
    )

"""The access log: one line per request, written by the worker that served it.

``--access-log PATH|-``: the master opens it before forking (so a path that cannot be
written fails at start, and every worker appends to the same open file) and each worker
writes its lines. Fields, for ``--access-log-format`` (``str.format`` names): ``time``,
``client``, ``listener``, ``pid``, ``duration_ms``, ``bytes_in``, ``bytes_out``, ``request``
and ``status`` (an ``http.server`` handler's request line and status; ``-`` for others).
With ``--log-format json`` each line is a JSON object of the same fields.

Also here, as the worker runtime's: who this process is (``ROLE``), for the JSON log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping

ACCESS_FIELDS = ("time", "client", "listener", "pid", "duration_ms", "bytes_in", "bytes_out",
                 "request", "status")  # fmt: skip
DEFAULT_ACCESS_FORMAT = ('{time} {client} {listener} pid={pid} {duration_ms}ms in={bytes_in} '
                         'out={bytes_out} "{request}" {status}')  # fmt: skip


class Role:
    """Who this process is, for the JSON log: the master, or a worker of a generation."""

    name = "master"
    generation = 0


ROLE = Role()


class AccessLog:
    """One line per request, written by the worker that served it.

    Lines are gathered and written in batches (``BATCH`` lines, or when the worker goes
    idle, or at its exit), each batch in one ``write`` of whole lines, so that workers
    appending to one file never interleave within a line and a request costs a line's
    formatting, not a system call. To a pipe or a terminal (``-``) a batch is cut at
    ``PIPE_BUF``, the size the kernel writes atomically.
    """

    BATCH = 64
    PIPE_BUF = 4096

    def __init__(self, path: str, fmt: str = DEFAULT_ACCESS_FORMAT, as_json: bool = False) -> None:
        self.path = path
        self.format = fmt
        self.as_json = as_json
        self.fd = (
            2
            if path == "-"
            else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        )
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self._second = -1
        self._stamp = ""

    def stamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # formatting a time costs more than the rest of a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                              time.localtime(now))  # fmt: skip
        return self._stamp

    def write(self, fields: Mapping[str, object]) -> None:
        entry = {"time": self.stamp(), **fields}
        line = json.dumps(entry, default=str) if self.as_json else self.format.format_map(entry)
        self.lines.append(line + "\n")
        if len(self.lines) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            lines, self.lines = self.lines, []
        if not lines:
            return
        data = "".join(lines).encode(errors="backslashreplace")
        limit = self.PIPE_BUF if self.fd == 2 else len(data)
        while data:
            cut = len(data) if len(data) <= limit else data.rfind(b"\n", 0, limit) + 1 or limit
            try:
                written = os.write(self.fd, data[:cut])
            except OSError:
                return  # the log's disk is full or gone: requests go on unlogged
            data = data[written:]

    def reopen(self) -> bool:
        if self.fd == 2:
            return False
        self.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        old, self.fd = self.fd, fd
        os.close(old)
        return True

    def close(self) -> None:
        self.flush()
        if self.fd != 2:
            os.close(self.fd)


class Access:
    """This process's access log, if there is one (a worker's, opened by the master)."""

    log: AccessLog | None = None


ACCESS = Access()


def format_error(fmt: str) -> str | None:
    """What is wrong with an access log format (an unknown field, a bad brace), or None."""
    try:
        fmt.format_map(dict.fromkeys(ACCESS_FIELDS, "x"))
    except (KeyError, ValueError, IndexError) as err:
        return f"{err} (fields: {', '.join(ACCESS_FIELDS)})"
    return None


def reopen_logs() -> list[str]:
    """Reopen every log file of this process: the root logger's handlers that can (the
    master's ``cluster.logs.ReopenableFile``, inherited by workers), and the access log."""
    import logging

    reopened = []
    for handler in logging.getLogger().handlers:
        reopen = getattr(handler, "reopen", None)
        if reopen is not None:
            reopen()
            reopened.append(getattr(handler, "path", "?"))
    if ACCESS.log is not None and ACCESS.log.reopen():
        reopened.append(ACCESS.log.path)
    return reopened

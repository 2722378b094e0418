"""The access log: one line per request, written by the worker that served it.

``--access-log PATH|-``: the master opens it before forking (so a path that cannot be
written fails at start, and every worker appends to the same open file) and each worker
writes its lines. With ``--user`` the master gives the file to the worker user each time it
opens it, so that workers can reopen it too (``reopen_logs``). Fields, for ``--access-log-format`` (``str.format`` names): ``time``,
``client``, ``listener``, ``pid``, ``duration_ms`` (a float: ``{duration_ms:.3f}``),
``bytes_in``, ``bytes_out``, ``request``
and ``status`` (an ``http.server`` handler's request line and status; ``-`` for others).
With ``--log-format json`` each line is a JSON object of the same fields.

Also here, as the worker runtime's: who this process is (``ROLE``), for the JSON log.
"""

from __future__ import annotations

import json
import os
import threading
import time

from workers.runtime.privileges import give_to

ACCESS_FIELDS = ("time", "client", "listener", "pid", "duration_ms", "bytes_in", "bytes_out",
                 "request", "status")  # fmt: skip
DEFAULT_ACCESS_FORMAT = ('{time} {client} {listener} pid={pid} {duration_ms:.3f}ms in={bytes_in} '
                         'out={bytes_out} "{request}" {status}')  # fmt: skip


class Role:
    """Who this process is, for the JSON log and the access log: the master, or a worker of
    a generation (``pid`` set once at the worker's boot, read on every logged request)."""

    name = "master"
    generation = 0
    pid = 0


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

    def __init__(self, path: str, fmt: str = DEFAULT_ACCESS_FORMAT, as_json: bool = False,
                 owner: int | None = None) -> None:  # fmt: skip
        self.path = path
        self.format = fmt
        self.line = compile_format(fmt)  # fields -> the line, without str.format's parsing
        self.as_json = as_json
        self.owner = owner  # the worker user's uid (--user): the file is given to it
        self.fd = 2 if path == "-" else self._open()
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self._second = -1
        self._stamp = ""

    def write(self, *values: object) -> None:
        """One line: ``values`` are the fields after ``time`` (added here), in the order of
        ``ACCESS_FIELDS``."""
        now = time.time()
        if int(now) != self._second:  # formatting a time costs more than the rest of a line
            self._second = int(now)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
        lines = self.lines
        if self.as_json:
            lines.append(json.dumps(dict(zip(ACCESS_FIELDS, (self._stamp, *values),
                                             strict=True)), default=str))  # fmt: skip
        else:
            lines.append(self.line(self._stamp, *values))
        if len(lines) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            lines = self._take()
        self._write(lines)

    def _take(self) -> list[str]:
        """The lines so far, taken off the front of the one list that writers append to
        (the caller holds the lock): swapping in a new list lost the lines that a thread-mode
        thread appended to the old one after it was taken (``write`` holds it while it
        formats)."""
        lines = self.lines[:]
        del self.lines[: len(lines)]
        return lines

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode(errors="backslashreplace")
        limit = self.PIPE_BUF if self.fd == 2 else len(data)
        while data:
            cut = len(data) if len(data) <= limit else data.rfind(b"\n", 0, limit) + 1 or limit
            try:
                written = os.write(self.fd, data[:cut])
            except OSError:
                return  # the log's disk is full or gone: requests go on unlogged
            data = data[written:]

    def reopen(self) -> bool:
        """Open the path afresh (False: the log is stderr); raises OSError when it cannot, and
        writing goes on to the old file.

        USR1's handler calls this in the main thread, between two bytecodes of whatever ran
        there, maybe ``flush`` holding the lock: waiting for it there waited forever (a
        fork-mode request child hung so). So the lines so far go to the old file only when
        the lock is free; else the flush under way writes them, to the new file. And the new
        file takes the place of the old one on the same fd (``dup2``): a flush interrupted
        between reading ``self.fd`` and its write never writes to a closed fd, nor to
        another file that got its number."""
        if self.fd == 2:
            return False
        if self.lock.acquire(blocking=False):
            try:
                lines = self._take()
            finally:
                self.lock.release()
            self._write(lines)
        fd = self._open()
        try:
            os.dup2(fd, self.fd, inheritable=False)
        finally:
            os.close(fd)
        return True

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        give_to(fd, self.owner)
        return fd

    def close(self) -> None:
        self.flush()
        if self.fd != 2:
            os.close(self.fd)


class Access:
    """This process's access log, if there is one (a worker's, opened by the master)."""

    log: AccessLog | None = None


ACCESS = Access()


def compile_format(fmt: str):  # noqa: ANN201
    """``fmt`` (``str.format`` fields named in ``ACCESS_FIELDS``) as a function of the fields,
    in that order: an f-string compiled once, several times faster per line than
    ``format_map``.

    The source is built from the parsed format, never from the text as it is: literals are
    ``repr``-quoted, field names (the function's parameters) checked against
    ``ACCESS_FIELDS``, conversions and specs checked to hold no brace nor quote, so nothing of
    the format can become code."""
    import re
    import string

    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if (
            name not in ACCESS_FIELDS
            or (conversion or "") not in ("", "r", "s", "a")
            or any(c in (spec or "") for c in "{}'\"\\\n")
        ):
            raise ValueError(f"bad field {{{name}}}")
        if any(len(digits) > 4 for digits in re.findall(r"[0-9]+", spec or "")):
            raise ValueError(f"field {{{name}}}: width and precision go up to 9999")
        field = "{" + name + (f"!{conversion}" if conversion else "")
        parts.append(field + (f":{spec}" if spec else "") + "}")
    return eval(compile(f"lambda {', '.join(ACCESS_FIELDS)}: f{''.join(parts)!r}",
                        "<access-log-format>", "eval"), {"__builtins__": {}})  # noqa: S307  # fmt: skip


def format_error(fmt: str) -> str | None:
    """What is wrong with an access log format (an unknown field, a bad brace), or None."""
    try:  # names and specs checked first: '{pid:>9999999999}' must not be tried out
        compile_format(fmt)(*[0.0] * len(ACCESS_FIELDS))
        fmt.format_map(dict.fromkeys(ACCESS_FIELDS, 0.0))
    except (KeyError, ValueError, IndexError, SyntaxError, AttributeError, TypeError) as err:
        return f"{err} (fields: {', '.join(ACCESS_FIELDS)})"
    return None


def reopen_logs() -> tuple[list[str], list[str]]:
    """Reopen every log file of this process: the root logger's handlers that can (the
    master's ``cluster.logs.ReopenableFile``, inherited by workers), and the access log.
    Returns (the paths reopened, "PATH: why" for each one that could not be, which goes on
    writing to its old file): a signal handler calls this, so it never raises."""
    import logging

    reopened, failed = [], []
    files: list[tuple[str, object]] = [(getattr(handler, "path", "?"), handler.reopen)
                                       for handler in logging.getLogger().handlers
                                       if hasattr(handler, "reopen")]  # fmt: skip
    if ACCESS.log is not None:
        files.append((ACCESS.log.path, ACCESS.log.reopen))
    for path, reopen in files:
        try:
            if reopen() is not False:
                reopened.append(path)
        except OSError as err:
            failed.append(f"{path}: {err.strerror or err}")
    return reopened, failed

"""The pidfile: checked and written before binding, moved aside during an upgrade, removed
only if still ours.

At start a pidfile that names a live master of ours refuses the start (as gunicorn does); one
that names anything else (a dead pid, a pid reused by another program) is stale and is
replaced. A pidfile that cannot be written (no such directory, no permission) is a usage
error, reported before any listener is bound.

During an upgrade (USR2) the old master's pidfile is ``PIDFILE.oldbin`` while the new master
writes ``PIDFILE``, as nginx does; if the upgrade fails the old master moves it back.
"""

from __future__ import annotations

import logging
import os

from cluster.errors import ConfigError

log = logging.getLogger("cluster.master")

OLD_SUFFIX = ".oldbin"
MASTER_TITLE = b"cluster: master"


def read(path: str) -> int | None:
    """The pid a pidfile holds; None when there is none (missing, empty, not a number)."""
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_master(pid: int) -> bool:
    """Whether ``pid`` is a live cluster master (by its process title)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(MASTER_TITLE)
    except OSError:
        return False


def claim(path: str | None, pid: int, predecessor: int | None = None) -> None:
    """Write ``pid`` to ``path`` at start: ConfigError naming the file when another master of
    ours (not the one an upgrade replaces) holds it, or when it cannot be written."""
    if not path:
        return
    holder = read(path)
    if holder is not None and holder not in (pid, predecessor) and is_master(holder):
        raise ConfigError(f"pidfile {path} names a running master, pid {holder}; stop it first")
    try:
        write(path, pid)
    except OSError as err:
        raise ConfigError(f"cannot write pidfile {path}: {err.strerror}") from None


def write(path: str | None, pid: int) -> None:
    if path:
        tmp = f"{path}.{pid}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{pid}\n")
        os.replace(tmp, path)  # readers never see a half-written pidfile


def move_aside(path: str | None, to_old: bool) -> None:
    """PIDFILE -> PIDFILE.oldbin when an upgrade starts (``to_old``), and back if it fails."""
    if not path:
        return
    source, target = (path, path + OLD_SUFFIX) if to_old else (path + OLD_SUFFIX, path)
    try:
        os.replace(source, target)
    except OSError as err:
        log.warning("cannot rename %s to %s: %s", source, target, err.strerror)


def remove(path: str | None, pid: int) -> None:
    """Remove the pidfile only if it still holds ``pid``: another master may own it now."""
    if path and read(path) == pid:
        try:
            os.unlink(path)
        except OSError:
            pass

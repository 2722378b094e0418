"""The pidfile: written atomically, moved aside during an upgrade, removed only if still ours.

During an upgrade (USR2) the old master's pidfile is ``PIDFILE.oldbin`` while the new master
writes ``PIDFILE``, as nginx does; if the upgrade fails the old master moves it back.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("cluster.master")

OLD_SUFFIX = ".oldbin"


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
    if not path:
        return
    try:
        with open(path) as fh:
            if fh.read().strip() != str(pid):
                return
        os.unlink(path)
    except OSError:
        pass

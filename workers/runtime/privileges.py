"""Dropping root in a worker: ``--user``/``--group``, after the master has bound everything.

The master stays root (it binds ports below 1024 and Unix sockets anywhere, writes the pidfile,
owns the control socket) and never runs app code; each worker switches to the configured
user right after its fork, before it imports the app, so app code never runs as root. Fork
mode's request children are forked from a worker and inherit its credentials.

The order is the one that works: supplementary groups first (``setgroups`` needs root), then
the group, then the user (after ``setuid`` nothing else may change). Each call sets the real,
effective and saved ids together (``setres*id``), so nothing can switch back. Then we check
that the drop stuck, as OpenSSH does: the ids read back, and ``setuid(0)`` must fail. A worker
that is still root exits with the boot-error code instead of serving.

Changing credentials clears the parent-death signal and makes the process non-dumpable: the
drop runs before the worker sets its parent-death signal, and it stays non-dumpable on purpose
(another process of the same user may not ptrace it and take its root-opened fds).

Also here, for the master: ``give_to``, which hands a log file the master opened to the
worker user, so that workers can reopen it by its path on USR1 (as nginx and gunicorn do).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """Whom workers run as: numeric ids, and the names the user gave, for messages."""

    uid: int
    gid: int
    user: str  # as given (a name, or a number without a passwd entry)
    group: str


class PrivilegeError(Exception):
    """The drop failed or did not stick: the worker must not serve."""


def drop(identity: Identity) -> None:
    """Become ``identity`` for good; raise PrivilegeError if we cannot, or could go back.

    Not root (the master runs as that user already, which ``--user`` allows): the ids are
    set to the same values, and supplementary groups stay as the login gave them (only root
    may change them)."""
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.setgroups([])
        os.setresgid(identity.gid, identity.gid, identity.gid)
        os.setresuid(identity.uid, identity.uid, identity.uid)
    except OSError as err:
        raise PrivilegeError(f"cannot switch to {describe(identity)}: {err.strerror}") from None
    problem = drop_problem(os.getresuid(), os.getresgid(), os.getgroups() if as_root else [],
                           identity)  # fmt: skip
    if problem is None and identity.uid != 0 and _can_regain_root():
        problem = "setuid(0) still succeeds"
    if problem is not None:
        raise PrivilegeError(f"the switch to {describe(identity)} did not stick: {problem}")


def drop_problem(
    uids: tuple[int, int, int], gids: tuple[int, int, int], groups: list[int], identity: Identity
) -> str | None:
    """What is wrong with the credentials read back after a drop, or None: every one of the
    real, effective and saved uids and gids must be the target's, and no supplementary group
    may remain but the target's own group."""
    if set(uids) != {identity.uid}:
        return f"uids (real, effective, saved) are {uids}, not {identity.uid}"
    if set(gids) != {identity.gid}:
        return f"gids (real, effective, saved) are {gids}, not {identity.gid}"
    if set(groups) - {identity.gid}:
        return f"supplementary groups {sorted(groups)} remain"
    return None


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except OSError:
        return False
    return True


def describe(identity: Identity) -> str:
    return f"user {identity.user} (uid {identity.uid}), group {identity.group} (gid {identity.gid})"


def give_to(fd: int, uid: int | None) -> None:
    """Make the file open at ``fd`` reopenable by ``uid``: its owner, with read and write for
    the owner. Done by the master (root) on each log file it opens; the file's group and the
    other bits stay. Nothing to do without ``--user``, or when it is ``uid``'s already; a
    failure (a file on a filesystem without owners, /dev/null) leaves it as it is."""
    if uid is None:
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return
        if info.st_uid != uid:
            os.fchown(fd, uid, -1)
        if info.st_mode & 0o600 != 0o600:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) | 0o600)
    except OSError:
        pass

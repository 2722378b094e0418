"""Passing listening sockets to a new master: ``CLUSTER_FDS`` (our upgrade) and systemd's
``LISTEN_FDS``/``LISTEN_PID`` (socket activation).

The new master also inherits the write end of a pipe (``CLUSTER_UPGRADE_FD``) on which it
says ``ready PID`` once its workers serve: the old master's cue to stop. A TERM to the old
master is only ever an operator's.

On USR2 the master forks a child that execs the same command line with the listening fds
made inheritable and described in ``CLUSTER_FDS`` as JSON, ``[[fd, "bind text"], ...]``. The
new master adopts every inherited socket whose bind text it is configured with, binds only
what is new, and closes what it does not use. Matching by the bind text the user wrote (not
the resolved address) keeps ``127.0.0.1:0`` on the very port the old master got.

systemd passes fds 3, 4, ... in the order of its ``ListenStream=`` lines, named by
``LISTEN_FDNAMES`` (``FileDescriptorName=``): a bind with ``?name=N`` takes the fd named N, and
the binds without a name take the rest in order.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from cluster.errors import ConfigError

ENV_FDS = "CLUSTER_FDS"
ENV_PREDECESSOR = "CLUSTER_UPGRADE_FROM"  # pid of the master that started us (USR2)
ENV_READY_FD = "CLUSTER_UPGRADE_FD"  # where we say "ready" to it: the write end of a pipe
ENV_DRAINED = "CLUSTER_DRAINED"  # the operator's drain, carried across the upgrade: its start
SYSTEMD_FIRST_FD = 3

# Held (blocked) while a master boots, until its handlers are installed: left to their default
# action, TTIN and TTOU stop the process (a new master an operator scales by the pidfile hung
# until the old one killed it), HUP, USR1 and USR2 end it. A held one is handled once the loop
# can. The stops (TERM, INT, QUIT) keep their default: a master that serves nothing yet ends.
HELD_DURING_BOOT = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN,
                              signal.SIGTTOU})  # fmt: skip


def encode_fds(pairs: Sequence[tuple[int, str]]) -> str:
    return json.dumps([[fd, text] for fd, text in pairs])


def inherited_fds(
    env: Mapping[str, str], binds: Sequence[tuple[str, str | None]], pid: int
) -> dict[str, int]:
    """Which configured binds, given as (bind text, name), arrive as inherited fds:
    {bind text: fd}.

    Reads ``CLUSTER_FDS`` first, then systemd's variables (honoured only when ``LISTEN_PID``
    is ours, as systemd specifies). With ``LISTEN_FDNAMES`` a bind named ``?name=N`` takes
    the fd named N, wherever it comes; the binds without a name take the others in order. A
    malformed variable is a ConfigError naming it.
    """
    if ENV_FDS in env:
        try:
            pairs = json.loads(env[ENV_FDS])
            found = {str(text): int(fd) for fd, text in pairs}
        except (ValueError, TypeError) as err:
            raise ConfigError(f"bad {ENV_FDS} {env[ENV_FDS]!r}: {err}") from None
        return found
    if env.get("LISTEN_PID") == str(pid) and "LISTEN_FDS" in env:
        try:
            count = int(env["LISTEN_FDS"])
        except ValueError:
            raise ConfigError(f"bad LISTEN_FDS {env['LISTEN_FDS']!r}") from None
        return systemd_fds(count, env.get("LISTEN_FDNAMES", ""), binds)
    return {}


def systemd_fds(
    count: int, names_text: str, binds: Sequence[tuple[str, str | None]]
) -> dict[str, int]:
    """systemd's ``count`` fds (3, 4, ...) matched to ``binds``: by name, then in order."""
    fds = [SYSTEMD_FIRST_FD + n for n in range(count)]
    names = names_text.split(":") if names_text else []
    if len(names) != count:
        names = [""] * count  # no names, or not one per fd: by order only
    found: dict[str, int] = {}
    for text, name in binds:
        if name and name in names:
            found[text] = fds[names.index(name)]
    left = iter(fd for fd in fds if fd not in found.values())
    for text, name in binds:
        if text not in found and not name:
            fd = next(left, None)
            if fd is None:
                break
            found[text] = fd
    return found


def unused_fds(found: Mapping[str, int], binds: Sequence[tuple[str, str | None]]) -> list[int]:
    """Inherited fds that no configured bind takes: the new master closes them."""
    wanted = {text for text, _ in binds}
    return [fd for text, fd in found.items() if text not in wanted]


def successor_command() -> list[str]:
    """The command line that started us, as ``python -m cluster ...`` (works for both the
    console script and ``python -m``)."""
    return [sys.executable, "-m", "cluster", *sys.argv[1:]]


def exec_successor(pairs: Sequence[tuple[int, str]], predecessor: int, ready_fd: int,
                   drained_for: float | None = None) -> None:  # fmt: skip
    """In the forked child: hand the listening fds and the ready pipe over, and become the
    new master. ``drained_for``: the host is out of rotation (``ctl drain``) since that many
    seconds; the new master keeps it out, or an upgrade would put it back by surprise."""
    for fd in (*(fd for fd, _ in pairs), ready_fd):
        os.set_inheritable(fd, True)
    signal.pthread_sigmask(signal.SIG_SETMASK, HELD_DURING_BOOT)  # kept across the exec
    env = dict(os.environ)
    env[ENV_FDS] = encode_fds(pairs)
    env[ENV_PREDECESSOR] = str(predecessor)
    env[ENV_READY_FD] = str(ready_fd)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    env.pop(ENV_DRAINED, None)
    if drained_for is not None:
        env[ENV_DRAINED] = f"{drained_for:.3f}"
    command = successor_command()
    os.execve(command[0], command, env)

"""Commands: the one language in which anything asks the master to act.

A signal, a call of the library (``shutdown()``, ``scale(n)``, ``reload()``, ``status()``) and a
line on the control socket all become a ``Command``: a name and its arguments. The master has
one dispatch, ``Master.dispatch``, with one method per name, and answers each command with a
reply (a dict with ``ok``), which only the callers that can read one wait for.

The parsing and checking here are pure functions; the master does the work.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

# name -> what it does (the help of ``cluster ctl`` and of the control protocol)
COMMANDS: dict[str, str] = {
    "status": "the master, its listeners and every worker's scoreboard slot",
    "config": "the merged configuration in force",
    "scale": "set the pool's target size to N workers",
    "incr": "N more workers (default 1)",
    "decr": "N fewer workers (default 1)",
    "reload": "a new generation of workers with fresh config and code (as HUP)",
    "upgrade": "exec a new master that inherits the listeners (as USR2)",
    "stop": "graceful stop (as TERM)",
    "quit": "quick stop (as INT or QUIT)",
    "reopen-logs": "reopen log files (as USR1)",
    "drain": "take this host out of the balancer's rotation: --health says draining",
    "undrain": "put this host back in rotation: --health says ready again",
}
TAKES_COUNT = {"scale": None, "incr": 1, "decr": 1}  # the commands with an ``n``, and its default

SIGNAL_COMMANDS: dict[int, str] = {
    signal.SIGTERM: "stop",
    signal.SIGINT: "quit",
    signal.SIGQUIT: "quit",
    signal.SIGHUP: "reload",
    signal.SIGUSR2: "upgrade",
    signal.SIGTTIN: "incr",
    signal.SIGTTOU: "decr",
    signal.SIGUSR1: "reopen-logs",
}


class CommandError(ValueError):
    """A command that cannot be taken as given: unknown, or with bad arguments."""


class Refused(Exception):
    """The master understood the command but will not carry it out now; ``str()`` says why."""


@dataclass(frozen=True)
class Command:
    """What to do (``name``), with how many (``n``) for the scaling commands, and who asked
    (``origin``: ``SIGHUP``, ``library``, ``control``), for the log."""

    name: str
    n: int | None = None
    origin: str = ""

    def __str__(self) -> str:
        text = self.name if self.n is None else f"{self.name} {self.n}"
        return f"{text} (from {self.origin})" if self.origin else text


def make(name: str, n: object = None, origin: str = "") -> Command:
    """A checked command: a known name, and a whole ``n`` where the command takes one."""
    if name not in COMMANDS:
        raise CommandError(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    if name not in TAKES_COUNT:
        if n is not None:
            raise CommandError(f"{name} takes no count")
        return Command(name, None, origin)
    if n is None:
        n = TAKES_COUNT[name]
        if n is None:
            raise CommandError(f"{name} needs a count: {name} N")
    if isinstance(n, bool) or not isinstance(n, int):
        raise CommandError(f"{name} needs a whole number, got {n!r}")
    if name == "scale" and n < 1 or name != "scale" and n < 0:
        raise CommandError(f"{name} needs a count of at least {1 if name == 'scale' else 0}")
    return Command(name, n, origin)


def from_message(message: object, origin: str = "control") -> Command:
    """A command from a decoded JSON object: ``{"cmd": "scale", "n": 4}``."""
    if not isinstance(message, Mapping) or not isinstance(message.get("cmd"), str):
        raise CommandError('expected an object with a "cmd" string, like {"cmd": "status"}')
    extra = set(message) - {"cmd", "n"}
    if extra:
        raise CommandError(f"unknown field(s) {', '.join(sorted(extra))}")
    return make(message["cmd"], message.get("n"), origin)


def from_signal(signum: int) -> Command | None:
    """The command a signal stands for; None for those that only wake the loop (CHLD)."""
    name = SIGNAL_COMMANDS.get(signum)
    if name is None:
        return None
    return make(name, origin=signal.Signals(signum).name)


def target_after(command: Command, target: int, bound: int) -> int:
    """The pool size a scaling command asks for, or Refused naming the bound it crosses."""
    assert command.n is not None
    wanted = {"scale": command.n, "incr": target + command.n, "decr": target - command.n}[
        command.name
    ]
    if wanted < 1:
        raise Refused(f"the pool cannot shrink below 1 worker (now {target})")
    if wanted > bound:
        raise Refused(f"the pool cannot grow past --max-workers {bound} (now {target})")
    return wanted


@dataclass
class Reply:
    """Where the master puts its answer to one command, for a caller in another thread."""

    value: dict | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def answer(self, value: dict) -> None:
        self.value = value
        self.done.set()

    def wait(self, timeout: float | None = None) -> dict | None:
        """The answer, or None if none came within ``timeout``."""
        return self.value if self.done.wait(timeout) else None

"""The record of a worker mode: everything the rest of the project needs to know of one.

Config validation, the CLI's choices and help, the master (scoreboard sizing, who applies
``--timeout``) and the chaos script all read these records from ``workers.runtime.modes``;
nothing else names a mode. Adding a mode is one new module that defines its ``MODE`` and one
line in that registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from workers.runtime.context import Context
from workers.runtime.spec import Endpoint

Binding = tuple[Endpoint, type]  # a listener and the handler class that serves it
Serve = Callable[[list[Binding], Context], None]


class Sizes(Protocol):
    """What decides a mode's lanes: the master's Config and a WorkerSpec both carry these."""

    threads: int
    max_children: int


@dataclass(frozen=True)
class Mode:
    """One way a worker runs its requests.

    ``serve(bindings, context)`` builds its server objects, calls ``context.ready()`` once it
    can take requests, serves until the lifecycle says stop and, on a graceful stop, serves
    what the kernel had already queued before it returns. ``lanes`` is how many requests one
    worker runs at once (its scoreboard slot has that many lanes). A mode that
    ``kills_own_overdue`` requests applies ``--timeout`` itself (fork mode kills the child,
    not the worker), so the master leaves its workers' requests alone.
    """

    name: str
    summary: str  # one line for the CLI's help
    serve: Serve
    lanes: Callable[[Sizes], int]
    kills_own_overdue: bool = False

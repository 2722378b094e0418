"""Finding the request handler class an APP string names.

``APP`` is ``module:Class`` (any class with a ``handle`` method, so handlers written against
the stdlib's ``socketserver`` or ``http.server`` qualify) or the name of a built-in demo. The
master loads it once before forking, so that a bad app fails with exit code 3 before any worker
exists; without ``--preload`` each worker imports it again, fresh from disk, so that a reload
(HUP) picks up new code.
"""

from __future__ import annotations

import importlib
import os
import sys

from cluster.errors import AppError

BUILTIN_APPS = {
    "echo": "cluster.apps.echo:EchoHandler",
    "http-hello": "cluster.apps.http_hello:HelloHandler",
}


def resolve(app: str) -> str:
    """The ``module:Class`` an APP string stands for (built-in demo names are aliases)."""
    return BUILTIN_APPS.get(app, app)


def import_builtins(apps: list[str]) -> None:
    """Import the built-in demos among ``apps`` here, in the master, before any fork.

    They are modules of this package, like the worker runtime: they change with an upgrade
    of the package (USR2), never with a HUP (``load_handler`` never re-imports ``cluster.*``
    fresh). Imported once in the master, their pages are shared by every worker; imported in
    each worker after the fork, the import machinery and the module's new objects cost each
    one about 0.9 MiB of private memory (``scripts/memory.py``). A user's app is still
    imported in each worker, fresh from disk, unless ``--preload``.
    """
    for app in apps:
        if app in BUILTIN_APPS:
            load_handler(app)


def load_handler(app: str, fresh: bool = False) -> type:
    """Import APP and return its handler class; ``fresh`` re-reads the module from disk.

    Raises AppError with one line naming APP when the import fails for any reason (the user's
    module may raise anything while it is imported) or the object is not a handler class.
    """
    target = resolve(app)
    module_name, colon, attr_path = target.partition(":")
    if not colon or not module_name or not attr_path:
        raise AppError(
            f"bad app {app!r}: expected module:Class or one of {', '.join(BUILTIN_APPS)}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's own modules, as `python -m` would find them
    if fresh and module_name in sys.modules and not module_name.startswith("cluster."):
        del sys.modules[module_name]
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while it is imported
        raise AppError(f"cannot import app {app!r}: {type(err).__name__}: {err}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"cannot load app {app!r}: {module_name} has no {attr_path!r}") from None
    if not isinstance(obj, type) or not callable(getattr(obj, "handle", None)):
        raise AppError(
            f"app {app!r} is not a request handler class (a class with a handle() method)"
        )
    return obj

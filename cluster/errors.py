"""Errors that end the master, each carrying the exit code the CLI contract promises.

The command line turns any of these into one line on stderr and ``sys.exit(exit_code)``:
no traceback, because the message already names the bad value.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_APP = 3
EXIT_BIND = 4


class ClusterError(Exception):
    """A failure the user can act on; ``str(err)`` is the one line we print."""

    exit_code = EXIT_RUNTIME


class ConfigError(ClusterError):
    """A bad flag, config file value or bind URI."""

    exit_code = EXIT_USAGE


class AppError(ClusterError):
    """The app could not be imported, is not a handler class, or workers could not boot."""

    exit_code = EXIT_APP


class BindError(ClusterError):
    """A listener could not be bound (address in use, path not a socket, permissions)."""

    exit_code = EXIT_BIND


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized without ``shutil``: argparse imports it for the terminal's
    width on every ``add_argument``, and it brings zlib, bz2 and lzma into the master, and so
    into every worker's copy of it."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:  # fmt: skip
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; our commands print just the error, naming the bad
    value, and exit 2. Shared by ``cluster run``, ``cluster ctl``, ``cluster loadtest`` and
    ``chaos.py``. The message starts with the program's name alone (``cluster: error:``,
    also from a subcommand's parser)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog.split()[0]}: error: {message}\n")

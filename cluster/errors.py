"""Errors that end the master, each carrying the exit code the CLI contract promises.

The command line turns any of these into one line on stderr and ``sys.exit(exit_code)``:
no traceback, because the message already names the bad value.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

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


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; our commands print just the error, naming the bad
    value, and exit 2. Shared by ``cluster run``, ``cluster ctl``, ``cluster loadtest`` and
    ``chaos.py``. The message starts with the program's name alone (``cluster: error:``,
    also from a subcommand's parser)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog.split()[0]}: error: {message}\n")

"""Handlers for the privilege tests: this module refuses to be imported as root, so serving
it at all shows that neither the app check nor a worker imported it before the drop.

It imports nothing the master has not imported already: under --user nobody a module is read
as nobody, and on a machine whose interpreter lives in a private directory (pyenv under
/root) nobody can read no new stdlib module.
"""

from __future__ import annotations

import os

from workers import StreamRequestHandler

if os.geteuid() == 0:
    raise ImportError("rootless imported as root")


class Gate(StreamRequestHandler):
    """Says ``started PID``, waits for the client's ``finish`` line, then says ``done PID``."""

    speaks_first = True  # it writes before it reads: no waiting room

    def handle(self) -> None:
        self.wfile.write(b"started %d\n" % os.getpid())
        if self.rfile.readline().strip() == b"finish":
            self.wfile.write(b"done %d\n" % os.getpid())


class Boom(StreamRequestHandler):
    """Raises on ``boom`` (the traceback goes to the log), echoes the line otherwise."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if line.strip() == b"boom":
            raise RuntimeError("boom requested by the client")
        self.wfile.write(line)

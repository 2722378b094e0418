"""A test app that reports what its worker inherited and what it imported itself.

The test puts a ``sitecustomize`` on the path whose at-fork hook records, in the first child
of the master (the worker), the modules loaded and the frozen object count at the fork
(``builtins.LEAN_AT_FORK``). Each request is answered with one JSON object: the modules the
worker imported after its fork, the master's module names, and the freeze count.
"""

import builtins
import gc
import json
import sys

from workers import BaseRequestHandler


class Report(BaseRequestHandler):
    def handle(self) -> None:
        # Read the request first: closing with it unread would reset the connection.
        while self.request.recv(4096):
            pass
        at_fork = getattr(builtins, "LEAN_AT_FORK", {"modules": [], "frozen": -1})
        inherited = set(at_fork["modules"])
        report = {
            "imported_after_fork": [name for name in sys.modules if name not in inherited],
            "master_modules": sorted(inherited),
            "frozen_at_fork": at_fork["frozen"],
            "frozen_now": gc.get_freeze_count(),
        }
        self.request.sendall(json.dumps(report).encode())

"""Imports in the master, fails when a worker imports it afresh (``--preload`` off)."""

from setproctitle import getproctitle

from workers import BaseRequestHandler

if getproctitle().startswith("cluster: worker"):
    raise RuntimeError("this app cannot boot in a worker")


class Handler(BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"never\n")

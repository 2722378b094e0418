"""systemd's notify protocol (``sd_notify``): one datagram per state change, standard library.

When systemd starts us with ``Type=notify`` it sets ``NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace). We send:

- ``READY=1`` and a ``STATUS=`` line once the first generation serves;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a reload starts, ``READY=1`` once it is done;
- ``STOPPING=1`` when a stop begins;
- ``MAINPID=`` (our pid) with ``READY=1`` when we are the new master of an upgrade, so that
  systemd follows the master that serves (the unit needs ``NotifyAccess=all``: we are the
  old main process's child);
- ``WATCHDOG=1`` every half of ``WATCHDOG_USEC`` while the loop runs, when it is set.

Without ``NOTIFY_SOCKET`` every call is a no-op. A send that fails is logged once and never
fails the master.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("cluster.master")


class Notifier:
    """A part of the master: it answers ``next_deadline()`` for the watchdog pings."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.interval = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0
        self.due = time.monotonic() + self.interval if self.interval else float("inf")
        self.failed = False
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> Notifier:
        address = env.get("NOTIFY_SOCKET") or None
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        if env.get("WATCHDOG_PID") not in (None, str(os.getpid())):
            usec = 0  # the watchdog is another process's to pet
        return cls(address, usec)

    def fds(self) -> list[int]:
        return [self.sock.fileno()] if self.sock is not None else []

    def send(self, **fields: object) -> None:
        """One datagram of ``KEY=value`` lines: ``send(READY=1, STATUS="2 workers")``."""
        if self.sock is None or self.address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self.sock.sendto(message, target)
        except OSError as err:
            if not self.failed:
                log.warning("cannot notify systemd at %s: %s", self.address, err.strerror)
                self.failed = True

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def next_deadline(self) -> float:
        return self.due

    def ping(self, now: float) -> None:
        """The watchdog's ping, when it is due."""
        if now >= self.due:
            self.send(WATCHDOG=1)
            self.due = now + self.interval

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

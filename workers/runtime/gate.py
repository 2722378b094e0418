"""Who may talk to a listener: the allow list (``--allow-from``, ``?allow=``) and the PROXY
protocol (``?proxy=v1|v2|any``, trusted sources ``--proxy-allow``).

A listener with either setting is served by a server class with ``GateMixIn`` among its
bases, which adds two socketserver steps and nothing else (a listener without them pays
nothing):

- ``verify_request``, in the process and thread that dispatches the connection: the peer's
  address, known at once, against ``--proxy-allow`` on a PROXY listener, or against the
  allow list on any other. Never blocks.
- ``finish_request``, where the handler is about to run (the worker in sync mode, the
  handler's thread, the fork-mode child): on a PROXY listener, reads the header, exactly
  its bytes and no more, within ``HEADER_TIMEOUT`` in all, then checks the original client
  against the allow list, and hands the handler that client as ``client_address``. Reading
  it there, not in ``verify_request``, keeps a slow proxy from holding a fork-mode worker's
  accept loop or a thread-mode worker's dispatch.

A connection turned away is closed before its handler runs, counted in the scoreboard by
reason (``REJECT_REASONS``: ``cluster_rejected_total``), and logged at most once per
``LOG_EVERY`` seconds per worker.

What the rules mean:

- The allow list applies to the client the handler sees: the peer, or on a PROXY listener
  the original client the header names. A client without an IP address (a Unix socket's
  peer, a proxied Unix client) is not subject to it: the socket file's permissions decide.
- ``LOCAL`` (a proxy's own health checks), v1 ``UNKNOWN`` and unspecified v2 headers name no
  client: the handler sees the proxy's own address, and the allow list does not apply (the
  proxy is trusted already, by ``--proxy-allow``).
- On a datagram PROXY listener every datagram starts with a v2 header; the handler sees the
  original source, and its replies to that source go back to the proxy that relayed it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from workers.runtime.access import ROLE
from workers.runtime.client import ClientSocket
from workers.runtime.context import CURRENT
from workers.runtime.proxyproto import LOCAL, ProxyHeader, ProxyHeaderError, parse
from workers.runtime.ratelog import REJECTED, RateLimitedLog
from workers.runtime.scoreboard import REJECT_REASONS, WorkerSlot

log = logging.getLogger("cluster.worker")

# Seconds for a whole PROXY header (the spec's "at least 3 s"), from the moment a handler
# step takes the connection: with the waiting room, once its first byte came (a silent one
# waits there, holding no handler, up to --request-timeout).
HEADER_TIMEOUT = 3.0
LOG_EVERY = 10.0  # seconds between two rejection log lines of one worker
REJECTIONS = RateLimitedLog(log, REJECTED, period=LOG_EVERY, burst=1)  # the worker's budget
FIRST_PEEK = 232  # bytes: a v2 header with Unix addresses, more than any v1 line
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALLOW, UNTRUSTED, BAD_HEADER, TIMEOUT = (
    REJECT_REASONS.index(name) for name in ("allow", "untrusted", "proxy", "timeout")
)


class Rejected(Exception):
    """A connection to turn away: ``reason`` indexes ``REJECT_REASONS``."""

    def __init__(self, reason: int, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def contains(networks: Sequence[Network], host: object) -> bool:
    """Whether the IP address ``host`` is in one of ``networks`` (an IPv4-mapped IPv6
    address also as its IPv4 self, as a dual-stack socket shows IPv4 peers)."""
    try:
        ip = ipaddress.ip_address(host)  # type: ignore[arg-type]
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return any(ip in net or (mapped is not None and mapped in net) for net in networks)


class Gate:
    """One listener's rules, and the counting and logging of what they turn away."""

    def __init__(self, uri: str, proxy: str, allow: Sequence[Network],
                 proxy_allow: Sequence[Network], slot: WorkerSlot, listener: int) -> None:  # fmt: skip
        self.uri = uri
        self.proxy = proxy  # "" (none), v1, v2 or any
        self.allow = tuple(allow)  # empty: everyone
        self.proxy_allow = tuple(proxy_allow)
        self.slot = slot
        self.listener = listener
        self.allowed = lru_cache(maxsize=1024)(lambda host: contains(self.allow, host))
        self.trusted = lru_cache(maxsize=256)(lambda host: contains(self.proxy_allow, host))

    def check_peer(self, peer: object) -> None:
        """The peer's own address, known at accept: a trusted proxy on a PROXY listener,
        an allowed client on any other. (Unix peers have no address to check.)"""
        if type(peer) is not tuple:
            return
        if self.proxy:
            if not self.trusted(peer[0]):
                raise Rejected(UNTRUSTED, "a PROXY listener takes connections only from "
                               "--proxy-allow sources")  # fmt: skip
        elif self.allow and not self.allowed(peer[0]):
            raise Rejected(ALLOW, "not in the allowed sources (--allow-from, ?allow=)")

    def check_client(self, client: object) -> None:
        """The original client a PROXY header named, against the allow list."""
        if self.allow and type(client) is tuple and not self.allowed(client[0]):
            raise Rejected(ALLOW, "not in the allowed sources (--allow-from, ?allow=)")

    def unwrap(self, request: Any, peer: object) -> tuple[Any, object]:
        """The request and the client the handler gets, once the PROXY header is read."""
        if isinstance(request, tuple):  # a datagram: (data, the listener's socket)
            data, sock = request
            header = self._datagram_header(data)
            payload = data[header.length :]
            if not header.proxied:
                return (payload, sock), peer
            return (payload, ReplyThroughProxy(sock, peer, header.source)), header.source
        header = read_header(request, self.proxy, HEADER_TIMEOUT)
        if header.command != LOCAL and header.transport == "dgram":
            raise Rejected(BAD_HEADER, "PROXY header for a datagram on a stream listener")
        return request, header.source if header.proxied else peer

    def _datagram_header(self, data: bytes) -> ProxyHeader:
        try:
            header = parse(data, self.proxy)
        except ProxyHeaderError as err:
            raise Rejected(BAD_HEADER, f"bad PROXY header: {err}") from None
        if header is None:
            raise Rejected(BAD_HEADER, "datagram shorter than its PROXY header")
        if header.command != LOCAL and header.transport == "stream":
            raise Rejected(BAD_HEADER, "PROXY header for a stream on a datagram listener")
        return header

    def reject(self, rejected: Rejected, client: object) -> None:
        """Count it in our lane, and log it unless a line went out less than ``LOG_EVERY``
        ago (in this worker or any of its fork-mode children)."""
        self.slot.rejected(CURRENT.lane, self.listener, rejected.reason)
        REJECTIONS.warning("worker %d rejected %s on %s: %s (one such line per %gs per worker; "
                           "cluster_rejected_total counts them all)", ROLE.pid, _client(client),
                           self.uri, rejected, LOG_EVERY)  # fmt: skip


class GateMixIn:
    """The two steps of a listener with access rules (see the module docstring). Placed
    before the server class, after a mode's mixin: the fork-mode child runs ``finish_request``
    with its lane set, and a library user's own ``verify_request`` runs after ours."""

    gate: Gate

    def verify_request(self, request: Any, client_address: Any) -> bool:
        CURRENT.client = client_address  # the access log's, until a header says otherwise
        try:
            self.gate.check_peer(client_address)
        except Rejected as rejected:
            self.gate.reject(rejected, client_address)
            return False
        return super().verify_request(request, client_address)  # type: ignore[misc]

    def finish_request(self, request: Any, client_address: Any) -> None:
        gate = self.gate
        if gate.proxy:
            try:
                request, client = gate.unwrap(request, client_address)
                if client is not client_address:
                    gate.check_client(client)
            except Rejected as rejected:
                gate.reject(rejected, client_address)
                return  # the caller shuts the connection down: no handler runs
            if client is not client_address:
                CURRENT.client = client
                gate.slot.set_client(CURRENT.lane, client)  # what `ctl status` shows
            client_address = client
        super().finish_request(request, client_address)  # type: ignore[misc]


def read_header(sock: socket.socket, versions: str, timeout: float) -> ProxyHeader:
    """Read exactly the PROXY header from the start of ``sock``, within ``timeout`` in all.

    Each round peeks at what has arrived, parses it after what was read so far, and reads
    only the bytes that belong to the header: all of them while it is incomplete (so the next
    peek waits for new bytes instead of spinning), then exactly up to its end, so that the
    handler's first read starts with the client's own first byte. A proxy that drips its
    header one byte at a time still gets ``timeout`` in all, not per byte.

    The reads are marked in the request's lane as any of its reads are (waiting for the
    client's bytes is progress, not a hang), but not counted in the access log's bytes in:
    those are the client protocol's.
    """
    recv = ClientSocket.recv if isinstance(sock, ClientSocket) else socket.socket.recv
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    got = b""
    want = FIRST_PEEK
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            peeked = recv(sock, want, socket.MSG_PEEK)
            if not peeked:
                raise Rejected(BAD_HEADER, "closed before its PROXY header was complete"
                               if got else "closed without a PROXY header")  # fmt: skip
            try:
                header = parse(got + peeked, versions)
            except ProxyHeaderError as err:
                raise Rejected(BAD_HEADER, f"bad PROXY header: {err}") from None
            take = len(peeked) if header is None else header.length - len(got)
            got += recv(sock, take, socket.MSG_WAITALL)  # queued already: no wait
            if header is not None:
                return header
            if len(got) >= 16 and got[:1] == b"\r":  # v2: its length is known now
                want = max(1, int.from_bytes(got[14:16], "big") + 16 - len(got))
    except TimeoutError:
        raise Rejected(TIMEOUT, f"no complete PROXY header within {timeout:g}s") from None
    except OSError as err:
        raise Rejected(BAD_HEADER, f"reading its PROXY header: {err.strerror or err}") from None
    finally:
        try:
            sock.settimeout(previous)
        except OSError:
            pass


class ReplyThroughProxy:
    """The listener's datagram socket as a proxied datagram's handler sees it: a reply to
    the original client goes to the proxy that relayed the datagram (the client is not ours
    to reach, and may not even be routable from here); anything else is the socket's own."""

    __slots__ = ("_sock", "_proxy", "_client")

    def __init__(self, sock: socket.socket, proxy: object, client: object) -> None:
        self._sock = sock
        self._proxy = proxy
        self._client = client

    def sendto(self, data: bytes, *args: Any) -> int:
        """``sendto(data, address)`` or ``sendto(data, flags, address)``, as on a socket."""
        if args and args[-1] == self._client:
            args = (*args[:-1], self._proxy)
        return self._sock.sendto(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _client(address: object) -> str:
    if type(address) is tuple:
        return f"{address[0]}:{address[1]}"
    return str(address or "a unix peer")

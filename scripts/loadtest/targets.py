"""Targets: ``parse_target`` turns a target URI into a ``Target``; loopback checks refuse
remote hosts the user did not name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cluster.errors import ConfigError
from cluster.listeners import BindSpec, parse_bind
from loadtest.errors import UsageError

STREAM_KINDS = ("tcp", "unix", "http")
DATAGRAM_KINDS = ("udp", "unix-dgram")


@dataclass(frozen=True)
class Target:
    """Where to send load. ``host``/``port`` for inet kinds, ``path`` for unix kinds and the
    HTTP request path for ``http``."""

    uri: str
    kind: str  # tcp | udp | unix | unix-dgram | http
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def stream(self) -> bool:
        return self.kind in STREAM_KINDS

    @property
    def unix(self) -> bool:
        return self.kind in ("unix", "unix-dgram")

    @property
    def host_header(self) -> str:
        """``Host:`` value: IPv6 literals need their brackets back."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


TARGET_FORMS = (
    "tcp://HOST:PORT, HOST:PORT, [IPV6]:PORT, udp://HOST:PORT, unix:PATH, unix-dgram:PATH "
    "or http://HOST[:PORT][/PATH]"
)


def parse_target(uri: str) -> Target:
    """Parse a target: the cluster's bind grammar (``cluster.listeners.parse_bind``: ``tcp://H:P``
    or just ``H:P``, ``[V6]:P``, ``udp://H:P``, ``unix:PATH``, ``unix-dgram:PATH``), so URIs
    from its ``listening on`` lines can be pasted as they are, plus ``http://H[:P][/path]``.

    What binds but cannot be loaded is refused: port 0, ``fd://N`` and a ``=module:Class``
    handler suffix."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "http":
        return _parse_http(uri, rest)
    if sep and scheme == "fd":
        raise UsageError(f"bad target {uri!r}: fd://N is a listener to inherit, not a target")
    if sep and scheme not in ("tcp", "udp", "unix", "unix-dgram"):
        hint = " (TLS is not supported)" if scheme == "https" else ""
        raise UsageError(f"bad target {uri!r}: unknown scheme {scheme!r}{hint}; {TARGET_FORMS}")
    spec = _parse_bind(uri, uri)
    if spec.kind in ("unix", "unix-dgram"):
        return Target(uri, spec.kind, path=spec.path)
    return Target(uri, spec.kind, host=spec.host, port=spec.port)


def _parse_http(uri: str, rest: str) -> Target:
    """``http://`` + ``HOST[:PORT][/path]``: the authority in the bind grammar's ``HOST:PORT``
    (port 80 when there is none), the path sent as it is."""
    slash = rest.find("/")
    authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if any(c in path for c in " \r\n"):
        raise UsageError(f"bad target {uri!r}: spaces or line breaks in the path")
    if ":" not in authority or authority.endswith("]"):  # no port: HOST or [V6]
        authority += ":80"
    spec = _parse_bind(f"tcp://{authority}", uri)
    return Target(uri, "http", host=spec.host, port=spec.port, path=path)


def _parse_bind(text: str, uri: str) -> BindSpec:
    """``parse_bind(text)`` with the bind errors reworded for ``uri``, and the forms that bind
    but are no target refused."""
    if "?" in text:  # parse_bind would take it for a listener's options
        raise UsageError(f"bad target {uri!r}: ?options belong to a listener, not a target")
    if "=" in text:  # parse_bind would take it for a handler suffix
        handler = text.partition("=")[2]
        raise UsageError(
            f"bad target {uri!r}: ={handler} names a listener's handler; a target has none"
        )
    try:
        spec = parse_bind(text)
    except ConfigError as err:
        reason = str(err).removeprefix(f"bad bind {text!r}: ")
        raise UsageError(f"bad target {uri!r}: {reason}") from None
    if spec.kind in ("tcp", "udp"):
        if not spec.host:
            raise UsageError(f"bad target {uri!r}: no host")
        if spec.port == 0:
            raise UsageError(
                f"bad target {uri!r}: port 0 is for binding; give the port the server "
                "listens on (1..65535, as its `listening on` line shows)"
            )
    return spec


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) or the name ``localhost``; nothing that needs a
    resolver to tell, so a typo cannot turn a local test into load on someone else's host."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def check_allowed(target: Target, allow_remote: Iterable[str]) -> None:
    """Refuse a non-local target unless the user named exactly that host."""
    if target.unix or is_loopback_host(target.host):
        return
    if target.host.lower() in {h.lower().strip("[]") for h in allow_remote}:
        return
    raise UsageError(
        f"refusing to load {target.host!r}: not loopback; if you mean it, "
        f"name it with --allow-remote {target.host}"
    )

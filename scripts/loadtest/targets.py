"""Targets: ``parse_target`` turns a target URI into a ``Target``; loopback checks refuse
remote hosts the user did not name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

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


def _split_host_port(rest: str, uri: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); the port may default (http only)."""
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise UsageError(f"bad target {uri!r}: unbalanced [ ] around an IPv6 address")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
        if ":" in host:
            raise UsageError(f"bad target {uri!r}: write IPv6 addresses as [ADDR]:PORT")
    if not host:
        raise UsageError(f"bad target {uri!r}: no host")
    if not port_text:
        if default_port is None:
            raise UsageError(f"bad target {uri!r}: no port")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad target {uri!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"bad target {uri!r}: port {port} out of range 1..65535")
    return host, port


def parse_target(uri: str) -> Target:
    """Parse ``tcp://H:P`` (or just ``H:P``), ``udp://H:P``, ``unix:PATH``, ``unix-dgram:PATH``
    or ``http://H[:P][/path]`` (the bind syntax of the cluster, so URIs from its ``listening on``
    lines can be pasted as they are)."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise UsageError(
            f"bad target {uri!r}: expected tcp://HOST:PORT, udp://HOST:PORT, unix:PATH, "
            "unix-dgram:PATH or http://HOST:PORT/PATH"
        )
    if "://" not in uri and scheme not in ("unix", "unix-dgram", "tcp", "udp", "http"):
        host, port = _split_host_port(uri, uri)  # HOST:PORT or [V6]:PORT, as for bind: tcp
        return Target(uri, "tcp", host=host, port=port)
    if scheme in ("unix", "unix-dgram"):
        path = rest[2:] if rest.startswith("///") else rest
        if not path:
            raise UsageError(f"bad target {uri!r}: no socket path")
        return Target(uri, scheme, path=path)
    if scheme not in ("tcp", "udp", "http"):
        hint = " (TLS is not supported)" if scheme == "https" else ""
        raise UsageError(f"bad target {uri!r}: unknown scheme {scheme!r}{hint}")
    if not rest.startswith("//"):
        raise UsageError(f"bad target {uri!r}: expected {scheme}://HOST:PORT")
    rest = rest[2:]
    if scheme == "http":
        slash = rest.find("/")
        authority, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        if any(c in path for c in " \r\n"):
            raise UsageError(f"bad target {uri!r}: spaces or line breaks in the path")
        host, port = _split_host_port(authority, uri, default_port=80)
        return Target(uri, "http", host=host, port=port, path=path)
    host, port = _split_host_port(rest, uri)
    return Target(uri, scheme, host=host, port=port)


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

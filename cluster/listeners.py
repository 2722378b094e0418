"""Bind URIs: parsing them (pure) and binding them once, in the master.

Grammar (DESIGN section 2)::

    tcp://HOST:PORT   HOST:PORT   [IPV6]:PORT   tcp://[IPV6]:PORT
    udp://HOST:PORT   udp://[IPV6]:PORT
    unix:PATH         unix-dgram:PATH
    fd://N            (a socket inherited from whoever started us)
    ANY-OF-THE-ABOVE=module:Class     serve this listener with its own handler
    ANY-OF-THE-ABOVE=DEMO             ... or a built-in demo (echo, http-hello)
    ANY-OF-THE-ABOVE?name=N[=HANDLER] under systemd, adopt the socket named N (LISTEN_FDNAMES)
    unix:PATH?mode=0660&owner=U&group=G   the socket file's permission bits and owner
    ANY-OF-THE-ABOVE?proxy=v1|v2|any  take a PROXY protocol header on every connection
    ANY-OF-THE-ABOVE?allow=CIDR[,CIDR]  only these clients (repeatable; cluster/sources.py)

Every listening socket is put in non-blocking mode once, here. The flag lives on the shared open
file description, so all workers see the same mode: they try ``accept()`` first and only wait in
``epoll`` (with ``EPOLLEXCLUSIVE``) when nothing is queued, which avoids both the thundering herd
and a blocking ``accept()`` that a stop signal could not interrupt without losing a connection.

A Unix socket file is only ever removed when it is a socket, not through a symbolic link, and,
at exit, only when it is still the very file we bound (same device and inode): a stale socket
before the bind, ours at the end. With ``mode=`` the file is born 0600 (a narrow umask around
the bind) and gets its owner, then its mode, so it is never more open than asked, even for a
moment. Without it the process umask (``--umask``) decides, as for any file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass

from cluster import users
from cluster.app import BUILTIN_APPS
from cluster.errors import BindError, ConfigError
from cluster.sources import check_options

log = logging.getLogger("cluster.master")

STREAM_KINDS = frozenset({"tcp", "unix"})
DATAGRAM_KINDS = frozenset({"udp", "unix-dgram"})


@dataclass(frozen=True)
class BindSpec:
    """One parsed ``--bind`` value; ``handler`` is the optional ``=module:Class`` suffix."""

    kind: str  # "tcp" | "udp" | "unix" | "unix-dgram" | "fd"
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    handler: str | None = None
    text: str = ""
    options: tuple[tuple[str, str], ...] = ()  # ``?key=value&...``, known keys only

    @property
    def name(self) -> str | None:
        """``?name=N``: the systemd socket (``FileDescriptorName=N``) this bind may adopt."""
        return dict(self.options).get("name")

    @property
    def proxy(self) -> str | None:
        """``?proxy=v1|v2|any``: connections start with a PROXY header; None: they do not."""
        return dict(self.options).get("proxy")

    @property
    def allow(self) -> tuple[str, ...]:
        """``?allow=CIDR``, repeated or comma-separated: this listener's own allow list."""
        return tuple(value for key, value in self.options if key == "allow")

    @property
    def mode(self) -> int | None:
        """``?mode=0660``: the Unix socket file's permission bits (None: the umask decides)."""
        text = dict(self.options).get("mode")
        return None if text is None else users.parse_mode(text, f"bad bind {self.text!r}")

    def owner_ids(self) -> tuple[int, int]:
        """``?owner=U&group=G`` as (uid, gid), -1 for each one not given (chown's "keep");
        names resolve now, so an unknown one is a ConfigError naming it."""
        options = dict(self.options)
        what = f"bad bind {self.text!r}"
        uid = users.user_ids(options["owner"], f"{what}: owner")[0] if "owner" in options else -1
        gid = users.group_id(options["group"], f"{what}: group") if "group" in options else -1
        return uid, gid


BIND_OPTIONS = ("name", "mode", "owner", "group", "proxy", "allow")  # what may follow ``?``
UNIX_ONLY_OPTIONS = ("mode", "owner", "group")
COLON_VALUES = ("allow",)  # options whose values may hold a ':' (IPv6 networks)


def parse_bind(text: str) -> BindSpec:
    """Parse one bind URI; raise ConfigError naming ``text`` when it does not fit the grammar."""
    raw = text.strip()
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw):
        raise ConfigError(f"bad bind {text!r}: control characters (NUL, newline...) are not "
                          "allowed")  # fmt: skip
    address, question, query = raw.partition("?")
    if question:
        options, handler_text = _parse_options(query, text)
        if handler_text is not None:
            address += "=" + handler_text
    else:
        options = ()
    address, sep, handler = address.partition("=")
    if (
        sep
        and handler not in BUILTIN_APPS
        and (":" not in handler or handler.startswith(":") or handler.endswith(":"))
    ):
        raise ConfigError(
            f"bad bind {text!r}: handler must be module:Class or one of "
            f"{', '.join(BUILTIN_APPS)}, got {handler!r}"
        )
    handler_or_none = handler if sep else None

    def spec(**kw: object) -> BindSpec:
        made = BindSpec(handler=handler_or_none, text=raw, options=options, **kw)  # type: ignore[arg-type]
        if made.kind != "fd":  # an inherited socket's kind is known once adopted
            check_options(made.kind, made.proxy, made.allow, raw)
        return made

    if address.startswith("unix-dgram:"):
        return _checked(
            spec(kind="unix-dgram", path=_unix_path(address[len("unix-dgram:") :], text))
        )
    if address.startswith("unix:"):
        return _checked(spec(kind="unix", path=_unix_path(address[len("unix:") :], text)))
    if misplaced := [key for key, _ in options if key in UNIX_ONLY_OPTIONS]:
        raise ConfigError(f"bad bind {text!r}: {misplaced[0]}= is for unix: and unix-dgram: "
                          "socket files only")  # fmt: skip
    if address.startswith("fd://"):
        number = address[len("fd://") :]
        if not _is_number(number) or int(number) > MAX_FD:
            raise ConfigError(f"bad bind {text!r}: fd:// needs a file descriptor number")
        return spec(kind="fd", fd=int(number))
    kind = "tcp"
    for scheme in ("tcp", "udp"):
        if address.startswith(scheme + "://"):
            kind, address = scheme, address[len(scheme) + 3 :]
            break
    else:
        if "://" in address:
            raise ConfigError(
                f"bad bind {text!r}: unknown scheme (use tcp, udp, unix, unix-dgram, fd)"
            )
    host, port = _host_port(address, text)
    return spec(kind=kind, host=host, port=port)


def _parse_options(query: str, text: str) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """``name=web&...`` (and, after the last value, an optional ``=module:Class``)."""
    items = query.split("&")
    options = []
    handler = None
    for n, item in enumerate(items):
        key, equals, value = item.partition("=")
        if n == len(items) - 1 and "=" in value:
            value, _, handler = value.partition("=")
        if key not in BIND_OPTIONS:
            raise ConfigError(f"bad bind {text!r}: unknown option {key!r} "
                              f"(known: {', '.join(BIND_OPTIONS)})")  # fmt: skip
        if not equals or not value or (":" in value and key not in COLON_VALUES):
            raise ConfigError(f"bad bind {text!r}: option {key} needs a value without ':'")
        options.append((key, value))
    return tuple(options), handler


def _checked(spec: BindSpec) -> BindSpec:
    spec.mode  # noqa: B018  a bad mode fails as the bind is parsed
    return spec


def _unix_path(path: str, text: str) -> str:
    if path.startswith("//"):  # unix:///run/x.sock
        path = path[2:]
    if not path:
        raise ConfigError(f"bad bind {text!r}: empty socket path")
    return path


MAX_FD = 2**31 - 1  # a C int: what the kernel takes as a file descriptor
HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?")
SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an IPv6 zone: an interface name or number


def _is_number(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``'²'``, which ``int()`` refuses), and
    few enough of them for ``int()`` (it refuses over 4300): no port or fd needs more than 10."""
    return text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 10


def _host_port(address: str, text: str) -> tuple[str, int]:
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError(f"bad bind {text!r}: IPv6 needs the form [ADDR]:PORT")
        if not _is_ipv6(host):
            raise ConfigError(f"bad bind {text!r}: {host!r} is not an IPv6 address")
        port_text = rest[1:]
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon or ":" in host:
            raise ConfigError(f"bad bind {text!r}: expected HOST:PORT")
        if host and (len(host) > 253 or not HOSTNAME.fullmatch(host)):
            raise ConfigError(f"bad bind {text!r}: {host!r} is not a host name or IPv4 address "
                              "(ASCII letters, digits, '-', '.'; IPv6 goes in [brackets])")  # fmt: skip
    if not _is_number(port_text) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bad bind {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def _is_ipv6(host: str) -> bool:
    """``::1``, ``fe80::1%eth0``: checked here, so that the resolver never sees a bad one."""
    address, percent, scope = host.partition("%")
    if percent and not SCOPE.fullmatch(scope):
        return False
    try:
        socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return False
    return True


def format_uri(kind: str, address: object) -> str:
    """The URI of a bound socket's real address, in the same grammar ``parse_bind`` reads."""
    if kind in ("unix", "unix-dgram"):
        path = address.decode() if isinstance(address, bytes) else str(address)
        return f"{kind}:{path}"
    host, port = address[0], address[1]  # type: ignore[index]
    shown = f"[{host}]" if ":" in host else host
    return f"{kind}://{shown}:{port}"


FileId = tuple[int, int]  # (st_dev, st_ino): which file a path held when we looked


@dataclass
class Listener:
    """A socket the master bound (or inherited) and every worker accepts on."""

    spec: BindSpec
    sock: socket.socket
    kind: str  # resolved: "tcp" | "udp" | "unix" | "unix-dgram"
    owns_path: bool = False  # we created the Unix socket file, so we unlink it at exit
    owns_socket: bool = True  # False: the library API's caller closes it (server_close)
    server: object = None  # the library API's server object, handed to workers as is
    path_id: FileId | None = None  # the socket file we unlink at exit, and no other

    @property
    def is_stream(self) -> bool:
        return self.kind in STREAM_KINDS

    @property
    def uri(self) -> str:
        return format_uri(self.kind, self.sock.getsockname())

    def close(self, unlink: bool = True) -> None:
        """Close our copy; remove the socket file we created unless it was replaced since."""
        if not self.owns_socket:
            return
        path = self.sock.getsockname() if self.kind in ("unix", "unix-dgram") else None
        self.sock.close()
        if unlink and self.owns_path and path:
            path = path.decode() if isinstance(path, bytes) else path
            if not unlink_if_ours(path, self.path_id):
                log.warning("left %s in place: it is no longer the socket we bound", path)


def socket_file_id(path: str) -> FileId | None:
    """The (device, inode) of the socket file at ``path``, None if it is anything else (a
    symbolic link is not followed), gone, or no file at all (an abstract name, ``\\0...``)."""
    try:
        info = os.lstat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def unlink_if_ours(path: str, ours: FileId | None) -> bool:
    """Remove ``path`` if it is still the socket file ``ours``; True if it is gone now. A
    file someone put there since (another server's socket, a regular file, a symbolic link)
    stays."""
    found = socket_file_id(path)
    if found is None and not os.path.lexists(path):
        return True  # removed already (a cleanup by hand, or a tmpdir's)
    if found is None or found != ours:
        return False
    try:
        os.unlink(path)  # unlink never follows a symbolic link: it removes the name itself
    except FileNotFoundError:
        pass
    return True


def bind(spec: BindSpec, backlog: int = 2048, reuse_port: bool = False) -> Listener:
    """Bind and listen per ``spec``; raise BindError naming the URI when the kernel refuses."""
    try:
        if spec.kind == "fd":
            return _adopt_fd(spec)
        if spec.kind in ("unix", "unix-dgram"):
            return _bind_unix(spec, backlog)
        return _bind_inet(spec, backlog, reuse_port)
    except BindError:
        raise
    except OSError as err:
        raise BindError(f"cannot bind {spec.text}: {err.strerror or err}") from None


def _bind_inet(spec: BindSpec, backlog: int, reuse_port: bool) -> Listener:
    sock_type = socket.SOCK_STREAM if spec.kind == "tcp" else socket.SOCK_DGRAM
    # An ASCII host goes as bytes: a str is encoded with the "idna" codec, whose import
    # (stringprep, unicodedata) would grow the master and so every worker.
    host = spec.host.encode("ascii") if spec.host.isascii() else spec.host
    try:
        infos = socket.getaddrinfo(
            host or None, spec.port, socket.AF_UNSPEC, sock_type, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise BindError(
            f"cannot bind {spec.text}: cannot resolve {spec.host!r}: {err.strerror}"
        ) from None
    family, _, proto, _, sockaddr = infos[0]
    options = []
    if spec.kind == "tcp":
        options.append((socket.SOL_SOCKET, socket.SO_REUSEADDR))
    if reuse_port:
        options.append((socket.SOL_SOCKET, socket.SO_REUSEPORT))
    if family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    sock = _open(family, sock_type, proto, sockaddr, backlog, options)
    return Listener(spec=spec, sock=sock, kind=spec.kind)


def _bind_unix(spec: BindSpec, backlog: int) -> Listener:
    """Bind a socket file: born 0600 when ``mode=`` is given (the umask narrowed around the
    bind), then given its owner and group, then its mode."""
    sock_type = socket.SOCK_STREAM if spec.kind == "unix" else socket.SOCK_DGRAM
    mode, (uid, gid) = spec.mode, spec.owner_ids()
    _clear_stale_unix_socket(spec, sock_type)
    old_umask = os.umask(0o177) if mode is not None else None
    try:
        sock = _open(socket.AF_UNIX, sock_type, 0, spec.path, backlog, [])
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    try:
        path_id = _set_socket_file(spec, mode, uid, gid)
    except BaseException:
        sock.close()
        raise
    return Listener(spec=spec, sock=sock, kind=spec.kind, owns_path=True, path_id=path_id)


def _set_socket_file(spec: BindSpec, mode: int | None, uid: int, gid: int) -> FileId:
    """Owner and mode of the socket file we just bound, set through an ``O_PATH`` descriptor
    of it (``/proc/self/fd/N`` reaches the file itself): were the path swapped for a symbolic
    link meanwhile, the open would not follow it, the check would refuse it, and nothing else
    would be changed. Returns the file's identity, for the unlink at exit."""
    fd = os.open(spec.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode):
            raise BindError(f"cannot bind {spec.text}: {spec.path} was replaced as we bound it")
        path_id = (info.st_dev, info.st_ino)
        steps = [("owner", os.chown, (uid, gid))] if (uid, gid) != (-1, -1) else []
        steps += [("mode", os.chmod, (mode,))] if mode is not None else []
        for what, change, args in steps:
            try:
                change(f"/proc/self/fd/{fd}", *args)
            except OSError as err:
                unlink_if_ours(spec.path, path_id)
                raise BindError(f"cannot bind {spec.text}: cannot set its {what}: "
                                f"{err.strerror}") from None  # fmt: skip
        return path_id
    finally:
        os.close(fd)


def _open(
    family: int, sock_type: int, proto: int, address: object, backlog: int,
    options: list[tuple[int, int]],
) -> socket.socket:  # fmt: skip
    """Create, set ``options`` to 1, bind, listen (stream sockets) and make non-blocking; a
    socket that fails half way is closed, never leaked."""
    sock = socket.socket(family, sock_type, proto)
    try:
        for level, option in options:
            sock.setsockopt(level, option, 1)
        sock.bind(address)
        if sock_type == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _clear_stale_unix_socket(spec: BindSpec, sock_type: int) -> None:
    """Remove a socket file nobody listens on; refuse a live one and never touch other files
    (a symbolic link is neither followed nor removed)."""
    try:
        mode = os.lstat(spec.path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise BindError(f"cannot bind {spec.text}: {spec.path} is a symbolic link; "
                        "not following it, not removing it")  # fmt: skip
    if not stat.S_ISSOCK(mode):
        raise BindError(f"cannot bind {spec.text}: {spec.path} exists and is not a socket")
    stale = socket_file_id(spec.path)
    probe = socket.socket(socket.AF_UNIX, sock_type)
    try:
        probe.connect(spec.path)
    except ConnectionRefusedError:
        # Stale: left by a process that died without cleaning up. Removed only if it is
        # still the socket we probed, not whatever may have taken its place since.
        if not unlink_if_ours(spec.path, stale):
            raise BindError(f"cannot bind {spec.text}: {spec.path} changed while we "
                            "looked at it") from None  # fmt: skip
        return
    except OSError as err:
        if err.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return
        raise
    finally:
        probe.close()
    raise BindError(f"cannot bind {spec.text}: a live server is listening on {spec.path}")


def socket_kind(sock: socket.socket) -> str:
    """The listener kind of an already bound socket, from its family and type."""
    if sock.family == socket.AF_UNIX:
        return "unix" if sock.type == socket.SOCK_STREAM else "unix-dgram"
    return "tcp" if sock.type == socket.SOCK_STREAM else "udp"


def _adopt_fd(spec: BindSpec) -> Listener:
    return adopt(spec, spec.fd)


def adopt(spec: BindSpec, fd: int) -> Listener:
    """A listener from a socket someone bound for us (``fd://N``, an upgrade, systemd).

    A Unix socket file adopted from an old master becomes ours to unlink at exit: the file
    at its path now, if that is a socket.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise BindError(f"cannot adopt fd {fd} for {spec.text}: {err.strerror or err}") from None
    sock.setblocking(False)
    kind = socket_kind(sock)
    try:
        check_options(kind, spec.proxy, spec.allow, spec.text)
    except ConfigError:
        sock.close()
        raise
    owns_path = kind in ("unix", "unix-dgram") and spec.kind != "fd"
    path = sock.getsockname() if owns_path else None
    path = path.decode() if isinstance(path, bytes) else path
    return Listener(spec=spec, sock=sock, kind=kind, owns_path=owns_path,
                    path_id=socket_file_id(path) if path else None)  # fmt: skip


def diff_binds(current: list[str], wanted: list[str]) -> tuple[list[str], list[str]]:
    """For a reload: (bind texts to open, bind texts to close); the rest stay as they are."""
    return [t for t in wanted if t not in current], [t for t in current if t not in wanted]

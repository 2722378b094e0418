"""The control socket: ``--control PATH``, newline-delimited JSON, one command per line.

    -> {"cmd": "scale", "n": 4}
    <- {"ok": true, "target": 4}
    -> {"cmd": "nonsense"}
    <- {"ok": false, "error": "unknown command 'nonsense'; known: status, ..."}

Each line becomes a ``cluster.commands.Command`` and goes through the master's one dispatch,
the same as a signal or a library call. The socket is a ``LoopServer``: a client can never
block the master (malformed JSON, an unknown command, a line over 64 KiB, a silent client,
a hundred clients at once each get an error reply or are dropped).

Who may talk: the socket file is created with mode 0600 (the umask is narrowed around the
bind, so there is no moment when it is wider), and each connection's peer is checked with
``SO_PEERCRED``: only the master's own uid, or root. Anyone else gets an error reply, and a
log line.

An upgrade's new master takes the path over: it binds a socket of its own beside the path
and renames it into place, so clients reach the new master at once, and the old one leaves
the path alone when it exits (it only removes a file that is still its own).
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable

from cluster import commands
from cluster.commands import Command
from cluster.errors import BindError
from cluster.loopserver import Conn, LoopServer

log = logging.getLogger("cluster.master")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _PEERCRED.size))  # fmt: skip
    return uid


def may_control(uid: int, master_uid: int) -> bool:
    return uid in (master_uid, 0)


def reply(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode() + b"\n"


class ControlServer(LoopServer):
    name = "control socket"

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, path: str,
                 dispatch: Callable[[Command], dict]) -> None:  # fmt: skip
        super().__init__(sock, selector, f"unix:{path}")
        self.path = path
        self.inode = os.stat(path).st_ino  # ours; at exit the file is removed only if still ours
        self.dispatch = dispatch
        self.uid = os.getuid()

    def admit(self, sock: socket.socket) -> bytes | None:
        uid = peer_uid(sock)
        if may_control(uid, self.uid):
            return None
        log.warning("control socket: refused a client of uid %d (only uid %d or root may "
                    "control this master)", uid, self.uid)  # fmt: skip
        return reply({"ok": False, "error": f"permission denied: uid {uid} may not control "
                                            f"this master"})  # fmt: skip

    def split(self, conn: Conn) -> list[bytes]:
        *lines, rest = bytes(conn.inbuf).split(b"\n")
        conn.inbuf[:] = rest
        return [line for line in lines if line.strip()]

    def respond(self, conn: Conn, message: bytes) -> bytes:
        try:
            command = commands.from_message(json.loads(message), origin="control")
        except ValueError as err:  # bad JSON (JSONDecodeError is one), or a bad command
            text = f"bad JSON: {err}" if isinstance(err, json.JSONDecodeError) else str(err)
            return reply({"ok": False, "error": text})
        except RecursionError:  # json decodes nested arrays recursively: '[[[[...' (fuzz)
            return reply({"ok": False, "error": "bad JSON: nested too deeply"})
        return reply(self.dispatch(command))

    def refuse(self, conn: Conn, why: str) -> bytes:
        return reply({"ok": False, "error": why})

    def close(self) -> None:
        super().close()
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


def open_control(path: str, taking_over: bool) -> socket.socket:
    """Bind the control socket at ``path``, mode 0600 from the start. A live socket there is
    refused (another master), unless ``taking_over`` (an upgrade replaces its predecessor's);
    a stale one, or nothing, is replaced. BindError names the path on failure."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise BindError(f"cannot bind control socket {path}: {err.strerror}") from None
    if mode is not None and not stat.S_ISSOCK(mode):
        raise BindError(f"cannot bind control socket {path}: it exists and is not a socket")
    if mode is not None and not taking_over and _live(path):
        raise BindError(f"cannot bind control socket {path}: a live master listens there")
    beside = f"{path}.{os.getpid()}.tmp"
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as err:  # out of fds (EMFILE) or memory
        raise BindError(f"cannot bind control socket {path}: {err.strerror}") from None
    old_umask = os.umask(0o177)  # the file is born 0600
    try:
        if os.path.lexists(beside):
            os.unlink(beside)
        sock.bind(beside)
        os.replace(beside, path)  # atomic: a client finds the old master's or ours
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise BindError(f"cannot bind control socket {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def _live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()

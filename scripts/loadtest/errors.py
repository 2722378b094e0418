"""The tool's own exceptions, the kinds of request error it counts, and how a socket error
maps to one of those kinds.
"""

from __future__ import annotations

import errno

ERROR_KINDS = ("refused", "reset", "timeout", "wrong reply", "other")
MAX_EXAMPLES = 3  # distinct error messages kept per kind, to tell the user what went wrong
MAX_ERROR_TIMES = 10000  # errors whose time is kept, per client process (soak attributes them)


class UsageError(Exception):
    """A bad command line or config: the CLI prints it on one line and exits 2."""


class ClientCrash(RuntimeError):
    """A client process died or raised: a bug in the tool, not an error of the target."""


_REFUSED = {errno.ECONNREFUSED, errno.ENOENT}
_RESET = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN}


def classify_errno(code: int | None) -> str:
    """Map an errno to an error kind: what the user can act on, not the syscall's name."""
    if code in _REFUSED:
        return "refused"
    if code in _RESET:
        return "reset"
    if code == errno.ETIMEDOUT:
        return "timeout"
    return "other"


def describe(err: OSError) -> str:
    """``ECONNREFUSED: Connection refused``: short and stable enough to group examples by."""
    name = errno.errorcode.get(err.errno or 0, "error")
    return f"{name}: {err.strerror or err}"

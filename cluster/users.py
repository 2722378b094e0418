"""Users, groups and permission bits as the config names them: ``--user``, ``--group``,
``--umask``, and a Unix socket bind's ``mode=``, ``owner=`` and ``group=``.

Names resolve through ``pwd``/``grp`` (so NSS: /etc/passwd, LDAP...) when the config is
validated, before anything is bound: an unknown one is a ConfigError (exit 2) naming it. A
number is taken as an id; a ``--user`` number without a passwd entry needs ``--group``, as
there is no primary group to default to.
"""

from __future__ import annotations

import grp
import pwd

from cluster.errors import ConfigError
from workers.runtime.privileges import Identity

MAX_ID = 2**32 - 2  # uid_t and gid_t are 32 bits, and -1 (2**32 - 1) means "no change"


def _number(name: str, what: str) -> int | None:
    """An id given as a number (ASCII digits: ``str.isdigit`` also takes ``'²'``), checked to
    fit a uid_t; None for a name."""
    if not (name.isascii() and name.isdigit()):
        return None
    if len(name) > 10 or int(name) > MAX_ID:
        raise ConfigError(f"{what}: id {name[:20]} is over {MAX_ID}")
    return int(name)


def user_ids(text: str | int, what: str) -> tuple[int, int | None]:
    """(uid, primary gid or None) of a user name or number; ``what`` names the setting."""
    name = str(text).strip()
    number = _number(name, what)
    try:
        entry = pwd.getpwuid(number) if number is not None else pwd.getpwnam(name)
    except KeyError:
        if number is not None:
            return number, None
        raise ConfigError(f"{what}: no such user {name!r}") from None
    except ValueError:  # a NUL in the name
        raise ConfigError(f"{what}: no such user {name!r}") from None
    return entry.pw_uid, entry.pw_gid


def group_id(text: str | int, what: str) -> int:
    """The gid of a group name or number; ``what`` names the setting."""
    name = str(text).strip()
    number = _number(name, what)
    if number is not None:
        return number
    try:
        return grp.getgrnam(name).gr_gid
    except (KeyError, ValueError):  # unknown, or a NUL in the name
        raise ConfigError(f"{what}: no such group {name!r}") from None


def identity(user: str | int | None, group: str | int | None, user_what: str = "--user",
             group_what: str = "--group") -> Identity | None:  # fmt: skip
    """Whom the workers run as, or None to stay as the master is; ConfigError names a bad value.
    The group defaults to the user's primary group; a group alone is refused (a worker that
    is still root with another gid would drop nothing)."""
    for value, what in ((user, user_what), (group, group_what)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)
                                  or not str(value).strip()):  # fmt: skip
            raise ConfigError(f"{what} must be a name or a number, got {value!r}")
    if user is None:
        if group is not None:
            raise ConfigError(f"{group_what} {group} needs {user_what}: the workers' group "
                              "changes with their user")  # fmt: skip
        return None
    uid, primary = user_ids(user, user_what)
    if group is None and primary is None:
        raise ConfigError(f"{user_what} {user} has no passwd entry, so no primary group: "
                          f"give {group_what} too")  # fmt: skip
    gid = group_id(group, group_what) if group is not None else primary
    assert gid is not None
    group_name = str(group) if group is not None else _group_name(gid)
    return Identity(uid=uid, gid=gid, user=str(user).strip(), group=group_name.strip())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def switch_problem(target: Identity, euid: int, egid: int, user_what: str = "--user") -> str | None:
    """Why a master running as ``euid``/``egid`` cannot run its workers as ``target``, or None:
    root can switch to anyone; anyone else only "switches" to themselves (a unit file that
    keeps ``--user`` while systemd's ``User=`` already does the drop)."""
    if euid == 0 or (euid, egid) == (target.uid, target.gid):
        return None
    return (f"{user_what} {target.user}: switching the workers to uid {target.uid} gid "
            f"{target.gid} needs root (running as uid {euid} gid {egid})")  # fmt: skip


def parse_umask(value: str | int | None, what: str = "--umask") -> int | None:
    """``027``, ``0o027``, ``"0027"`` (octal text) or an int (TOML's ``0o027``), 0 to 0o777."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        bits = value
    elif isinstance(value, str):
        bits = _octal(value)
    else:
        bits = -1
    if bits is None or not 0 <= bits <= 0o777:
        raise ConfigError(f"{what} must be octal from 000 to 777 (like 027), got {value!r}")
    return bits


def parse_mode(text: str, what: str) -> int:
    """A socket file's permission bits, octal (``0660``, ``660``, ``0o660``); 0 to 0o777."""
    bits = _octal(text)
    if bits is None or not 0 <= bits <= 0o777:
        raise ConfigError(f"{what}: mode must be octal from 000 to 777 (like 0660), got {text!r}")
    return bits


def _octal(text: str) -> int | None:
    digits = text.strip().lower().removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits):
        return None
    return int(digits, 8)

"""Who may connect, as the master reads it: CIDR lists, and each listener's rules.

``--allow-from CIDR`` (repeatable) is the allow list of every listener that names none of
its own with ``?allow=``; ``--proxy-allow CIDR`` (repeatable) lists the sources trusted to
send a PROXY header, on the listeners that take one (``?proxy=v1|v2|any``). Both are
validated here, once, with ``ipaddress``: a bad value is a ConfigError naming it. The
worker applies the rules (``workers.runtime.gate``); this module only decides which apply
to which listener (``rules_for``), a pure function of the bind, its kind and the config.

- ``--proxy-allow`` defaults to loopback (127.0.0.0/8, ::1): a proxy on the same host
  works as it is; one elsewhere must be named. Trusting everyone is ``0.0.0.0/0`` and
  ``::/0``, said out loud.
- A Unix listener has no peer address: ``?allow=`` on one without ``?proxy=`` is refused
  (its socket file's mode decides who connects), and ``--allow-from`` does not apply to it.
  Behind ``?proxy=`` the original clients have addresses, and the allow list applies to them.
- A datagram listener's PROXY headers are v2 (v1 is a TCP line): ``?proxy=v1`` there is
  refused, and ``any`` takes v2.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from cluster.errors import ConfigError

PROXY_VERSIONS = ("v1", "v2", "any")  # workers.runtime.proxyproto.VERSIONS, for the master
DEFAULT_PROXY_ALLOW = ("127.0.0.0/8", "::1/128")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def split(values: Iterable[str]) -> list[str]:
    """Repeated values and comma-separated ones alike: ``["a,b", "c"]`` -> ``[a, b, c]``."""
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def network(text: str, where: str) -> Network:
    """One CIDR (or a bare address: one host) as a network; host bits are masked, as
    HAProxy and nginx read ``10.1.2.3/8``."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"bad {where} {text!r}: not an IP network "
                          "(CIDR like 10.0.0.0/8 or ::1/128, or an address)") from None  # fmt: skip


def networks(values: Iterable[str], where: str) -> tuple[Network, ...]:
    return tuple(network(text, where) for text in split(values))


def check_options(kind: str, proxy: str | None, allow: tuple[str, ...], text: str) -> None:
    """A bind's ``?proxy=`` and ``?allow=`` for a listener of ``kind``: ConfigError if they
    cannot apply (see the module docstring)."""
    if proxy is not None and proxy not in PROXY_VERSIONS:
        raise ConfigError(f"bad bind {text!r}: proxy must be v1, v2 or any, got {proxy!r}")
    for cidr in split(allow):
        network(cidr, f"allow in bind {text!r}:")
    if kind in ("udp", "unix-dgram") and proxy == "v1":
        raise ConfigError(f"bad bind {text!r}: PROXY v1 is for streams; datagrams take "
                          "proxy=v2")  # fmt: skip
    if kind in ("unix", "unix-dgram") and allow and proxy is None:
        raise ConfigError(f"bad bind {text!r}: a unix socket's peers have no address to "
                          "allow; its file mode decides who connects")  # fmt: skip


@dataclass(frozen=True)
class Rules:
    """What a worker applies to one listener."""

    proxy: str = ""  # "" (no PROXY header), v1, v2 or any
    allow: tuple[Network, ...] = ()  # empty: everyone
    proxy_allow: tuple[Network, ...] = ()


def rules_for(kind: str, proxy: str | None, allow: tuple[str, ...],
              allow_from: Iterable[str], proxy_allow: Iterable[str]) -> Rules:  # fmt: skip
    """A listener's rules: its own ``?allow=`` or else ``--allow-from``; ``--proxy-allow``
    if it takes PROXY headers from peers with an address."""
    unix = kind in ("unix", "unix-dgram")
    if proxy is None:
        if unix:
            return Rules()
        return Rules(allow=networks(allow or allow_from, "--allow-from"))
    return Rules(
        proxy=proxy,
        allow=networks(allow or allow_from, "--allow-from"),
        proxy_allow=() if unix else networks(proxy_allow, "--proxy-allow"),
    )

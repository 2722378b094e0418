"""prefork-cluster, master side: ``cluster run`` on the command line, or the library API.

    from cluster import PreforkTCPServer

The library classes load on first use, so that importing a submodule (``cluster.apps``, say)
stays as light as the module itself: every import here is paid again by each fork.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PreforkMixIn",
    "PreforkTCPServer",
    "PreforkUDPServer",
    "PreforkUnixStreamServer",
    "PreforkUnixDatagramServer",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cluster import library

        return getattr(library, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")

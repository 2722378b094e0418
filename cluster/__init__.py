"""prefork-cluster, master side: ``cluster run`` on the command line, or the library API.

from cluster import PreforkTCPServer
"""

from cluster.library import (
    PreforkMixIn,
    PreforkTCPServer,
    PreforkUDPServer,
    PreforkUnixDatagramServer,
    PreforkUnixStreamServer,
)

__all__ = [
    "PreforkMixIn",
    "PreforkTCPServer",
    "PreforkUDPServer",
    "PreforkUnixStreamServer",
    "PreforkUnixDatagramServer",
]

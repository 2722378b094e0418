"""Socket servers, with the classes, names and behaviour of Python 3.11's ``socketserver``.

Existing code keeps working with ``import workers as socketserver``; the cluster's worker
processes run these same classes, so a service written for the standard library is served by
the cluster unchanged.

A server is described along three independent axes, each of them owned by one kind of class:

- where requests come from: the address family (``AF_INET``/``AF_INET6``, ``AF_UNIX``) and
  the socket type (``SOCK_STREAM`` for connections, ``SOCK_DGRAM`` for datagrams), chosen by
  the server class;
- how requests run: inline (one at a time), in a thread, or in a child process, chosen by a
  mix-in;
- what a request does: the handler class, written by the user.

The server classes form a shallow tree; each level adds one thing::

    +------------+
    | BaseServer |   the request loop: serve_forever, handle_request, shutdown, and the
    +------------+   steps verify / process / finish / close a request, handle an error
          |
          v
    +-----------+        +------------------+
    | TCPServer |------->| UnixStreamServer |   the socket: create, bind, listen, accept
    +-----------+        +------------------+
          |
          v
    +-----------+        +--------------------+
    | UDPServer |------->| UnixDatagramServer |   get_request reads a datagram instead
    +-----------+        +--------------------+

``UnixDatagramServer`` derives from ``UDPServer``, not from ``UnixStreamServer``: what makes
a server "Unix" is only the ``address_family`` class attribute, repeated in both.

The mix-ins override exactly one step, ``process_request`` (and the cleanup that goes with
it): ``ThreadingMixIn`` starts a thread per request, ``ForkingMixIn`` forks a child per
request. A mix-in comes first among the bases so that its method wins::

    class ThreadingUDPServer(ThreadingMixIn, UDPServer): pass

Every combination is predefined (``ThreadingTCPServer``, ``ForkingUnixStreamServer``, ...).

To write a service, subclass ``BaseRequestHandler`` and define ``handle()``; one instance is
created per request with ``request``, ``client_address`` and ``server``. Stream and datagram
requests differ (a connected socket, or ``(data, socket)``); ``StreamRequestHandler`` and
``DatagramRequestHandler`` hide the difference behind the ``rfile`` and ``wfile`` file
objects.

Choosing how requests run still takes thought. A forked child cannot change the parent's
memory, so state kept in the server belongs in a threading server (with locks). A
synchronous server is deaf while a slow client reads its reply, so anything interactive
wants threads or processes. Errors in a handler never stop the server: ``handle_error()``
logs them on the ``"workers"`` logger and serving goes on.
"""

import os
import socket

from .handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from .mixins import ThreadingMixIn, ThreadingTCPServer, ThreadingUDPServer
from .servers import BaseServer, TCPServer, UDPServer

# The names of the standard library's socketserver.__all__, in the same conditions, plus (as
# Python 3.12 lists them) the ForkingUnix* servers that 3.11 defines but leaves out.
__all__ = [
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingUDPServer",
    "ThreadingTCPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
]

if hasattr(os, "fork"):
    from .mixins import ForkingMixIn, ForkingTCPServer, ForkingUDPServer

    __all__ += ["ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn"]

if hasattr(socket, "AF_UNIX"):
    from .mixins import ThreadingUnixDatagramServer, ThreadingUnixStreamServer
    from .servers import UnixDatagramServer, UnixStreamServer

    __all__ += [
        "UnixStreamServer",
        "UnixDatagramServer",
        "ThreadingUnixStreamServer",
        "ThreadingUnixDatagramServer",
    ]

    if hasattr(os, "fork"):
        from .mixins import ForkingUnixDatagramServer, ForkingUnixStreamServer

        __all__ += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]

"""The echo app in a worker that runs out of file descriptors, for a real EMFILE on accept().

Imported in a worker (``--preload`` off), it lowers its own fd limit so that the worker can
still boot (one fd to spare, for its epoll) but not accept; SIGWINCH, which workers otherwise
ignore, lifts the limit again.
"""

import os
import resource
import signal

from setproctitle import getproctitle

from cluster.apps.echo import EchoHandler as Handler  # noqa: F401

if getproctitle().startswith("cluster: worker"):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)  # the lowest free fd number
    os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1, hard))
    signal.signal(
        signal.SIGWINCH, lambda *_: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    )

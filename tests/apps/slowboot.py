"""The echo app, whose workers cannot finish booting while the file named by the environment
variable ``SLOWBOOT_HOLD`` exists: a new generation (or a new master's first one) held in its
boot for as long as a test wants. The master's own check of the app is not held by it; it is
by the file named by ``SLOWBOOT_CHECK_HOLD``: a master (a new one of an upgrade) held in its
start, before its signal handlers are installed."""

import os

from setproctitle import getproctitle

from cluster.apps.echo import EchoHandler as Handler  # noqa: F401
from tests.procs import wait_for

HOLD = os.environ.get("SLOWBOOT_HOLD", "")
CHECK_HOLD = os.environ.get("SLOWBOOT_CHECK_HOLD", "")
if HOLD and getproctitle().startswith("cluster: worker"):
    # Bounded: a forgotten file cannot hold a worker forever (it then fails to boot).
    wait_for(lambda: not os.path.exists(HOLD), 60, "the test to let the boot go on")
if CHECK_HOLD and not getproctitle().startswith("cluster: worker"):
    wait_for(lambda: not os.path.exists(CHECK_HOLD), 60, "the test to let the check go on")

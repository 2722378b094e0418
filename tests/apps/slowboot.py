"""The echo app, whose workers cannot finish booting while the file named by the environment
variable ``SLOWBOOT_HOLD`` exists: a new generation (or a new master's first one) held in its
boot for as long as a test wants. The master's own check of the app is not held."""

import os

from setproctitle import getproctitle

from cluster.apps.echo import EchoHandler as Handler  # noqa: F401
from tests.procs import wait_for

HOLD = os.environ.get("SLOWBOOT_HOLD", "")
if HOLD and getproctitle().startswith("cluster: worker"):
    # Bounded: a forgotten file cannot hold a worker forever (it then fails to boot).
    wait_for(lambda: not os.path.exists(HOLD), 60, "the test to let the boot go on")

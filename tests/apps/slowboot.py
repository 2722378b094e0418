"""The echo app, whose workers cannot finish booting while the file named by the environment
variable ``SLOWBOOT_HOLD`` exists: a new generation (or a new master's first one) held in its
boot for as long as a test wants. The master's own check of the app is not held."""

import os
import time

from setproctitle import getproctitle

from cluster.apps.echo import EchoHandler as Handler  # noqa: F401

HOLD = os.environ.get("SLOWBOOT_HOLD", "")
if HOLD and getproctitle().startswith("cluster: worker"):
    deadline = time.monotonic() + 60  # bounded: a forgotten file cannot hold a worker forever
    while os.path.exists(HOLD) and time.monotonic() < deadline:
        time.sleep(0.01)  # polls the file; the test removes it to let the boot go on

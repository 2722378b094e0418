"""``python -m cluster.loadtest ...``: the same as ``scripts/loadtest.py``."""

import sys

from cluster.loadtest.cli import main

sys.exit(main())

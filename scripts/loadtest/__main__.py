"""``python -m cluster.loadtest ...``: the same as ``scripts/loadtest.py``."""

import sys

from loadtest.cli import main

sys.exit(main())

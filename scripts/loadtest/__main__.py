"""``python -m loadtest ...``: the same as ``cluster loadtest ...``."""

import sys

from loadtest.cli import main

sys.exit(main())

"""``python -m cluster run ...``: the same as the ``cluster`` console script."""

import sys

from cluster.cli import main

sys.exit(main())

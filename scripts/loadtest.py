"""Load-test a running cluster (or any echo / HTTP server): see ``cluster/loadtest/``.

python scripts/loadtest.py tcp://127.0.0.1:8000 --duration 10 -c 8 -p 2 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without the package installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.loadtest import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""The idle master's CPU use: start a cluster, let it idle, read its CPU time from /proc.

    python scripts/idlecpu.py [--seconds 10] [--workers 2]

The master sleeps in one selector until a signal, a worker exit or message, or its next
timer (at most once a second), so idle it should use next to nothing: the target is 0.5%.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time

from cluster.procfs import own_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster", "run", "echo", "-w", str(args.workers), "-b", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if re.search(r"ready: \d+ workers?", line):
                break
        before, started = own_cpu(proc.pid), time.monotonic()
        time.sleep(args.seconds)  # the measurement window itself
        used = own_cpu(proc.pid) - before
        elapsed = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    share = 100 * used / elapsed
    print(f"idle master: {used:.3f} s CPU in {elapsed:.1f} s = {share:.3f}% (target <= 0.5%)")
    return 0 if share <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""How much one fork costs, depending on what the forking process has imported.

    python scripts/forkcost.py

Fork-mode throughput is bounded by the cost of ``fork()`` in the worker, and that cost grows
with the process's size, which is mostly its imports. Each line runs a fresh interpreter that
imports the named modules, then forks, ``_exit``s and reaps a child 300 times.
"""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "bare interpreter": "",
    "stdlib socketserver": "import socketserver",
    "cluster master + workers (ours)": "import cluster.master, workers.modes",
    "ours + multiprocess": "import cluster.master, workers.modes, multiprocess",
}

PROBE = """
import os, time
{imports}
n = 300
start = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
rss = open("/proc/self/status").read().split("VmRSS:")[1].split()[0]
print(f"{{(time.perf_counter() - start) / n * 1e6:.0f}} {{rss}}")
"""


def main() -> None:
    print(f"{'process':34} {'fork+exit+wait':>15} {'RSS':>9}")
    for label, imports in CASES.items():
        try:
            out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)],
                                 capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        except subprocess.CalledProcessError as err:
            print(f"{label:34} skipped: {err.stderr.strip().splitlines()[-1]}")
            continue
        print(f"{label:34} {out[0]:>12} us {out[1]:>6} kB")


if __name__ == "__main__":
    main()

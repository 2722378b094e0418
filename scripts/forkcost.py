"""How much one fork costs, depending on what the forking process has imported.

    python scripts/forkcost.py

Fork-mode throughput is bounded by the cost of ``fork()`` in the worker. Two things make it
grow: the process's size (page tables to copy and tear down), and the Python code that runs in
every child before it does anything, chiefly the ``os.register_at_fork`` hooks of the modules
loaded (``threading`` and ``logging`` have one). Every page that code writes is a
copy-on-write fault in the child. Each line runs a fresh interpreter that imports the named
modules, then forks, ``_exit``s and reaps a child 300 times, and reports the average cost and
the child's page faults per fork.
"""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "bare interpreter": "",
    "threading (its at-fork hook)": "import threading",
    "threading + logging (two hooks)": "import threading, logging",
    "stdlib socketserver": "import socketserver",
    "the http-hello handler's imports": "from cluster.app import load_handler; "
    "load_handler('http-hello')",
    "cluster master + workers (ours)": "import cluster.master",
    "ours + multiprocess": "import cluster.master, multiprocess",
}

PROBE = """
import os, resource, time
{imports}
n = 300
before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
start = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
elapsed = time.perf_counter() - start
faults = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before) / n
rss = open("/proc/self/status").read().split("VmRSS:")[1].split()[0]
print(f"{{elapsed / n * 1e6:.0f}} {{faults:.0f}} {{rss}}")
"""


def main() -> None:
    print(f"{'process':34} {'fork+exit+wait':>15} {'child faults':>13} {'RSS':>9}")
    for label, imports in CASES.items():
        try:
            out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)],
                                 capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        except subprocess.CalledProcessError as err:
            print(f"{label:34} skipped: {err.stderr.strip().splitlines()[-1]}")
            continue
        print(f"{label:34} {out[0]:>12} us {out[1]:>13} {out[2]:>6} kB")


if __name__ == "__main__":
    main()

"""How much one fork costs, depending on what the forking process has imported.

    python scripts/forkcost.py

Fork-mode throughput is bounded by the cost of ``fork()`` in the worker. Two things make it
grow: the process's size (page tables to copy and tear down), and the Python code that runs in
every child before it does anything, chiefly the ``os.register_at_fork`` hooks of the modules
loaded (``threading`` and ``logging`` have one). Every page that code writes is a
copy-on-write fault in the child. Each line runs a fresh interpreter that imports the named
modules, then forks, ``_exit``s and reaps a child 300 times, with ``os.fork()`` and with the
worker's ``quickfork`` (libc's fork, no at-fork hooks: ``workers.runtime.quickfork``),
and reports the average cost and the child's page faults per fork. A second table adds
resident memory to our process: the cost of a fork and an exit grows with it.
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
import os, resource, sys, time
{imports}
blob = bytearray({extra_mb} << 20)
for i in range(0, len(blob), 4096):
    blob[i] = 1  # resident: its page table entries are copied by every fork
n = 300


def measure(fork):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    start = time.perf_counter()
    for _ in range(n):
        pid = fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    faults = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before) / n
    return elapsed / n * 1e6, faults


plain, plain_faults = measure(os.fork)
from workers.runtime.quickfork import fork as quick_fork  # after: it imports threading, logging

quick, quick_faults = measure(quick_fork)
rss = open("/proc/self/status").read().split("VmRSS:")[1].split()[0]
print(f"{{plain:.0f}} {{plain_faults:.0f}} {{quick:.0f}} {{quick_faults:.0f}} {{rss}}")
"""


SIZES_MB = (0, 8, 32)  # resident memory added to "ours", for the second table


def probe(imports: str, extra_mb: int = 0) -> list[str] | str:
    """One fresh interpreter's figures, or the reason it could not run."""
    try:
        return subprocess.run(
            [sys.executable, "-c", PROBE.format(imports=imports, extra_mb=extra_mb)],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    except subprocess.CalledProcessError as err:
        return err.stderr.strip().splitlines()[-1]


def main() -> None:
    print(f"{'process':34} {'os.fork':>10} {'faults':>7} {'quickfork':>10} {'faults':>7} "
          f"{'RSS':>9}   (fork + exit + wait, child faults)")  # fmt: skip
    for label, imports in CASES.items():
        out = probe(imports)
        if isinstance(out, str):
            print(f"{label:34} skipped: {out}")
            continue
        print(f"{label:34} {out[0]:>7} us {out[1]:>7} {out[2]:>7} us {out[3]:>7} {out[4]:>6} kB")
    print(f"\n{'ours, with resident memory added':34} {'quickfork':>10} {'RSS':>9}")
    for extra in SIZES_MB:
        out = probe(CASES["cluster master + workers (ours)"], extra)
        if not isinstance(out, str):
            print(f"{f'+{extra} MiB':34} {out[2]:>7} us {out[4]:>6} kB")


if __name__ == "__main__":
    main()

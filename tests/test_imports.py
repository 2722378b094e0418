"""The server stands alone: importing it loads none of the load tester's packages.

Each check runs in a fresh interpreter (``sys.executable -c``), so nothing the test session
itself imported (pytest plugins, other tests' modules) can hide or fake an import.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

# The load tester and its extra's dependencies (and theirs: dill through multiprocess,
# numpy and pillow through matplotlib).
OPTIONAL = ("matplotlib", "numpy", "hdrh", "multiprocess", "dill", "loadtest", "PIL")
SERVER = ("cluster", "workers", "cluster.cli", "cluster.master")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_server_imports_none_of_the_load_testers_packages() -> None:
    done = run_python(f"""
        import sys
        for name in {SERVER!r}:
            __import__(name)
        print(" ".join(sorted(
            {{name.partition(".")[0] for name in sys.modules}} & set({OPTIONAL!r})
        )))
    """)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert not loaded, f"importing {', '.join(SERVER)} loaded {', '.join(loaded)}"

"""The server stands alone: importing it loads none of the load tester's packages, and
``cluster loadtest`` without the ``loadtest`` extra says how to get it, in one line.

Each check runs in a fresh interpreter (``sys.executable -c``), so nothing the test session
itself imported (pytest plugins, other tests' modules) can hide or fake an import.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT

# The load tester and its extra's dependencies (and theirs: dill through multiprocess,
# numpy and pillow through matplotlib).
# Also rich and prometheus_client: the server's own, but imported only by `cluster ctl` and
# by --metrics, for every module the master imports is paid again by each fork.
OPTIONAL = ("matplotlib", "numpy", "hdrh", "multiprocess", "dill", "loadtest", "PIL", "rich",
            "prometheus_client")  # fmt: skip
SERVER = ("cluster", "workers", "cluster.cli", "cluster.master")

EXTRA_HINT = (
    "cluster: error: the load tester is an optional extra: pip install 'prefork-cluster[loadtest]'"
)


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


@pytest.mark.parametrize(
    ("missing", "options"),
    [("loadtest", []), ("hdrh", []), ("multiprocess", []), ("matplotlib", ["--plot", "p.png"])],
)
def test_cluster_loadtest_without_the_extra_says_how_to_install_it(
    missing: str, options: list[str]
) -> None:
    """``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed
    (and ``find_spec`` find nothing): the package itself, a dependency imported with it, and
    the ones imported only to run (multiprocess) or to plot (matplotlib), which are checked
    before the run starts."""
    argv = ["loadtest", "tcp://127.0.0.1:9", "-n", "1", *options]
    done = run_python(f"""
        import sys
        sys.modules[{missing!r}] = None
        from cluster.cli import main
        sys.exit(main({argv!r}))
    """)
    assert done.returncode == 2
    assert done.stderr == EXTRA_HINT + "\n"
    assert done.stdout == ""


def test_a_broken_import_inside_the_load_tester_is_not_mistaken_for_a_missing_extra() -> None:
    done = run_python("""
        import sys
        sys.modules["loadtest.report"] = None
        from cluster.cli import main
        sys.exit(main(["loadtest", "--help"]))
    """)
    assert done.returncode == 1
    assert "ModuleNotFoundError" in done.stderr and "loadtest.report" in done.stderr
    assert "optional extra" not in done.stderr

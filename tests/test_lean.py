"""Lean workers: what a worker shares with its master, and the parts that keep it so.

A worker's private memory is what it writes after the fork: the objects the collector
examines, the modules it imports, the objects those create. These tests check the promises
that keep it small (issue "lean and fast"): the master freezes its heap before each fork, it
imports every module of ours that a worker runs (the runtime, the built-in demos) and none it
does not need, and a user's app is still imported in the worker, not the master.
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

from cluster import heap
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import memory as memory_script  # noqa: E402  (a script, importable once scripts/ is on the path)

pytestmark = pytest.mark.timeout(60)

# Records, in the first process forked from the master (a worker), what it inherited.
SITECUSTOMIZE = textwrap.dedent("""
    import builtins, gc, os, sys

    def _record():
        if not hasattr(builtins, "LEAN_AT_FORK"):
            builtins.LEAN_AT_FORK = {"modules": list(sys.modules), "frozen": gc.get_freeze_count()}

    os.register_at_fork(after_in_child=_record)
""")

# Pulled in by `--version` (importlib.metadata), argparse's terminal width (shutil) or a str
# host given to getaddrinfo (the idna codec); `random` also reseeds every forked child.
NOT_IN_THE_MASTER = ("importlib.metadata", "email", "zipfile", "tempfile", "random", "shutil",
                     "lzma", "bz2", "encodings.idna", "unicodedata")  # fmt: skip


def ask(path: str) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"report\n")  # a silent client would wait in the waiting room
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def test_a_worker_imports_only_the_users_app_after_its_fork_and_inherits_a_frozen_heap(
    start_cluster, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    probe = str(tmp_path / "probe.sock")
    cluster = start_cluster("http-hello", "-w", "1", "-b", "127.0.0.1:0",
                            "-b", f"unix:{probe}=leanprobe:Report",
                            env={"PYTHONPATH": str(site)})  # fmt: skip
    report = ask(probe)
    # The runtime, its modes and the built-in demo came with the fork; the user's app did not.
    assert report["imported_after_fork"] == ["leanprobe"]
    master = set(report["master_modules"])
    assert {"workers.runtime.modes.thread", "workers.runtime.modes.fork",
            "cluster.apps.http_hello"} <= master  # fmt: skip
    assert not master & set(NOT_IN_THE_MASTER)
    # gc.freeze() ran in the master right before the fork: everything inherited is frozen.
    assert report["frozen_at_fork"] > 1000
    assert report["frozen_now"] > 1000  # and stays frozen in the worker (it never thaws)
    assert cluster.address("tcp")  # the demo's listener, beside the probe's


def test_thaw_collects_the_cycles_that_freeze_kept() -> None:
    class Node:
        pass

    collected: list[str] = []
    try:
        heap.freeze()
        node = Node()
        node.self = node  # a cycle: only the collector can free it
        weakref.finalize(node, collected.append, "freed")
        heap.freeze()  # a later fork: the cycle is alive, so it is frozen too
        del node
        gc.collect()
        assert collected == []  # frozen: no collection looks at it
        heap.thaw()
        assert collected == ["freed"]
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_memory_section_replaced_in_place_or_appended(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Memory\n\nold table\n\n## Next\n\nkept\n")
    memory_script.write_section(doc, "## Memory\n\nnew table\n")
    assert doc.read_text() == "# Benchmarks\n\n## Memory\n\nnew table\n\n## Next\n\nkept\n"
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\ntext\n")
    memory_script.write_section(other, "## Memory\n\nnew table\n")
    assert other.read_text() == "# Benchmarks\n\ntext\n\n## Memory\n\nnew table\n"

"""Which pages of an idle worker are its own, and who made them so (root: reads kpagecount).

    sudo python scripts/private_pages.py [--workers 8] [--app http-hello] [--objects N]

A worker's private page (mapped by it alone, ``/proc/kpagecount`` = 1) was made private in one
of two ways: the worker wrote to it after its fork (copy on write: the worker got a new copy),
or the master wrote to it after that fork and before the next one (the master got the new
copy, and the old one is left to this worker alone). Telling them apart needs the master's
page frames at the moment of each fork: the cluster runs here with ``WorkerProcess.start``
wrapped to save ``/proc/self/pagemap`` right before ``os.fork()``. A worker's private page
whose frame is still the one the master had then was left to it by the master; another frame
is a copy the worker made (or a page first touched after the fork: "new").

``--objects N`` goes one level down, into Python's object pools: the words that differ between
the worker's copy and the original (read from whichever process still maps the original
frame) name the objects written, by type: mostly reference counts, which CPython 3.11 writes
for every object it merely uses. The wrapper itself runs a little Python in the master right
before each fork (the snapshot), so its "left by the master" figure is a bit above the truth.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
POOL = 4 * PAGE
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63

# Runs as the master: save the pagemap of every writable private mapping before each fork.
WRAPPER = r"""
import marshal, os, sys
import cluster.spawn as spawn
OUT = os.environ["PAGES_DIR"]
_start = spawn.WorkerProcess.start
def start(self):
    maps = {}
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split()
            if fields[1].startswith("rw") and fields[1][3] == "p":
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                maps[lo] = os.pread(fd, (hi - lo) // 4096 * 8, lo // 4096 * 8)
    os.close(fd)
    data = marshal.dumps(maps)
    _start(self)
    with open(os.path.join(OUT, str(self.pid)), "wb") as fh:
        fh.write(data)
spawn.WorkerProcess.start = start
from cluster.cli import main
sys.exit(main())
"""


def mappings(pid: int) -> list[tuple[int, int, str]]:
    """Writable private mappings of ``pid``: (start, end, name)."""
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if fields[1].startswith("rw") and fields[1][3] == "p":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            found.append((lo, hi, fields[5] if len(fields) > 5 else ""))
    return found


def kind(name: str) -> str:
    if name in ("[heap]", "[stack]"):
        return name
    if not name:
        return "anonymous"
    return "libpython" if "libpython" in name else "other files"


def frames(pid: int, lo: int, hi: int) -> list[int]:
    """The page frame of every page in [lo, hi) of ``pid``, 0 where none is present."""
    return [e & PFN_MASK if e & PRESENT else 0 for e in entries(pid, lo, hi)]


def entries(pid: int, lo: int, hi: int) -> tuple[int, ...]:
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(lo // PAGE * 8)
        raw = fh.read((hi - lo) // PAGE * 8)
    return struct.unpack(f"{len(raw) // 8}Q", raw)


def page_count(pfn: int, kpc) -> int:
    kpc.seek(pfn * 8)
    return struct.unpack("Q", kpc.read(8))[0]


def snapshot_frames(data: dict[int, bytes], va: int) -> int | None:
    for lo, raw in data.items():
        if lo <= va < lo + len(raw) // 8 * PAGE:
            e = struct.unpack_from("Q", raw, (va - lo) // PAGE * 8)[0]
            return e & PFN_MASK if e & PRESENT else 0
    return None


class Memory:
    """Read another process's memory, and name the Python type at an address."""

    def __init__(self, pid: int) -> None:
        self.fh = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115
        self.names: dict[int, str | None] = {}

    def read(self, va: int, size: int) -> bytes:
        if not 0 < va < 1 << 47:
            return b""
        try:
            self.fh.seek(va)
            return self.fh.read(size)
        except OSError:
            return b""

    def word(self, va: int) -> int:
        raw = self.read(va, 8)
        return struct.unpack("Q", raw)[0] if len(raw) == 8 else 0

    def type_name(self, ptr: int) -> str | None:
        """tp_name of the type at ``ptr``, if ``ptr`` looks like a type (its type's type is
        itself a type whose type is itself: PyType_Type, or a metaclass of it)."""
        if ptr in self.names:
            return self.names[ptr]
        name = None
        meta = self.word(ptr + 8)
        if meta and self.word(self.word(meta + 8) + 8) == self.word(meta + 8):
            raw = self.read(self.word(ptr + 24), 64).split(b"\0")[0]
            if re.fullmatch(rb"[A-Za-z_][\w.]{0,63}", raw):
                name = raw.decode()
        self.names[ptr] = name
        return name

    def object_at(self, page: bytes, va_page: int, offset: int) -> str:
        """The type of the pymalloc block of ``page`` holding ``offset`` and where in it.
        Pools are 16 KiB (CPython 3.10+ on 64 bits), aligned: the header is at the start of
        the first of their four pages."""
        base = va_page & ~(POOL - 1)
        header = page if base == va_page else self.read(base, 48)
        if len(header) < 48:
            return "(unreadable)"
        _ref, _free, _next, _prev, _arena, szidx, nextoff, maxnext = struct.unpack_from(
            "QQQQIIII", header
        )
        at = va_page - base + offset  # offset in the pool
        if szidx >= 32 or nextoff > POOL or maxnext > POOL:
            return "(not a pool)"
        if at < 48:
            return "(pool header)"
        size = (szidx + 1) * 16
        start = 48 + (at - 48) // size * size
        block = self.read(base + start, min(size, 32))
        for head in (0, 16):  # plain object, or one behind its 16-byte PyGC_Head
            if head + 16 <= len(block):
                name = self.type_name(struct.unpack_from("Q", block, head + 8)[0])
                if name:
                    where = "refcnt" if at - start == head else "body"
                    return f"{name} ({where})"
        return f"(block of {size})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--app", default="http-hello")
    parser.add_argument("--objects", type=int, default=0, metavar="N",
                        help="show the N most written object types")  # fmt: skip
    parser.add_argument("--worker", type=int, default=-1,
                        help="which worker in fork order (default: the middle one)")  # fmt: skip
    parser.add_argument("--hold", action="store_true", help="keep the cluster until Enter")
    parser.add_argument("extra", nargs="*", help="more `cluster run` flags, after --")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root: /proc/kpagecount")
    out = tempfile.mkdtemp(prefix="pages-")
    cmd = [sys.executable, "-c", WRAPPER, "run", args.app, "-k", "sync",
           "-w", str(args.workers), "-b", "127.0.0.1:0", *args.extra]  # fmt: skip
    env = dict(os.environ, PAGES_DIR=out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        return report(proc, out, args)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def wait_idle(pids: list[int]) -> None:
    last, deadline = None, time.monotonic() + 20
    while time.monotonic() < deadline:
        rollups = [Path(f"/proc/{p}/smaps_rollup").read_text() for p in pids]
        if rollups == last:
            return
        last = rollups
        time.sleep(1.0)


def report(proc: subprocess.Popen, out: str, args: argparse.Namespace) -> int:
    assert proc.stderr is not None
    for line in proc.stderr:
        if "ready:" in line:
            break
    order = sorted(Path(out).iterdir(), key=lambda p: p.stat().st_mtime)
    order = [p for p in order if Path(f"/proc/{p.name}").exists()]  # workers, not probes
    pids = [int(p.name) for p in order]
    wait_idle([proc.pid, *pids])
    import marshal

    snaps = {int(p.name): marshal.loads(p.read_bytes()) for p in order}
    current = {pid: {lo: frames(pid, lo, hi) for lo, hi, _ in mappings(pid)}
               for pid in [proc.pid, *pids]}  # fmt: skip
    holders: dict[int, int] = {}  # frame -> some process mapping it now
    for pid, maps in current.items():
        for fl in maps.values():
            for pfn in fl:
                holders.setdefault(pfn, pid)
    kpc = open("/proc/kpagecount", "rb")  # noqa: SIM115
    totals: dict[str, collections.Counter] = {}
    index = args.worker if args.worker >= 0 else len(pids) // 2
    detail: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    mems: dict[int, Memory] = {}
    for n, pid in enumerate(pids):
        counts = collections.Counter()
        between = collections.Counter()  # did the master write the page before the next fork
        for lo, _hi, name in mappings(pid):
            for i, pfn in enumerate(current[pid].get(lo, [])):
                if not pfn or page_count(pfn, kpc) != 1:
                    continue
                va = lo + i * PAGE
                before = snapshot_frames(snaps[pid], va)
                cause = ("new" if not before else
                         "left by the master" if before == pfn else "written by the worker")  # fmt: skip
                counts[(kind(name), cause)] += 1
                if n + 1 < len(pids) and before:  # did the master write it before the next fork?
                    after = snapshot_frames(snaps[pids[n + 1]], va)
                    between[after != before] += 1
                if n == index and args.objects and before and kind(name) == "anonymous":
                    mine = mems.setdefault(pid, Memory(pid)).read(va, PAGE)
                    if before == pfn:  # the master's newer copy, at the same address
                        theirs = mems.setdefault(proc.pid, Memory(proc.pid)).read(va, PAGE)
                    else:  # the original, wherever it is still mapped
                        holder = holders.get(before)
                        if holder is None:
                            detail[cause]["(original gone)"] += 1
                            continue
                        theirs = _read_frame(mems.setdefault(holder, Memory(holder)), current,
                                             holder, before)  # fmt: skip
                    if len(mine) < PAGE or len(theirs) < PAGE:
                        continue
                    for off in range(0, PAGE, 8):
                        if mine[off : off + 8] != theirs[off : off + 8]:
                            detail[cause][mems[pid].object_at(mine, va, off)] += 1
        totals[str(pid)] = counts
        if n + 1 < len(pids):
            print(
                f"worker {pid}: {between[True]} of its private pages were written by the "
                f"master before the next fork, {between[False]} were not"
            )
    kinds = sorted({k for c in totals.values() for k, _ in c})
    causes = ("written by the worker", "left by the master", "new")
    print(f"private pages per worker (fork order), {args.workers} workers; pages of 4 KiB")
    print("pid     total  " + "  ".join(f"{k[:10]:>10}:{c.split()[0][:6]:6}"
                                      for k in kinds for c in causes))  # fmt: skip
    for pid, counts in totals.items():
        cells = "  ".join(f"{counts[(k, c)]:17}" for k in kinds for c in causes)
        print(f"{pid:7} {sum(counts.values()):5}  {cells}")
    if args.objects:
        print(f"\nworker {pids[index]}: words changed against the original, by object")
        for cause, counter in detail.items():
            print(f"  {cause}: {sum(counter.values())} words")
            for what, count in counter.most_common(args.objects):
                print(f"    {count:6}  {what}")
    if args.hold:
        input(f"master {proc.pid}, workers {pids}; Enter to stop ")
    return 0


def _read_frame(mem: Memory, current: dict, pid: int, pfn: int) -> bytes:
    """The content of frame ``pfn``, read through a virtual address of ``pid`` that maps it."""
    for lo, fl in current[pid].items():
        if pfn in fl:
            return mem.read(lo + fl.index(pfn) * PAGE, PAGE)
    return b""


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures: a real cluster master on port 0, clients for each transport, and teardown
that ends every process a test started, by pid, whether the test passed or not."""

from __future__ import annotations

import compileall
import errno
import os
import py_compile
import random
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tests.procs import (
    alive,
    become_subreaper,
    children,
    descendants,
    kill_all,
    reap_if_ours,
    state,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
become_subreaper()
# The suite's own processes cache what they compile (PYTHONDONTWRITEBYTECODE may be set
# around us): pytest's assertion rewriting of the test modules costs each xdist worker 2.5 s
# of CPU at collection without its cache, 10 s on 2 cores before the first test runs. The
# clusters the tests start still write nothing (cluster_env).
sys.dont_write_bytecode = False

# Hypothesis: a short, repeatable run by default (``make test``: a few dozen examples per fuzz
# test, derandomized so that a CI run is the same every time), a long random one for ``make
# fuzz`` (HYPOTHESIS_PROFILE=fuzz). Tests marked ``fuzz`` take their example count from here.
hypothesis_settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
hypothesis_settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
APPS = ROOT / "tests" / "apps"


COMPILED = ("cluster", "workers", "scripts/loadtest", "tests/apps")  # what the masters import


@pytest.hookimpl(tryfirst=True)  # before xdist starts its workers
def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the project's own modules once, before any test (in the xdist controller, or
    the one process without it). The clusters run with PYTHONDONTWRITEBYTECODE, so that an app
    a test rewrites in its tmp dir never runs from a stale .pyc; but then nothing ever caches
    the project either, and each of the suite's hundreds of masters, ``cluster ctl`` and load
    tester runs compiled some 100 modules from source: 120 ms of CPU per master start, a third
    of the suite's CPU on 2 cores. Hash-checked .pyc files are read (not written) by them and
    cannot be stale: the import hashes the source and compiles it afresh if it changed."""
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller compiled before it started us
    for directory in COMPILED:
        compileall.compile_dir(ROOT / directory, quiet=1,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)  # fmt: skip


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # apps rewritten by tests must never run stale .pyc
    return env


class Cluster:
    """A ``python -m cluster run`` subprocess whose stderr is read continuously into ``lines``."""

    def __init__(
        self,
        args: list[str],
        cwd: Path | None = None,
        command: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = command or [sys.executable, "-m", "cluster", "run", *args]
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd or ROOT,
            env=cluster_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.seen_pids: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in list(self.lines):
                if match := regex.search(line):
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(
                    f"cluster exited {self.proc.returncode} before {pattern!r}:\n{self.log}"
                )
            return None

        try:
            return wait_for(found, timeout, f"log line {pattern!r}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n--- log ---\n{self.log}") from None

    def wait_ready(self, timeout: float = 20.0) -> Cluster:
        self.wait_log(r"ready: \d+ workers?", timeout)
        return self

    @property
    def uris(self) -> list[str]:
        return [m.group(1) for line in self.lines if (m := re.search(r"listening on (\S+)", line))]

    def address(self, kind: str = "tcp") -> tuple[str, int] | str:
        for uri in self.uris:
            scheme, _, rest = uri.partition(":")
            if scheme == kind:
                if kind in ("unix", "unix-dgram"):
                    return rest
                host, _, port = rest[2:].rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"no {kind} listener in {self.uris}")

    def workers(self) -> list[int]:
        """Every process under the master: its workers, a fork-mode worker's request
        children, a new master's tree."""
        pids = descendants(self.pid)
        self.seen_pids.update(pids)
        return pids

    def adopt(self, pid: int) -> None:
        """End ``pid`` too at teardown (a new master an upgrade started)."""
        self.seen_pids.add(pid)
        self.seen_pids.update(descendants(pid))

    def signal(self, signum: int) -> None:
        self.seen_pids.update(descendants(self.pid))
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"cluster did not exit within {timeout}s:\n{self.log}") from None

    def end(self) -> None:
        """Teardown: kill the master and everything below it, then wait until all are gone."""
        pids = set(descendants(self.pid)) | self.seen_pids
        kill_all([self.pid, *pids])
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._reader.join(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        try:
            wait_for(lambda: not any(alive(p) for p in pids), 5, "every process to end")
        except AssertionError:
            pass  # SIGKILL was sent; a process stuck in the kernel is not ours to wait for
        for pid in pids:  # orphans reparented to us (we are their subreaper)
            reap_if_ours(pid)


@pytest.fixture(scope="session", autouse=True)
def reap_adopted_orphans() -> Iterator[None]:
    """At the end, collect orphans reparented to us that no test collected (we are their
    subreaper: left alone they would linger as zombies until this process exits)."""
    yield
    for pid in children(os.getpid()):
        if state(pid) == "Z":
            reap_if_ours(pid)


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator:
    """``start_cluster(args...)`` starts a master (not yet waited for); all are ended at teardown."""
    started: list[Cluster] = []

    def start(
        *args: str, wait: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Cluster:
        cluster = Cluster(list(args), cwd=cwd, env=env)
        started.append(cluster)
        if wait:
            cluster.wait_ready()
            cluster.workers()
        return cluster

    yield start
    for cluster in started:
        cluster.end()


@pytest.fixture
def served():
    """Run a library server in a thread of this process; end its workers by pid at teardown."""
    started: list = []

    def serve(server):
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        started.append((server, thread))
        assert server.wait_ready(20)
        return server

    yield serve
    for server, thread in started:
        pids = server.worker_pids
        if thread.is_alive():
            server.shutdown()
        thread.join(20)
        kill_all(pids)
        server.server_close()


# ------------------------------------------------------------------------- clients
def tcp_connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def unix_connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def stream_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and read until the server closes."""
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes; b"" for a connection it refused (closed, or
    reset for the bytes it never read)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def closed_unanswered(address: tuple[str, int], payload: bytes) -> bool:
    """Whether the server closed the connection without a byte of answer. A refused request
    is closed with its bytes unread, so the kernel may answer them with a reset rather than
    the end-of-file: both are a close."""
    with tcp_connect(address) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError as err:  # the reset came between our send and our shutdown: the
            if err.errno != errno.ENOTCONN:  # socket is closed already (seen once in CI)
                raise
        return read_all(sock) == b""


def udp_roundtrip(address: tuple[str, int], payload: bytes, timeout: float = 5.0) -> bytes:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, address)
        return sock.recvfrom(65536)[0]


def unix_dgram_roundtrip(
    path: str, payload: bytes, client_path: str, timeout: float = 5.0
) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(client_path)
        sock.settimeout(timeout)
        try:
            sock.sendto(payload, path)
            return sock.recvfrom(65536)[0]
        finally:
            os.unlink(client_path)


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


SLOW_FIRST = ("test_multihost.py", "test_soak.py", "test_chaos.py", "test_faults.py",
              "test_hostile.py", "test_lifecycle.py", "test_supervision.py", "test_forkmode.py",
              "test_control.py", "test_generations.py", "test_access.py", "test_health.py")  # fmt: skip


def pytest_collection_modifyitems(items: list) -> None:
    """The tests marked ``slow`` first, then the rest; within each, the modules whose tests
    take longest first (the order within a module stays). Together with pyproject's
    ``--dist load --maxschedchunk 1`` (an idle xdist worker takes the next test, one at a
    time) this is longest-first list scheduling: what runs last is short, so the workers end
    together. With xdist's default chunks (or worksteal's contiguous shares) one worker ended
    the run on a queue of 15 s of tests while the three others sat idle."""
    rank = {name: n for n, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                 rank.get(item.path.name, len(SLOW_FIRST))))  # fmt: skip


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two test processes per CPU, not one. Most tests spend their time waiting
    on real masters, timers and sockets, not computing: on 2 cores, 4 test processes finish
    the suite in about 110 s where 2 took 170 s. (The CPU-bound checks, the benchmarks, are
    not tests.)"""
    return 2 * (os.cpu_count() or 1)


PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A pids cgroup of this test's own (cgroup v1, as root), removed at the end."""
    if os.geteuid() != 0 or not (PIDS_CGROUPS / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup v1 pids controller to cap a process tree")
    group = PIDS_CGROUPS / f"prefork-test-{os.getpid()}-{random.randrange(1 << 30)}"
    group.mkdir()
    try:
        yield group
    finally:
        wait_for(lambda: not (group / "cgroup.procs").read_text().split(), 10,
                 "the cgroup to empty")  # fmt: skip
        group.rmdir()

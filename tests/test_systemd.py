"""systemd: the notify protocol (a test-owned NOTIFY_SOCKET), and socket activation with
LISTEN_FDNAMES."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, stream_roundtrip, tcp_connect
from tests.procs import wait_for

pytestmark = pytest.mark.timeout(60)


class NotifySocket:
    """What systemd listens on: a datagram socket; ``messages`` reads what came so far."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.received
            self.received.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait(self, key: str, count: int = 1, timeout: float = 15) -> list[dict[str, str]]:
        return wait_for(lambda: len([m for m in self.messages() if key in m]) >= count
                        and self.received, timeout, f"{count} x {key}")  # fmt: skip


def test_ready_reloading_ready_stopping(start_cluster, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    cluster = start_cluster("echo", "-w", "2", "-b", "127.0.0.1:0", wait=False,
                            env={"NOTIFY_SOCKET": notify.path})  # fmt: skip
    cluster.wait_ready()
    first = notify.wait("READY")
    assert first[0]["READY"] == "1" and "2 of 2 workers ready" in first[0]["STATUS"]
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload complete: generation 2")
    messages = notify.wait("READY", count=2)
    keys = [next(k for k in ("READY", "RELOADING", "STOPPING") if k in m)
            for m in messages if {"READY", "RELOADING", "STOPPING"} & set(m)]  # fmt: skip
    assert keys == ["READY", "RELOADING", "READY"]
    reloading = next(m for m in messages if "RELOADING" in m)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0
    assert "STOPPING" in notify.wait("STOPPING")[-1]


def test_upgrade_tells_systemd_the_new_main_pid(start_cluster, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    cluster = start_cluster("echo", "-w", "1", "-b", "127.0.0.1:0", wait=False,
                            env={"NOTIFY_SOCKET": notify.path})  # fmt: skip
    cluster.wait_ready()
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    found = wait_for(lambda: [m for m in notify.messages() if m.get("MAINPID") == str(new_pid)],
                     20, "MAINPID of the new master")  # fmt: skip
    assert found[0]["READY"] == "1"
    assert cluster.wait_exit(timeout=20) == 0
    cluster.adopt(new_pid)


def test_sockets_passed_in_reversed_order_are_matched_by_name(tmp_path: Path) -> None:
    """systemd passes 'admin' as fd 3 and 'web' as fd 4; the binds name them the other way
    round. Each bind adopts its own socket, by name, and binds nothing."""
    web, admin = socket.socket(), socket.socket()
    for sock in (web, admin):
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    web_port, admin_port = web.getsockname()[1], admin.getsockname()[1]
    script = (
        f"import os, sys; os.dup2({admin.fileno()}, 3); os.dup2({web.fileno()}, 4); "
        "os.environ.update(LISTEN_FDS='2', LISTEN_FDNAMES='admin:web', "
        "LISTEN_PID=str(os.getpid())); "
        "os.execv(sys.executable, [sys.executable, '-m', 'cluster', 'run', 'echo', '-w', '1', "
        "'-b', '127.0.0.1:0?name=web', '-b', '127.0.0.1:0?name=admin=http-hello'])"
    )
    cluster = Cluster([], command=[sys.executable, "-c", script],
                      pass_fds=(web.fileno(), admin.fileno()))  # fmt: skip
    web.close()
    admin.close()
    try:
        cluster.wait_ready()
        assert cluster.uris == [f"tcp://127.0.0.1:{web_port}", f"tcp://127.0.0.1:{admin_port}"]
        assert stream_roundtrip(tcp_connect(("127.0.0.1", web_port)), b"echoed") == b"echoed"
        reply = stream_roundtrip(tcp_connect(("127.0.0.1", admin_port)),
                                 b"GET / HTTP/1.0\r\n\r\n")  # fmt: skip
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"Hello, world!\n")
    finally:
        cluster.end()

"""Privileges and socket files: ``--user``/``--group`` (workers drop root after the master
bound everything), ``--umask``, and a Unix socket bind's ``mode=``/``owner=``/``group=``.

The process tests need root (the CI machine's user) and skip, saying so, without it. What
they read is the kernel's word: ``/proc/PID/status`` and ``os.stat``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import users
from cluster.errors import ConfigError
from cluster.listeners import parse_bind
from tests.conftest import (
    ROOT,
    Cluster,
    cluster_env,
    read_line,
    stream_roundtrip,
    tcp_connect,
    unix_connect,
)
from tests.procs import children, request_children, wait_for
from tests.test_bad_input import assert_one_line_error, run_cluster
from tests.test_logs import write_after_reopen
from workers.runtime.access import ACCESS, AccessLog, reopen_logs
from workers.runtime.privileges import Identity, PrivilegeError, drop, drop_problem, give_to

pytestmark = pytest.mark.timeout(60)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

NOBODY = pwd.getpwnam("nobody")
NOBODY_IDENTITY = Identity(NOBODY.pw_uid, NOBODY.pw_gid, "nobody", str(NOBODY.pw_gid))
UNKNOWN = "no-such-account-xyz"


def credentials(pid: int) -> dict[str, list[str]]:
    """The ids of ``pid`` from the kernel: Uid and Gid (real, effective, saved, filesystem),
    Groups (supplementary), CapEff (effective capabilities), and its Umask."""
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if ":" in line)
    return {key: fields[key].split() for key in ("Uid", "Gid", "Groups", "CapEff", "Umask")}


def is_nobody(pid: int) -> bool:
    creds = credentials(pid)
    return (creds["Uid"] == [str(NOBODY.pw_uid)] * 4 and creds["Gid"] == [str(NOBODY.pw_gid)] * 4
            and creds["Groups"] == [] and int(creds["CapEff"][0], 16) == 0)  # fmt: skip


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is under a 0700 one), for the
    files workers running as nobody open by their path."""
    path = Path(tempfile.mkdtemp(prefix="cluster-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def control(path: Path, message: dict) -> dict:
    with unix_connect(str(path)) as sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(read_line(sock))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------------ pure decisions
def test_umask_is_octal_text_or_a_toml_int() -> None:
    for value in ("027", "0o027", "0027", 0o027):
        assert users.parse_umask(value) == 0o027
    assert users.parse_umask(None) is None
    for bad in ("8", "abc", "1000", "", -1, True, 0o1000):
        with pytest.raises(ConfigError, match="--umask"):
            users.parse_umask(bad)  # type: ignore[arg-type]


def test_socket_mode_is_octal_and_only_for_socket_files() -> None:
    assert parse_bind("unix:/run/x.sock?mode=0660").mode == 0o660
    assert parse_bind("unix-dgram:/run/x.sock?mode=600").mode == 0o600
    assert parse_bind("unix:/run/x.sock").mode is None
    with pytest.raises(ConfigError, match="0999"):
        parse_bind("unix:/run/x.sock?mode=0999")
    for text in ("tcp://127.0.0.1:0?mode=0660", "127.0.0.1:0?owner=nobody", "fd://3?group=0"):
        with pytest.raises(ConfigError, match="unix"):
            parse_bind(text)


def test_socket_owner_and_group_resolve_names_and_numbers() -> None:
    spec = parse_bind("unix:/run/x.sock?owner=nobody&group=0")
    assert spec.owner_ids() == (NOBODY.pw_uid, 0)
    assert parse_bind("unix:/run/x.sock?group=4242").owner_ids() == (-1, 4242)
    with pytest.raises(ConfigError, match=UNKNOWN):
        parse_bind(f"unix:/run/x.sock?owner={UNKNOWN}").owner_ids()


def test_user_resolves_to_its_ids_and_its_primary_group() -> None:
    for given in ("nobody", str(NOBODY.pw_uid), NOBODY.pw_uid):
        found = users.identity(given, None)
        assert found is not None and (found.uid, found.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert users.identity("nobody", "0").gid == 0  # type: ignore[union-attr]
    assert users.identity(4242424, 4242) == Identity(4242424, 4242, "4242424", "4242")
    assert users.identity(None, None) is None
    for user, group, needle in ((UNKNOWN, None, UNKNOWN), ("nobody", UNKNOWN, UNKNOWN),
                                (None, "nogroup", "needs --user"), ("4242424", None, "--group"),
                                ("", None, "--user")):  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            users.identity(user, group)


def test_only_root_switches_users_others_may_only_stay_themselves() -> None:
    target = Identity(1000, 1000, "app", "app")
    assert users.switch_problem(target, euid=0, egid=0) is None
    assert users.switch_problem(target, euid=1000, egid=1000) is None
    problem = users.switch_problem(target, euid=1001, egid=1001)
    assert problem is not None and "--user app" in problem and "needs root" in problem


def test_a_drop_is_judged_by_every_id_read_back() -> None:
    target = Identity(65534, 65534, "nobody", "nogroup")
    assert drop_problem((65534,) * 3, (65534,) * 3, [], target) is None
    assert drop_problem((65534,) * 3, (65534,) * 3, [65534], target) is None
    assert "saved" in drop_problem((65534, 65534, 0), (65534,) * 3, [], target)  # type: ignore[operator]
    assert "gids" in drop_problem((65534,) * 3, (0, 65534, 65534), [], target)  # type: ignore[operator]
    assert "[0]" in drop_problem((65534,) * 3, (65534,) * 3, [0], target)  # type: ignore[operator]


def test_reopen_logs_reports_a_file_it_cannot_reopen_and_writes_on(tmp_path: Path) -> None:
    """A signal handler runs it: a failure must come back as a value, never as an exception."""
    gone = tmp_path / "gone"
    gone.mkdir()
    log = AccessLog(str(gone / "access.log"))
    old_fd = log.fd
    shutil.rmtree(gone)
    ACCESS.log = log
    try:
        reopened, failed = reopen_logs()
    finally:
        ACCESS.log = None
        log.close()
    assert str(gone / "access.log") not in reopened
    assert failed == [f"{gone / 'access.log'}: No such file or directory"]
    assert log.fd == old_fd


# ------------------------------------------------------------------------ the drop itself
def in_child(action) -> int:  # noqa: ANN001
    """Run ``action()`` in a forked child: its exit code (0 when it returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            action()
            code = 0
        except BaseException as err:  # noqa: BLE001
            os.write(2, f"{type(err).__name__}: {err}\n".encode())
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@as_root
def test_a_real_drop_sets_every_id_and_root_cannot_be_regained() -> None:
    def act() -> None:
        os.setgroups([4242, 0])  # some to clear
        drop(NOBODY_IDENTITY)
        assert os.getresuid() == (NOBODY.pw_uid,) * 3 and os.getresgid() == (NOBODY.pw_gid,) * 3
        assert os.getgroups() == []
        with pytest.raises(PermissionError):
            os.setuid(0)

    assert in_child(act) == 0


@as_root
def test_a_drop_that_does_not_stick_is_refused() -> None:
    """The one fault we cannot make the kernel produce: a setresuid that returns but changes
    nothing (a seccomp filter, a broken LSM). The worker must then refuse to serve."""

    def act() -> None:
        os.setresuid = lambda *ids: None  # the injected fault, in the child only
        with pytest.raises(PrivilegeError, match="did not stick: uids"):
            drop(NOBODY_IDENTITY)

    assert in_child(act) == 0


@as_root
def test_the_master_gives_a_log_file_to_the_worker_user(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("")
    path.chmod(0o040)
    fd = os.open(path, os.O_WRONLY)
    try:
        give_to(fd, NOBODY.pw_uid)
    finally:
        os.close(fd)
    info = os.stat(path)
    assert info.st_uid == NOBODY.pw_uid and stat.S_IMODE(info.st_mode) == 0o640


# ------------------------------------------------------------------------ clusters
@pytest.fixture
def grouped_cluster() -> Iterator:
    """``grouped_cluster(groups, args...)``: a master started with these supplementary groups
    (root's are often none, and clearing none proves nothing); ended at teardown."""
    started: list[Cluster] = []

    def start(groups: list[int], *args: str) -> Cluster:
        code = (f"import os, runpy; os.setgroups({groups!r}); "
                "runpy.run_module('cluster', run_name='__main__', alter_sys=True)")  # fmt: skip
        cluster = Cluster([], command=[sys.executable, "-c", code, "run", *args])
        started.append(cluster)
        return cluster.wait_ready()

    yield start
    for cluster in started:
        cluster.end()


@as_root
def test_as_nobody_workers_and_request_children_drop_root_port_81_serves_control_works(
    grouped_cluster, world_dir: Path
) -> None:
    """Port 81 is bound by the root master: taken by something else, the start fails (exit 4)
    and so does this test, loudly. The app refuses to be imported as root, so serving it shows
    that the app check and the workers imported it as nobody."""
    ctl = world_dir / "ctl"
    cluster = grouped_cluster([4242, 0], "rootless:Gate", "-w", "2", "-k", "fork",
                              "-b", "127.0.0.1:81", "--user", "nobody", "--control", str(ctl),
                              "--umask", "027")  # fmt: skip
    assert cluster.uris == ["tcp://127.0.0.1:81"]
    assert credentials(cluster.pid)["Groups"] == ["0", "4242"]  # what the workers had to clear
    workers = children(cluster.pid)
    assert len(workers) == 2 and all(is_nobody(pid) for pid in workers), {
        pid: credentials(pid) for pid in workers
    }
    assert credentials(cluster.pid)["Uid"] == ["0"] * 4  # the master stays root
    assert all(credentials(pid)["Umask"] == ["0027"] for pid in [cluster.pid, *workers])
    with tcp_connect(("127.0.0.1", 81)) as sock:
        child = int(read_line(sock).split()[1])  # the request's own process (fork mode)
        assert child not in workers
        assert any(child in request_children(worker) for worker in workers) and is_nobody(child)
        sock.sendall(b"finish\n")
        assert read_line(sock) == b"done %d\n" % child
    info = os.stat(ctl)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)  # whatever the umask
    status = control(ctl, {"cmd": "status"})
    assert status["ok"] and sorted(w["pid"] for w in status["workers"]) == sorted(workers)


@as_root
def test_reopen_logs_works_with_user_nobody(start_cluster, world_dir: Path) -> None:
    main, access, ctl = world_dir / "main.log", world_dir / "access.log", world_dir / "ctl"
    cluster = start_cluster("rootless:Boom", "-w", "2", "-b", "127.0.0.1:0", "--user", "nobody",
                            "--log-file", str(main), "--access-log", str(access),
                            "--control", str(ctl), wait=False)  # fmt: skip
    wait_for(lambda: any("ready: 2 workers" in line for line in lines(main)), 20, "ready")
    port = int(next(line for line in lines(main) if "listening on" in line).rsplit(":", 1)[1])
    assert os.stat(main).st_uid == os.stat(access).st_uid == NOBODY.pw_uid
    stream_roundtrip(tcp_connect(("127.0.0.1", port)), b"before\n")
    wait_for(lambda: len(lines(access)) == 1, 10, "the first line written (the worker idles)")
    main.rename(world_dir / "main.log.1")
    access.rename(world_dir / "access.log.1")
    reply = control(ctl, {"cmd": "reopen-logs"})
    assert reply["ok"] and sorted(reply["reopened"]) == sorted([str(main), str(access)])
    write_after_reopen(cluster, port, main)
    assert os.stat(main).st_uid == os.stat(access).st_uid == NOBODY.pw_uid
    assert len(lines(access)) == 4 and len(lines(world_dir / "access.log.1")) == 1
    logged = lines(main) + lines(world_dir / "main.log.1")
    assert not any("cannot reopen" in line for line in logged)


@as_root
def test_socket_files_get_their_mode_owner_and_umask_and_only_ours_are_removed_at_exit(
    start_cluster, tmp_path: Path
) -> None:
    asked, masked, replaced = (tmp_path / name for name in ("asked.sock", "masked.sock",
                                                            "replaced.sock"))  # fmt: skip
    cluster = start_cluster("echo", "-w", "1", "--umask", "077",
                            "-b", f"unix:{asked}?mode=0660&owner=nobody&group=0",
                            "-b", f"unix-dgram:{masked}", "-b", f"unix:{replaced}")  # fmt: skip
    info = os.stat(asked)
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o660, NOBODY.pw_uid, 0)
    info = os.stat(masked)
    # Linux creates a socket file 0777 minus the umask (execute means nothing on a socket).
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, 0)
    assert stream_roundtrip(unix_connect(str(asked)), b"hi") == b"hi"
    replaced.unlink()  # someone else's file takes the path while we serve
    replaced.write_text("not ours")
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0
    assert not asked.exists() and not masked.exists()
    assert replaced.read_text() == "not ours"
    assert f"left {replaced} in place" in cluster.log


@as_root
def test_reload_and_upgrade_keep_workers_nobody_and_the_socket_file_in_place(
    start_cluster, world_dir: Path
) -> None:
    """HUP: a new generation, dropped too. USR2: the new master adopts the socket file, the
    old one leaves it in place as it exits, and the new one removes it when it stops."""
    path, pidfile = world_dir / "app.sock", world_dir / "m.pid"
    cluster = start_cluster("rootless:Boom", "-w", "1", "-b", f"unix:{path}?mode=0666",
                            "--user", "nobody", "--pidfile", str(pidfile))  # fmt: skip
    first = children(cluster.pid)
    cluster.signal(signal.SIGHUP)
    cluster.wait_log("reload complete: generation 2")
    second = wait_for(lambda: [p for p in children(cluster.pid) if p not in first], 10, "gen 2")
    assert all(is_nobody(pid) for pid in second)
    cluster.signal(signal.SIGUSR2)
    new_pid = int(cluster.wait_log(r"upgrade: started new master (\d+)").group(1))
    cluster.adopt(new_pid)
    assert cluster.wait_exit() == 0  # the old master handed over and left
    cluster.adopt(new_pid)
    new_workers = wait_for(lambda: children(new_pid), 10, "the new master's worker")
    assert all(is_nobody(pid) for pid in new_workers)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    assert stream_roundtrip(unix_connect(str(path)), b"new\n") == b"new\n"
    os.kill(new_pid, signal.SIGTERM)
    wait_for(lambda: not path.exists() and not pidfile.exists(), 10, "the new master's cleanup")


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--user", UNKNOWN], UNKNOWN),
        (["--user", "nobody", "--group", UNKNOWN], UNKNOWN),
        (["--group", "nogroup"], "--group nogroup needs --user"),
        (["-b", f"unix:/tmp/x.sock?owner={UNKNOWN}"], UNKNOWN),
        (["-b", f"unix:/tmp/x.sock?group={UNKNOWN}"], UNKNOWN),
        (["-b", "unix:/tmp/x.sock?mode=0999"], "0999"),
        (["-b", "127.0.0.1:0?mode=0660"], "mode= is for unix"),
        (["--umask", "0999"], "0999"),
    ],
)
def test_bad_users_groups_and_modes_exit_2(args: list[str], needle: str) -> None:
    assert_one_line_error(run_cluster(*args), 2, needle)


@as_root
def test_without_user_the_rootless_app_is_refused_before_any_worker() -> None:
    """The check the cluster tests rely on: imported as root, the app fails (exit 3)."""
    assert_one_line_error(run_cluster("rootless:Gate", "-b", "127.0.0.1:0"), 3, "as root")


def runs_as_nobody(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import cluster"], cwd=ROOT, env=cluster_env(),
                              user="nobody", capture_output=True, timeout=20).returncode == 0  # fmt: skip
    except OSError:  # cannot even be executed: its directory is closed to nobody
        return False


@as_root
def test_user_without_root_exits_2() -> None:
    """A master that is not root cannot switch users. Run as nobody, with an interpreter
    nobody can run (this one may live under /root, which nobody may not enter)."""
    python = next((exe for exe in (sys.executable, "/usr/bin/python3") if runs_as_nobody(exe)),
                  None)  # fmt: skip
    if python is None:
        pytest.skip("no interpreter that nobody may run")
    result = subprocess.run([python, "-m", "cluster", "run", "--user", "root", "-b", "127.0.0.1:0"],
                            cwd=ROOT, env=cluster_env(), user="nobody", capture_output=True,
                            text=True, timeout=20, stdin=subprocess.DEVNULL)  # fmt: skip
    assert_one_line_error(result, 2, "--user root")
    assert "needs root" in result.stderr


@pytest.mark.parametrize("target_kind", ["file", "stale socket"])
def test_a_symlink_at_the_socket_path_is_neither_followed_nor_removed(
    tmp_path: Path, target_kind: str
) -> None:
    target = tmp_path / "target"
    if target_kind == "file":
        target.write_text("precious")
    else:
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(target))  # closed unlistened: what a crashed server leaves
    link = tmp_path / "app.sock"
    link.symlink_to(target)
    assert_one_line_error(run_cluster("-b", f"unix:{link}"), 4, f"{link} is a symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(target)
    if target_kind == "file":
        assert target.read_text() == "precious"
    else:
        assert target.is_socket()

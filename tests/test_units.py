"""Pure functions: bind URI parsing, config validation and files, pool decisions, http-hello parsing."""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster import backoff, commands, exits, pool
from cluster.apps.http_hello import body_length, wants_close
from cluster.config import Config, build, read_toml, validate
from cluster.errors import ConfigError
from cluster.listeners import BindSpec, format_uri, parse_bind
from cluster.master import live_events
from cluster.spawn import start_all
from workers.runtime.client import ClientSocket, ListeningSocket
from workers.runtime.escalation import overdue

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp://127.0.0.1:8000", BindSpec("tcp", host="127.0.0.1", port=8000)),
        ("127.0.0.1:0", BindSpec("tcp", host="127.0.0.1", port=0)),
        ("[::1]:8080", BindSpec("tcp", host="::1", port=8080)),
        ("tcp://[::1]:80", BindSpec("tcp", host="::1", port=80)),
        ("udp://127.0.0.1:53", BindSpec("udp", host="127.0.0.1", port=53)),
        ("udp://[::1]:0", BindSpec("udp", host="::1", port=0)),
        ("unix:/run/x.sock", BindSpec("unix", path="/run/x.sock")),
        ("unix:///run/x.sock", BindSpec("unix", path="/run/x.sock")),
        ("unix:rel/x.sock", BindSpec("unix", path="rel/x.sock")),
        ("unix-dgram:/run/d.sock", BindSpec("unix-dgram", path="/run/d.sock")),
        ("fd://3", BindSpec("fd", fd=3)),
        (
            "tcp://127.0.0.1:0=pkg.mod:Handler",
            BindSpec("tcp", host="127.0.0.1", port=0, handler="pkg.mod:Handler"),
        ),
        ("[::1]:0=m:H", BindSpec("tcp", host="::1", port=0, handler="m:H")),
        ("127.0.0.1:80?name=web", BindSpec("tcp", host="127.0.0.1", port=80)),
        ("127.0.0.1:80?name=web=m:H", BindSpec("tcp", host="127.0.0.1", port=80, handler="m:H")),
    ],
)
def test_parse_bind_accepts_the_grammar(text: str, expected: BindSpec) -> None:
    parsed = parse_bind(text)
    assert (parsed.kind, parsed.host, parsed.port, parsed.path, parsed.fd, parsed.handler) == (
        expected.kind, expected.host, expected.port, expected.path, expected.fd, expected.handler,
    )  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["nonsense", "tcp://127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "ftp://a:1", "::1:80",
     "[::1]80", "unix:", "fd://x", "127.0.0.1:0=nocolon", "127.0.0.1:0=:Cls",
     "127.0.0.1:0?proxy=v3", "127.0.0.1:0?name=", "127.0.0.1:0?name"],
)  # fmt: skip
def test_parse_bind_rejects_bad_uris_naming_them(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bind(text)
    assert repr(text) in str(err.value)


def test_bind_names_for_systemd() -> None:
    assert parse_bind("127.0.0.1:80?name=web").name == "web"
    assert parse_bind("127.0.0.1:80").name is None


def test_format_uri_round_trips() -> None:
    assert format_uri("tcp", ("127.0.0.1", 5)) == "tcp://127.0.0.1:5"
    assert format_uri("udp", ("::1", 5, 0, 0)) == "udp://[::1]:5"
    assert format_uri("unix", "/tmp/a") == "unix:/tmp/a"
    assert parse_bind(format_uri("tcp", ("::1", 7, 0, 0))).port == 7


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("workers", 0, "--workers"), ("worker_class", "gevent", "gevent"), ("threads", 0, "--threads"),
     ("max_children", 0, "--max-children"), ("backlog", 0, "--backlog"), ("graceful_timeout", -1, "-1"),
     ("log_level", "loud", "loud"), ("bind", ["bad"], "'bad'"), ("bind", [], "--bind")],
)  # fmt: skip
def test_validate_names_the_bad_value(field: str, value: object, needle: str) -> None:
    config = Config(workers=2)
    setattr(config, field, value)
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert needle in str(err.value)


def test_max_workers_below_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match="--max-workers 1"):
        validate(Config(workers=2, max_workers=1))


def test_config_file_then_flags(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('workers = 3\nbind = "tcp://127.0.0.1:0"\ngraceful-timeout = 5\n')
    config = build(read_toml(str(path)), {"workers": 5})
    assert (config.workers, config.bind, config.graceful_timeout) == (5, ["tcp://127.0.0.1:0"], 5)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("workers = ", "bad config file"),
        ("colour = 1", "'colour'"),
        ("workers = 'many'", "workers"),
    ],
)
def test_bad_config_file(tmp_path, text: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        build(read_toml(str(path)), {})


def test_missing_config_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        read_toml(str(tmp_path / "nope.toml"))


def view(pid: int, ready: bool = True, retiring: bool = False, at: float = 0.0, slot: int = 0):
    return pool.WorkerView(pid, slot, 1, at, ready, retiring)


def test_plan_steady_state_fills_and_trims() -> None:
    assert pool.plan(3, 1, "all", [view(1), view(2, retiring=True)]) == pool.Plan(spawn=2)
    assert pool.plan(1, 1, "all", [view(1, at=1.0), view(2, at=2.0)]) == pool.Plan(retire=(2,))


def gen_view(
    pid: int, generation: int, ready: bool = True, retiring: bool = False, at: float = 0.0
):
    return pool.WorkerView(pid, pid, generation, at, ready, retiring)


def test_plan_all_boots_a_whole_generation_before_retiring_the_old() -> None:
    old = [gen_view(1, 1), gen_view(2, 1)]
    assert pool.plan(2, 2, "all", old) == pool.Plan(spawn=2)
    booting = [*old, gen_view(3, 2, ready=False), gen_view(4, 2)]
    assert pool.plan(2, 2, "all", booting) == pool.Plan()
    ready = [*old, gen_view(3, 2), gen_view(4, 2)]
    assert pool.plan(2, 2, "all", ready) == pool.Plan(retire=(1, 2))


def test_plan_rolling_keeps_between_n_and_n_plus_1_alive() -> None:
    """Simulate a rolling reload of 3 workers step by step; check the invariant each step."""
    n, workers, next_pid, clock = 3, [gen_view(p, 1, at=p) for p in (1, 2, 3)], 10, 10.0
    for _ in range(40):
        decision = pool.plan(n, 2, "rolling", workers)
        for _ in range(decision.spawn):
            workers.append(gen_view(next_pid, 2, ready=False, at=clock))
            next_pid += 1
        workers = [gen_view(w.pid, w.generation, w.ready, w.retiring or w.pid in decision.retire,
                            w.spawned_at) for w in workers]  # fmt: skip
        alive = len(workers)
        serving = sum(1 for w in workers if w.ready and not w.retiring)
        assert n <= alive <= n + 1 and serving >= n - 1, workers
        # time passes: booting workers become ready, retiring ones exit
        workers = [gen_view(w.pid, w.generation, True, w.retiring, w.spawned_at)
                   for w in workers if not w.retiring]  # fmt: skip
        clock += 1
        if all(w.generation == 2 for w in workers) and len(workers) == n:
            break
    assert sorted(w.generation for w in workers) == [2, 2, 2]


def test_adapt_grows_fast_and_shrinks_slowly() -> None:
    assert pool.adapt(2, idle=0, min_spare=2, max_spare=4, bound=10, rate=1) == (3, 2)
    assert pool.adapt(3, idle=0, min_spare=2, max_spare=4, bound=10, rate=2) == (5, 4)
    assert pool.adapt(9, idle=0, min_spare=2, max_spare=4, bound=10, rate=8) == (10, 8)
    assert pool.adapt(10, idle=0, min_spare=2, max_spare=4, bound=10, rate=8) == (10, 1)
    assert pool.adapt(8, idle=7, min_spare=2, max_spare=4, bound=10, rate=4) == (7, 1)
    assert pool.adapt(1, idle=5, min_spare=0, max_spare=0, bound=10, rate=1) == (1, 1)
    assert pool.adapt(4, idle=3, min_spare=2, max_spare=4, bound=10, rate=2) == (4, 1)


def test_diff_binds() -> None:
    from cluster.listeners import diff_binds

    assert diff_binds(["a", "b"], ["b", "c"]) == (["c"], ["a"])
    assert diff_binds(["a"], ["a"]) == ([], [])


def test_inherited_fds_from_upgrade_and_systemd() -> None:
    from cluster import handover

    env = {handover.ENV_FDS: handover.encode_fds([(7, "tcp://127.0.0.1:0"), (9, "unix:/x")])}
    assert handover.inherited_fds(env, [], 1) == {"tcp://127.0.0.1:0": 7, "unix:/x": 9}
    assert handover.unused_fds({"a": 7, "b": 9}, [("a", None)]) == [9]
    systemd = {"LISTEN_PID": "42", "LISTEN_FDS": "2"}
    abc = [("a", None), ("b", None), ("c", None)]
    assert handover.inherited_fds(systemd, abc, 42) == {"a": 3, "b": 4}
    assert handover.inherited_fds(systemd, [("a", None)], 43) == {}  # not for us
    named = {**systemd, "LISTEN_FDNAMES": "admin:web"}
    binds = [("w", "web"), ("x", "missing"), ("plain", None), ("a", "admin")]
    assert handover.inherited_fds(named, binds, 42) == {"w": 4, "a": 3}  # by name; "x" binds
    assert handover.inherited_fds({**systemd, "LISTEN_FDNAMES": "admin:web"},
                                  [("p", None), ("a", "admin")], 42) == {"a": 3, "p": 4}  # fmt: skip
    with pytest.raises(ConfigError, match="CLUSTER_FDS"):
        handover.inherited_fds({handover.ENV_FDS: "nonsense"}, [], 1)


def test_to_retire_prefers_booting_then_idle_then_youngest() -> None:
    workers = [view(1, at=1.0), view(2, at=3.0), view(3, ready=False, at=0.5), view(4, at=2.0)]
    assert pool.to_retire(2, workers) == [3, 2]
    with_idle = [*workers[:3], pool.WorkerView(4, 0, 1, 2.0, True, False, idle=True)]
    assert pool.to_retire(2, with_idle) == [3, 4]
    assert pool.to_retire(4, workers) == []
    assert pool.to_retire(1, [view(1), view(2, retiring=True)]) == []


def test_free_slots_are_the_lowest_below_capacity() -> None:
    assert pool.free_slots([], 1, 4) == [0]
    assert pool.free_slots([0, 1, 3], 2, 8) == [2, 4]
    assert pool.free_slots([0, 1, 2], 3, 4) == [3]


def test_scaling_commands_stay_within_bounds() -> None:
    assert commands.target_after(commands.make("incr"), 2, 4) == 3
    assert commands.target_after(commands.make("decr", 2), 4, 4) == 2
    assert commands.target_after(commands.make("scale", 4), 1, 4) == 4
    with pytest.raises(commands.Refused, match="max-workers 4"):
        commands.target_after(commands.make("incr"), 4, 4)
    with pytest.raises(commands.Refused, match="below 1"):
        commands.target_after(commands.make("decr"), 1, 4)
    with pytest.raises(commands.Refused, match="max-workers 4"):
        commands.target_after(commands.make("scale", 5), 2, 4)


def test_describe_exit() -> None:
    assert exits.describe(0) == "exited with code 0"
    assert exits.describe(-9) == "killed by SIGKILL"
    assert exits.describe(3) == "exited with code 3"


@pytest.mark.parametrize(
    ("head", "close"),
    [(b"GET / HTTP/1.1\r\nHost: x", False), (b"GET / HTTP/1.1\r\nConnection: close", True),
     (b"GET / HTTP/1.0\r\nHost: x", True), (b"GET / HTTP/1.0\r\nConnection: Keep-Alive", False)],
)  # fmt: skip
def test_http_hello_keep_alive_rules(head: bytes, close: bool) -> None:
    assert wants_close(head) is close


def test_http_hello_body_length() -> None:
    assert body_length(b"POST / HTTP/1.1\r\nContent-Length: 12") == 12
    assert body_length(b"GET / HTTP/1.1\r\nHost: x") == 0


def test_request_limit_adds_jitter_within_bounds() -> None:
    assert pool.request_limit(0, 5, 0.9) == 0
    assert pool.request_limit(10, 0, 0.99) == 10
    assert pool.request_limit(10, 5, 0.0) == 10
    assert pool.request_limit(10, 5, 0.999) == 15


def test_respawn_delay_backs_off_and_caps() -> None:
    assert backoff.delay(0, 0.5) == 0 and backoff.delay(1, 0.5) == 0
    delays = [backoff.delay(n, 0.5) for n in range(2, 12)]
    assert delays == sorted(delays) and delays[0] == pytest.approx(0.1)
    assert max(delays) == backoff.CAP
    assert backoff.delay(3, 0.0) == pytest.approx(0.1) and backoff.delay(3, 0.99) < 0.3


def test_crash_count_resets_after_a_long_life() -> None:
    assert backoff.count(2, 0.5) == 3
    assert backoff.count(7, backoff.CRASH_WINDOW + 1) == 1  # a long life starts afresh


def test_overdue() -> None:
    assert overdue(100.0, 131.0, 30.0)
    assert not overdue(100.0, 129.0, 30.0)
    assert not overdue(0.0, 1e9, 30.0)  # no request running
    assert not overdue(100.0, 1e9, 0.0)  # timeouts off


def test_scoreboard_lanes_and_states() -> None:
    from workers.runtime.scoreboard import IDLE, Scoreboard

    board = Scoreboard(capacity=3, lanes=2)
    board.claim(2, pid=42, generation=7)
    assert board.view(2).state == "booting"
    slot = board.worker_slot(2)
    slot.set_state(IDLE)
    slot.begin(1, ("::1", 80))
    view = board.view(2)
    assert (view.pid, view.generation, view.state) == (42, 7, "busy")
    assert view.oldest_request().client == "::1:80"
    slot.end(1)
    slot.begin(0, "")
    slot.end(0)
    view = board.view(2)
    assert (view.state, view.requests, view.oldest_request()) == ("idle", 2, None)
    assert board.is_idle(2)
    slot.begin(0, "")
    assert not board.is_idle(2)
    slot.end(0)
    board.release(2)
    assert board.view(2).state == "empty" and not board.is_idle(2)
    assert board.view(0).pid == 0  # other slots untouched
    board.close()


class _Fork:
    """Stands in for a WorkerProcess: records which fds its child would close at boot (the
    shared list as it is at this fork), or refuses like a kernel out of processes."""

    def __init__(self, sentinel: int, inherited: list[int], refuse: bool = False) -> None:
        self.sentinel, self.inherited, self.refuse = sentinel, inherited, refuse
        self.closes: list[int] | None = None

    def start(self) -> None:
        if self.refuse:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.closes = list(self.inherited)


def test_start_all_gives_each_child_its_elder_siblings_pidfds_and_stops_at_a_refusal() -> None:
    inherited = [3, 4]  # the master's own fds
    forks = [_Fork(10, inherited), _Fork(11, inherited), _Fork(12, inherited, refuse=True),
             _Fork(13, inherited)]  # fmt: skip
    started, err = start_all(forks, inherited)  # type: ignore[arg-type]
    assert started == forks[:2]
    assert isinstance(err, BlockingIOError)
    assert [f.closes for f in forks] == [[3, 4], [3, 4, 10], None, None]
    assert inherited == [3, 4, 10, 11]
    assert start_all(forks[:2], [3]) == (forks[:2], None)


def one_pass_ending_the_second(
    selector: selectors.BaseSelector, first: object, second: object, end_second: Callable
) -> tuple[list[str], list]:
    """Register two readable file objects, take one ``select`` pass (``first``'s event
    first), and run the events through ``live_events``, ``first``'s handler ending ``second``
    (``end_second``): which handlers ran, and the pass's events."""
    selector.register(first, selectors.EVENT_READ, "first")  # type: ignore[arg-type]
    selector.register(second, selectors.EVENT_READ, "second")  # type: ignore[arg-type]
    events = sorted(selector.select(0), key=lambda event: event[0].data)
    assert [key.data for key, _ in events] == ["first", "second"]
    handled = []
    for key, _ in live_events(selector, events):
        handled.append(key.data)
        if key.data == "first":
            end_second()
    return handled, events


def test_an_event_whose_part_an_earlier_handler_ended_in_the_same_pass_is_dropped() -> None:
    """A USR2's new master killed for being late: its exit and its pipe's end came in one
    ``select`` pass, the exit's handler unregistered the pipe, and the master then handled
    the pipe's event for a successor it had forgotten (AssertionError: the master died)."""
    selector = selectors.DefaultSelector()
    exit_r, exit_w = os.pipe()
    pipe_r, pipe_w = os.pipe()
    try:
        os.close(exit_w)
        os.close(pipe_w)
        handled, events = one_pass_ending_the_second(selector, exit_r, pipe_r,
                                                     lambda: selector.unregister(pipe_r))  # fmt: skip
        assert handled == ["first"]
        selector.register(pipe_r, selectors.EVENT_READ, "a new part on the same fd")
        assert [key.data for key, _ in live_events(selector, events)] == ["first"]
    finally:
        selector.close()
        os.close(exit_r)
        os.close(pipe_r)


def test_an_event_of_a_socket_an_earlier_handler_closed_is_dropped_not_raised() -> None:
    """A full health server drops its oldest client (unregister, close) while accepting in
    the same pass: looking the closed socket's event up by its file object raised ValueError
    (it has no fd any more), and the master died of it."""
    selector = selectors.DefaultSelector()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()

    def drop_second() -> None:
        selector.unregister(second)
        second.close()

    try:
        first_peer.send(b"x")
        second_peer.send(b"x")
        handled, _ = one_pass_ending_the_second(selector, first, second, drop_second)
        assert handled == ["first"]
    finally:
        selector.close()
        for sock in (first, first_peer, second, second_peer):
            sock.close()


@pytest.mark.parametrize("family", ["tcp4", "tcp6", "unix"])
def test_an_accepted_connection_names_its_family_and_type_as_the_stdlib_does(
    family: str, tmp_path: Path
) -> None:
    """``ListeningSocket`` builds each connection from the C type's plain numbers (the
    properties' enum conversions cost 3 microseconds an accept): a handler must still see
    the stdlib's enums."""
    if family == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "s"))
    else:
        inet = socket.AF_INET if family == "tcp4" else socket.AF_INET6
        listener = socket.socket(inet, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1" if family == "tcp4" else "::1", 0))
    listener.listen(4)
    listener.__class__ = ListeningSocket
    client = socket.socket(listener.family, socket.SOCK_STREAM)
    accepted: list[socket.socket] = []
    try:
        client.connect(listener.getsockname())
        conn, _ = listener.accept()
        accepted.append(conn)
        assert type(conn) is ClientSocket
        assert conn.family is listener.family and isinstance(conn.family, socket.AddressFamily)
        assert conn.type is socket.SOCK_STREAM
        assert conn.proto == listener.proto
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    finally:
        for sock in (*accepted, client, listener):
            sock.close()

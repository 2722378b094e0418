"""The master's decisions as pure functions: exits, the hung-request sequence, the watchdog,
the adaptive pacing, the rolling reload with retiring workers still alive, commands, and the
one registry of modes. No processes, no sockets."""

from __future__ import annotations

import signal

import pytest

from cluster import commands, exits, pool
from cluster.config import Config, validate
from cluster.errors import ConfigError
from cluster.watchdog import hung_request
from workers.runtime import modes
from workers.runtime.escalation import FIRST_SIGNALS, KILL_GRACE, Escalation
from workers.runtime.mode import Mode
from workers.runtime.scoreboard import LaneView, SlotView

pytestmark = pytest.mark.timeout(10)


def facts(**kw: object) -> exits.ExitFacts:
    base = {"exitcode": 1, "ready": True, "retiring": False, "stopping": False, "lived": 60.0}
    return exits.ExitFacts(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "kind", "crash"),
    [
        ({"retiring": True, "exitcode": -9}, exits.RETIRED, False),
        ({"stopping": True, "ready": False}, exits.RETIRED, False),
        ({"ready": False, "incoming": True}, exits.RELOAD_FAILED, True),
        ({"ready": False, "never_ready": True, "boot_failures": 1}, exits.BOOT_FAILURE, True),
        ({"ready": False, "never_ready": True, "boot_failures": 2}, exits.CANNOT_BOOT, True),
        ({"ready": False, "never_ready": False, "boot_failures": 5}, exits.BOOT_FAILURE, True),
        ({"exitcode": -9}, exits.KILLED, False),  # kill -9, the OOM killer
        ({"exitcode": -15, "lived": 0.5}, exits.KILLED, False),  # someone's TERM
        ({"exitcode": -11}, exits.CRASHED, True),  # its own segfault
        ({"exitcode": -6}, exits.CRASHED, True),  # its own abort()
        ({"exitcode": 1, "lived": 0.5}, exits.CRASHED, True),
        ({"exitcode": 0, "lived": 500.0}, exits.CRASHED, True),  # an exit nobody asked for
    ],
)
def test_what_an_exit_means(given: dict, kind: str, crash: bool) -> None:
    verdict = exits.judge(facts(**given))
    assert (verdict.kind, verdict.backoff) == (kind, crash)
    assert verdict.expected is (kind == exits.RETIRED)


def test_backoff_is_per_slot_and_never_for_other_slots() -> None:
    from cluster.backoff import Backoff

    hold = Backoff()
    assert hold.failed(0, lived=0.5, now=100.0, rand=0.5) == 0.0  # the first respawn: at once
    assert hold.failed(0, lived=0.5, now=100.0, rand=0.5) == pytest.approx(0.1)
    assert not hold.allows(0, 100.05) and hold.allows(0, 100.1)
    assert hold.allows(1, 100.0)  # the other slots fork on
    assert hold.next_deadline(100.0) == pytest.approx(100.1)
    for _ in range(10):
        hold.failed(0, lived=0.5, now=100.0, rand=0.5)
    assert hold.slots[0].until == pytest.approx(105.0)  # capped
    assert hold.failed(0, lived=60.0, now=200.0, rand=0.5) == 0.0  # a long life: afresh


def test_a_refused_fork_backs_off_every_slot_until_one_works() -> None:
    from cluster.backoff import Backoff

    hold = Backoff()
    wait = hold.start_failed(now=10.0, rand=0.5)
    assert wait == pytest.approx(0.1) and not hold.allows(0, 10.0) and not hold.allows(7, 10.0)
    assert hold.start_failed(now=10.0, rand=0.5) > wait  # growing while the kernel refuses
    assert hold.allows(3, 20.0)
    hold.started()
    assert hold.allows(0, 10.0) and hold.next_deadline(10.0) == float("inf")


def test_escalation_dumps_and_terms_then_kills_once_after_the_grace() -> None:
    hung = Escalation()
    assert hung.next_deadline() == float("inf")
    assert hung.begin(42, now=100.0) == FIRST_SIGNALS == (signal.SIGUSR2, signal.SIGTERM)
    assert hung.begin(42, now=100.5) == ()  # under way: nothing sent twice
    assert 42 in hung and hung.next_deadline() == 100.0 + KILL_GRACE
    assert hung.due(100.0 + KILL_GRACE / 2) == []
    assert hung.due(100.0 + KILL_GRACE) == [42]
    assert hung.due(200.0) == []  # KILL once; now it only waits to be reaped
    hung.forget(42)
    assert 42 not in hung and hung.next_deadline() == float("inf")


def slot_with(*starts: float) -> SlotView:
    lanes = tuple(LaneView(started, 0, f"client{n}") for n, started in enumerate(starts))
    return SlotView(0, 1, 1, "busy", 0.0, 0.0, 0, lanes)


def test_hung_request_is_the_oldest_lane_past_the_timeout() -> None:
    assert hung_request(slot_with(0.0, 0.0), now=1000.0, timeout=30) is None  # idle
    assert hung_request(slot_with(990.0), now=1000.0, timeout=30) is None  # young
    lane = hung_request(slot_with(990.0, 960.0, 0.0), now=1000.0, timeout=30)
    assert lane is not None and lane.client == "client1"
    assert hung_request(slot_with(1.0), now=1000.0, timeout=0) is None  # --timeout 0: never


def test_adaptive_steps_once_a_second_and_carries_its_rate() -> None:
    adaptive = pool.Adaptive(now=0.0)
    assert adaptive.next_deadline() == pool.ADAPT_PERIOD
    assert adaptive.step(0.5, 2, idle=0, min_spare=2, max_spare=4, bound=10) is None
    assert adaptive.step(1.0, 2, idle=0, min_spare=2, max_spare=4, bound=10) == 3
    assert adaptive.next_deadline() == 2.0
    assert adaptive.step(1.5, 3, idle=0, min_spare=2, max_spare=4, bound=10) is None
    assert adaptive.step(2.0, 3, idle=0, min_spare=2, max_spare=4, bound=10) == 5  # rate 2
    assert adaptive.step(3.0, 5, idle=9, min_spare=2, max_spare=4, bound=10) == 4  # shrink by 1


def test_rolling_reload_with_retiring_workers_that_take_their_time() -> None:
    """A rolling reload of 3, where a retired worker lives on for 3 more turns (finishing a
    long request) and a new one needs 2 turns to be ready. Every turn: between N and N+1
    processes alive, at least N-1 serving, and the reload completes."""
    n, next_pid = 3, 10
    workers = {pid: pool.WorkerView(pid, pid, 1, float(pid), True) for pid in (1, 2, 3)}
    age: dict[int, int] = {}  # turns since a worker was forked or retired
    for turn in range(60):
        decision = pool.plan(n, 2, "rolling", list(workers.values()))
        for pid in decision.retire:
            workers[pid] = pool.WorkerView(pid, pid, workers[pid].generation,
                                           workers[pid].spawned_at, True, True)  # fmt: skip
            age[pid] = 0
        for _ in range(decision.spawn):
            workers[next_pid] = pool.WorkerView(next_pid, next_pid, 2, float(turn), False)
            age[next_pid] = 0
            next_pid += 1
        alive = len(workers)
        serving = sum(1 for w in workers.values() if w.ready and not w.retiring)
        assert n <= alive <= n + 1 and serving >= n - 1, (turn, workers)
        for pid, w in list(workers.items()):  # one turn passes
            age[pid] = age.get(pid, 0) + 1
            if w.retiring and age[pid] >= 3:
                del workers[pid]  # it finally finished its request and exited
            elif not w.ready and age[pid] >= 2:
                workers[pid] = pool.WorkerView(pid, pid, 2, w.spawned_at, True)
        if sorted(w.generation for w in workers.values()) == [2, 2, 2]:
            break
    assert sorted(w.generation for w in workers.values()) == [2, 2, 2]
    assert all(w.ready and not w.retiring for w in workers.values())


@pytest.mark.parametrize(
    ("message", "expected"),
    [({"cmd": "status"}, commands.Command("status", None, "control")),
     ({"cmd": "scale", "n": 4}, commands.Command("scale", 4, "control")),
     ({"cmd": "incr"}, commands.Command("incr", 1, "control")),
     ({"cmd": "decr", "n": 2}, commands.Command("decr", 2, "control"))],
)  # fmt: skip
def test_commands_from_messages(message: dict, expected: commands.Command) -> None:
    assert commands.from_message(message) == expected


@pytest.mark.parametrize(
    ("message", "needle"),
    [([], '"cmd"'), ({"cmd": 3}, '"cmd"'), ({"cmd": "dance"}, "'dance'"),
     ({"cmd": "scale"}, "needs a count"), ({"cmd": "scale", "n": 0}, "at least 1"),
     ({"cmd": "scale", "n": "4"}, "whole number"), ({"cmd": "scale", "n": True}, "whole number"),
     ({"cmd": "status", "n": 1}, "takes no count"), ({"cmd": "status", "x": 1}, "unknown field")],
)  # fmt: skip
def test_bad_command_messages_are_named(message: object, needle: str) -> None:
    with pytest.raises(commands.CommandError, match=needle):
        commands.from_message(message)


def test_every_master_signal_is_a_command() -> None:
    assert commands.from_signal(signal.SIGHUP) == commands.Command("reload", None, "SIGHUP")
    assert commands.from_signal(signal.SIGTTIN) == commands.Command("incr", 1, "SIGTTIN")
    assert commands.from_signal(signal.SIGCHLD) is None
    assert {commands.from_signal(s).name for s in commands.SIGNAL_COMMANDS} <= set(
        commands.COMMANDS
    )


def test_the_master_has_one_method_per_command() -> None:
    from cluster.master import Master

    missing = [name for name in commands.COMMANDS
               if not callable(getattr(Master, "do_" + name.replace("-", "_"), None))]  # fmt: skip
    assert missing == []


def test_modes_come_from_one_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mode added to the registry is accepted by config validation and offered by the CLI,
    with its lanes; nothing else needs to know it."""
    from cluster.cli import build_parser
    from cluster.generation import Generation

    extra = Mode("turbo", "an experimental mode", modes.get("sync").serve, lambda s: 3)
    monkeypatch.setitem(modes.MODES, "turbo", extra)
    assert validate(Config(workers=1, worker_class="turbo")).worker_class == "turbo"
    args = build_parser().parse_args(["run", "-k", "turbo"])
    assert args.worker_class == "turbo"
    generation = Generation(1, Config(workers=1, worker_class="turbo"), [], {})
    try:
        assert (generation.lanes, generation.scoreboard.lane_count) == (3, 3)
    finally:
        generation.close()
    monkeypatch.delitem(modes.MODES, "turbo")
    with pytest.raises(ConfigError, match="sync, thread, fork"):
        validate(Config(workers=1, worker_class="turbo"))


def test_each_mode_sizes_its_lanes() -> None:
    sizes = Config(threads=7, max_children=11)
    assert {name: mode.lanes(sizes) for name, mode in modes.MODES.items()} == {
        "sync": 1, "thread": 7, "fork": 11,
    }  # fmt: skip
    assert [m.name for m in modes.MODES.values() if m.kills_own_overdue] == ["fork"]


def test_idle_workers_beat_several_times_per_watchdog_interval() -> None:
    from cluster.watchdog import HEARTBEAT_DEFAULT, SCANS_PER_INTERVAL, beat_period

    assert beat_period(1.0) == 1.0 / SCANS_PER_INTERVAL  # --timeout 1: a beat every 0.25 s
    assert beat_period(30.0) == 1.0 and beat_period(0) == 1.0  # at most once a second
    assert HEARTBEAT_DEFAULT / beat_period(0) >= SCANS_PER_INTERVAL


def test_generation_numbers_are_never_reused() -> None:
    from cluster.generation import Generations

    gens = Generations()
    assert [gens.next_number() for _ in range(3)] == [1, 2, 3]  # a failed reload's 2 included


def test_silent_means_idle_with_an_old_heartbeat_and_a_count_that_did_not_move() -> None:
    """The heartbeat watchdog's decision: a sync worker under load never reaches its idle
    wait (so its heartbeat ages), but its request count moves, which counts as a beat."""
    from cluster.watchdog import silent

    def view(state: str, heartbeat: float) -> SlotView:
        return SlotView(0, 1, 1, state, 0.0, heartbeat, 0, ())

    assert silent(view("idle", heartbeat=10.0), now=50.0, interval=30, quiet_since=10.0)
    assert not silent(view("idle", heartbeat=10.0), now=50.0, interval=30, quiet_since=45.0)
    assert not silent(view("idle", heartbeat=45.0), now=50.0, interval=30, quiet_since=10.0)
    assert not silent(view("busy", heartbeat=10.0), now=50.0, interval=30, quiet_since=10.0)
    assert silent(view("draining", heartbeat=10.0), now=50.0, interval=30, quiet_since=10.0)

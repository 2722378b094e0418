"""Fuzzing (hypothesis): the bind URI parser, the TOML config loader and the control protocol.

The rule: no input raises anything but the documented error type (``ConfigError`` for binds
and config files; an ``{"ok": false, "error": ...}`` reply on the control socket), and a live
master never dies of what a client sends. ``make test`` runs a few dozen examples of each
(the ``ci`` profile in conftest.py); ``make fuzz`` thousands (``HYPOTHESIS_PROFILE=fuzz``).
Every bug these found is pinned below as a plain example test, so that it stays fixed
whatever hypothesis happens to generate.
"""

from __future__ import annotations

import datetime
import json
import math
import selectors
import socket
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cluster import commands
from cluster.config import FIELD_TYPES, Config, build, read_toml
from cluster.errors import ConfigError
from cluster.listeners import BindSpec, parse_bind
from cluster.loopserver import Conn, LoopServer
from tests.conftest import Cluster, read_all, read_line, stream_roundtrip, tcp_connect
from tests.procs import alive

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- bind URIs
SCHEMES = ["", "tcp://", "udp://", "unix:", "unix-dgram:", "fd://", "unix://", "http://", "x://"]
HOSTS = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "", "[::1]", "[fe80::1%lo]", "[::1", "::1",
                     "0.0.0.0", "a..b", "-x", "[]", "[1:2:3:4:5:6:7:8:9]", "*"]),
    st.text(max_size=20),
    st.from_regex(r"[a-z0-9.-]{1,70}", fullmatch=True),
)  # fmt: skip
PORTS = st.one_of(
    st.integers(-5, 70000).map(str),
    st.sampled_from(["", "²", "١٢", "0x50", " 80", "80 ", "+80", "0" * 30, "9" * 5000]),
    st.text(max_size=6),
)
OPTION_SUFFIXES = ["=echo", "=http-hello", "=m:C", "=:C", "=m:", "=x", "?name=web", "?", "=",
                   "?name=web=m:C", "?name=", "?proxy=v2", "?name=a:b", "?name=a&name=b", "=a=b",
                   "?mode=0660", "?mode=9999", "?mode=0o777", "?mode=-1", "?owner=root",
                   "?owner=0", "?group=0", "?owner=nobody&group=nogroup", "?group=-5",
                   "?owner=99999999999999999999", "?mode=0660&owner=root=echo"]  # fmt: skip
SUFFIXES = st.one_of(
    st.just(""),
    st.sampled_from(OPTION_SUFFIXES),
    st.builds(
        lambda key, value: f"?{key}={value}",
        st.sampled_from(["mode", "owner", "group", "name"]),
        st.text(max_size=12),
    ),  # fmt: skip
    st.text(max_size=12).map(lambda text: "=" + text),
    st.text(max_size=12).map(lambda text: "?" + text),
)
BIND_TEXTS = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda scheme, host, port, suffix: f"{scheme}{host}:{port}{suffix}",
        st.sampled_from(SCHEMES),
        HOSTS,
        PORTS,
        SUFFIXES,
    ),  # fmt: skip
    st.builds(
        lambda scheme, path, suffix: f"{scheme}{path}{suffix}",
        st.sampled_from(["unix:", "unix-dgram:", "fd://"]),
        st.text(max_size=30),
        SUFFIXES,
    ),  # fmt: skip
)


@pytest.mark.fuzz
@given(BIND_TEXTS)
@example("127.0.0.1:²")  # str.isdigit takes it, int() did not: a ValueError
@example("fd://²")
@example("tcp://a\0b:80")  # reached the resolver, which raised a ValueError-like gaierror
@example("tcp://" + "x" * 300 + ":80")  # the resolver's IDNA codec raised UnicodeError
@example("127.0.0.1:" + "9" * 5000)  # int() refuses over 4300 digits: a ValueError
def test_parse_bind_raises_only_config_error(text: str) -> None:
    try:
        spec = parse_bind(text)
    except ConfigError as err:
        assert str(err).startswith("bad bind") and "\n" not in str(err).replace("\\n", "")
        return
    assert isinstance(spec, BindSpec)
    assert spec.kind in ("tcp", "udp", "unix", "unix-dgram", "fd")
    if spec.kind in ("tcp", "udp"):
        assert 0 <= spec.port <= 65535
        assert spec.host.isascii() and "\0" not in spec.host
    if spec.kind in ("unix", "unix-dgram"):
        assert spec.path and "\0" not in spec.path


@pytest.mark.parametrize("text", ["127.0.0.1:²", "fd://²", "fd://99999999999999999999",
                                  "127.0.0.1:" + "9" * 5000, "fd://" + "3" * 5000,
                                  "tcp://a\0b:80", "unix:/tmp/a\0b", "[::1%a b]:80",
                                  "tcp://" + "x" * 300 + ":80", "tcp://bücher.example:80",
                                  "[not-v6]:80", "a b:80"])  # fmt: skip
def test_parse_bind_refuses_what_would_fail_later_with_another_error(text: str) -> None:
    """Each of these once passed the parser (or raised ValueError) and then failed at bind
    time with a ValueError or UnicodeError, a traceback instead of exit 2."""
    with pytest.raises(ConfigError) as err:
        parse_bind(text)
    assert repr(text) in str(err.value)


def test_parse_bind_still_takes_scoped_ipv6_and_host_names() -> None:
    assert parse_bind("[fe80::1%lo]:80").host == "fe80::1%lo"
    assert parse_bind("tcp://my-host.example.:80").host == "my-host.example."
    assert parse_bind(":8000").host == ""


# ----------------------------------------------------------------------------- TOML files
KNOWN_KEYS = sorted(FIELD_TYPES)
KEYS = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(KNOWN_KEYS).map(lambda key: key.replace("_", "-")),
    st.text(max_size=12),
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**31, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "echo",
            "sync",
            "thread",
            "fork",
            "rolling",
            "info",
            "json",
            "-",
            "127.0.0.1:0",
            "tcp://127.0.0.1:0",
            "unix:/tmp/x.sock",
            "{pid}",
            "{",
            "a\0b",
            "{pid:>99999}",
            "nan",
        ]
    ),  # fmt: skip
    st.datetimes(),
    st.dates(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=8,
)


def toml_value(value: object) -> str:
    """A value in TOML's syntax (inline: arrays and inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, datetime.date | datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    items = (f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items())
    return "{" + ", ".join(items) + "}"


def toml_document(top: dict[str, object], tables: dict[str, dict[str, object]]) -> str:
    """Top-level keys, then ``[table]`` sections (a real key as a table is a wrong type)."""
    lines = [f"{json.dumps(key)} = {toml_value(value)}" for key, value in top.items()]
    for name, table in tables.items():
        if name in top:
            continue
        lines.append(f"[{json.dumps(name)}]")
        lines += [f"{json.dumps(key)} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


DOCUMENTS = st.one_of(
    st.builds(
        toml_document,
        st.dictionaries(KEYS, VALUES, max_size=6),
        st.dictionaries(KEYS, st.dictionaries(KEYS, SCALARS, max_size=3), max_size=2),
    ),  # fmt: skip
    st.text(max_size=200),
)
RAW_DOCUMENTS = st.one_of(
    DOCUMENTS.map(str.encode),  # surrogates cannot be encoded: those come as raw bytes
    st.binary(max_size=200),
    st.sampled_from([b"a = " + b"[" * 5000 + b"]" * 5000, b"workers = '\xff'", b"\xef\xbb\xbf"]),
)


def load(data: bytes) -> Config:
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as fh:
        fh.write(data)
    try:
        return build(read_toml(fh.name), {})
    finally:
        Path(fh.name).unlink()


@pytest.mark.fuzz
@given(RAW_DOCUMENTS)
def test_config_file_raises_only_config_error(data: bytes) -> None:
    try:
        config = load(data)
    except ConfigError as err:
        assert "\n" not in str(err).strip(), str(err)
        return
    assert isinstance(config.workers, int) and 1 <= config.workers <= 4096
    assert all(isinstance(text, str) for text in config.bind) and config.binds
    assert all(math.isfinite(config.__dict__[name]) for name in ("timeout", "keep_alive",
                                                                 "graceful_timeout"))  # fmt: skip


@pytest.mark.fuzz
@given(st.sampled_from([key for key in KNOWN_KEYS if key != "config"]), VALUES)
def test_every_real_key_with_any_value_raises_only_config_error(key: str, value: object) -> None:
    """The real keys with wrong types, huge ints, NaN, unicode, tables: each either fits its
    field's type and rules or is one ConfigError. (``config`` is the one a file may not set.)"""
    try:
        config = load(toml_document({key: value}, {}).encode("utf-8", "surrogatepass"))
    except ConfigError:
        return
    assert getattr(config, key.replace("-", "_")) == value or key == "bind"


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ("bind = 5", "--bind"),
        ("bind = [5]", "--bind"),
        ("metrics = 5", "--metrics"),
        ("log_level = 5", "--log-level"),
        ("access_log_format = 5", "--access-log-format"),
        ("access_log_format = '{time.x}'", "{time.x}"),
        ("access_log_format = '{pid:>9999999999}'", "9999"),
        ("workers = true", "--workers"),
        ("workers = 1.5", "--workers"),
        ("pidfile = 5", "--pidfile"),
        ("graceful_timeout = nan", "finite"),
        ("timeout = inf", "finite"),
        ("keep_alive = 1e300", "at most"),
        ("backlog = 99999999999999999999", "--backlog"),
        ("threads = 100000", "--threads"),
        ('pidfile = "a\\u0000b"', "NUL"),
        ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("bind = ['unix:/tmp/x.sock?owner=99999999999999999999']", "is over"),  # chown overflowed
        ("user = '²'", "no such user"),  # str.isdigit took it, int() did not
        ("user = 'root'\ngroup = '4294967295'", "is over"),
    ],
)
def test_config_values_that_once_crashed_later_are_config_errors(
    document: str, needle: str
) -> None:
    """Each passed build() and then raised TypeError, AttributeError, OverflowError or
    MemoryError further on (or in build itself); now each is one line naming it."""
    with pytest.raises(ConfigError) as err:
        load(document.encode())
    assert needle in str(err.value)


def test_a_config_file_that_is_not_utf8_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(b"workers = '\xff'")


# ----------------------------------------------------------------------------- control
SAFE = ("status", "config", "reopen-logs")  # commands the fuzz may really run
TARGET, BOUND = 2, 4  # the fuzzed master's pool: -w 2 --max-workers 4


def would_act(line: bytes) -> bool:
    """A line the master would carry out and that changes the cluster (stop, reload, a
    scale it accepts...): the fuzz leaves those out. Scaling commands that the master must
    refuse (past the bound, below 1) stay in: their refusal is part of what is checked."""
    try:
        command = commands.from_message(json.loads(line), origin="fuzz")
    except (ValueError, RecursionError):
        return False
    if command.name in SAFE:
        return False
    if command.name in commands.TAKES_COUNT:
        try:
            commands.target_after(command, TARGET, BOUND)
        except commands.Refused:
            return False
    return True


def expect_ok(line: bytes) -> bool:
    try:
        command = commands.from_message(json.loads(line), origin="fuzz")
    except (ValueError, RecursionError):
        return False
    return command.name in SAFE


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=10))  # fmt: skip
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=6,
)
COMMAND_NAMES = st.one_of(st.sampled_from(sorted(commands.COMMANDS)), st.text(max_size=10),
                          JSON_VALUES)  # fmt: skip
COMMAND_OBJECTS = st.builds(
    lambda cmd, n, extra: json.dumps({"cmd": cmd, **({"n": n} if n is not ... else {}), **extra}),
    COMMAND_NAMES,
    st.one_of(st.just(...), JSON_VALUES, st.integers(-3, 10), st.sampled_from([10**30, 1e400])),
    st.one_of(st.just({}), st.dictionaries(st.text(max_size=4), JSON_LEAVES, max_size=2)),
)
LINES = st.one_of(
    COMMAND_OBJECTS.map(str.encode),
    COMMAND_OBJECTS.map(lambda text: text[: len(text) // 2].encode()),  # partial JSON
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40).map(lambda data: data.replace(b"\n", b"")),
    st.sampled_from(
        [
            b"[" * 30000,
            b"{" * 30000,
            b'{"cmd": "status"' + b" " * 70000 + b"}",
            b"\xff\xfe",
            b"NaN",
            b'{"cmd": "scale", "n": 1e400}',
            b'{"cmd": "scale", "n": ' + b"9" * 5000 + b"}",
        ]
    ),  # fmt: skip
)
PAYLOADS = st.tuples(st.lists(LINES, min_size=1, max_size=6), st.booleans())


@pytest.fixture(scope="module")
def fuzzed_master():
    """One master for all the control fuzz examples; ended by pid at the end."""
    place = Path(tempfile.mkdtemp(prefix="fuzz-ctl-"))
    path = place / "c.ctl"
    cluster = Cluster(["echo", "-w", str(TARGET), "--max-workers", str(BOUND),
                       "-b", "127.0.0.1:0", "--control", str(path)])  # fmt: skip
    try:
        cluster.wait_ready()
        cluster.workers()
        yield cluster, path
    finally:
        cluster.end()
        for leftover in place.iterdir():
            leftover.unlink()
        place.rmdir()


def converse(path: Path, payload: bytes) -> list[bytes]:
    """Send ``payload`` on a fresh connection, end our side, read every reply line until the
    master closes (or drops us)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a line over the bound: refused and dropped while we still sent
        data = read_all(sock)
    return [line for line in data.split(b"\n") if line]


@pytest.mark.fuzz
@given(PAYLOADS)
@example(([b"[" * 30000], True))  # killed the master: RecursionError out of json.loads
def test_control_socket_answers_garbage_with_errors_and_the_master_lives(
    fuzzed_master, payload: tuple[list[bytes], bool]
) -> None:
    cluster, path = fuzzed_master
    lines, newline_at_end = payload
    lines = [line for line in lines if not would_act(line)] or [b"garbage"]
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    complete = [line for line in data.split(b"\n")[:-1] if line.strip()]
    replies = converse(path, data)
    for raw in replies:
        reply = json.loads(raw)
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), raw
        if not reply["ok"]:
            assert isinstance(reply.get("error"), str) and reply["error"], raw
    too_long = any(len(part) > 65536 for part in data.split(b"\n")) or len(data) > 65536
    if not too_long:
        assert [json.loads(raw)["ok"] for raw in replies] == [expect_ok(x) for x in complete]
    else:
        assert len(replies) <= len(complete) + 1
    assert alive(cluster.pid), cluster.log
    assert stream_roundtrip(tcp_connect(cluster.address()), b"still here") == b"still here"


def test_deeply_nested_json_on_the_control_socket_is_an_error_reply(fuzzed_master) -> None:
    cluster, path = fuzzed_master
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"[" * 30000 + b"\n")
        assert json.loads(read_line(sock)) == {"ok": False, "error": "bad JSON: nested too deeply"}
        sock.sendall(b'{"cmd": "status"}\n')  # the same connection serves on
        assert json.loads(read_line(sock))["pid"] == cluster.pid
    assert alive(cluster.pid)


# ----------------------------------------------------------------------------- loop servers
class Faulty(LoopServer):
    """A protocol with a bug: every message raises."""

    def split(self, conn: Conn) -> list[bytes]:
        *lines, rest = bytes(conn.inbuf).split(b"\n")
        conn.inbuf[:] = rest
        return lines

    def respond(self, conn: Conn, message: bytes) -> bytes:
        raise ZeroDivisionError("a bug")


def test_a_loop_server_bug_drops_its_client_not_the_master(caplog) -> None:
    """Whatever a loop server's protocol raises costs that connection only (logged): the
    master's loop, which calls it, goes on serving the others."""
    selector = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_UNIX)
    place = tempfile.mkdtemp(prefix="loop-")
    listener.bind(f"{place}/s")
    listener.listen()
    server = Faulty(listener, selector, f"unix:{place}/s")
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(f"{place}/s")
        client.sendall(b"boom\n")
        client.settimeout(5)
        for _ in range(10):  # accept, then the message
            for key, mask in selector.select(1):
                key.data(mask)
            if not server.conns and "a bug" in caplog.text:
                break
        assert not server.conns and "dropping" in caplog.text and "ZeroDivisionError" in caplog.text
        assert client.recv(10) == b""
    finally:
        client.close()
        server.close()
        selector.close()
        Path(f"{place}/s").unlink(missing_ok=True)
        Path(place).rmdir()

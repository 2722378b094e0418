"""The PROXY protocol parser, against the spec's own examples (haproxy's
doc/proxy-protocol.txt), HAProxy's real headers, and fuzzing; the header read over a real
socket pair; and the pure rules of who may connect."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import Config, build, read_toml, validate
from cluster.errors import ConfigError
from cluster.listeners import parse_bind
from cluster.sources import Rules, rules_for
from tests.procs import every
from tests.test_bad_input import assert_one_line_error, run_cluster
from workers.runtime.gate import Rejected, ReplyThroughProxy, contains, read_header
from workers.runtime.proxyproto import (
    LOCAL,
    PROXY,
    SIGNATURE,
    VERSIONS,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    crc32c,
    parse,
)
from workers.runtime.scoreboard import REJECT_REASONS

pytestmark = pytest.mark.timeout(30)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))  # make fuzz runs many more
fuzz_settings = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


# ----------------------------------------------------------------------- the spec's v1
def test_the_spec_v1_example_before_an_http_request() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    header = parse(data)
    assert header == ProxyHeader(1, PROXY, "inet", "stream", ("192.168.0.1", 56324),
                                 ("192.168.0.11", 443), 47)  # fmt: skip
    assert data[header.length :].startswith(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("line", "source"),
    [
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", ("255.255.255.255", 65535)),
        (b"PROXY TCP6 " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
         + b" 65535 65535\r\n", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" " + b":".join([b"ffff"] * 8)
         + b" 65535 65535\r\n", None),
    ],
)  # fmt: skip
def test_the_spec_v1_longest_lines(line: bytes, source: object) -> None:
    """The spec's maximum lengths: 56, 104, 15 and (the worst case) 107 bytes."""
    assert len(line) in (56, 104, 15, 107)
    header = parse(line + b"data")
    assert header is not None and header.length == len(line) and header.source == source


def test_v1_unknown_ignores_the_rest_of_its_line_and_names_no_client() -> None:
    header = parse(b"PROXY UNKNOWN whatever the sender put here\r\nrest")
    assert header is not None and not header.proxied and header.length == 44


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",  # heading zero in a port
        b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",  # heading zero in an address
        b"PROXY TCP4 192.168.0.1 192.168.0.11 +80 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",  # LF alone
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rx\r\n",  # CR alone
        b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",  # two spaces
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # the family says IPv4
        b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone is no canonical address
        b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
        b"PROXY TCP4 \xff.2.3.4 1.2.3.4 1 2\r\n",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY UNKNOWN" + b" " * 94 + b"\r\n",  # the CRLF past the 107th byte
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello
    ],
)
def test_v1_refuses_what_does_not_match_exactly(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(line)


def test_garbage_is_refused_at_its_first_wrong_byte_not_at_the_deadline() -> None:
    assert parse(b"PROX") is None
    for early in (b"PROXX", b"G", b"\r\n\r\n\x01", b"PROXY TCP4 1.2.3.4\n"):
        with pytest.raises(ProxyHeaderError):
            parse(early)
    with pytest.raises(ProxyHeaderError):  # no CRLF within the first 107 bytes
        parse(b"PROXY UNKNOWN" + b"x" * 100)


# ----------------------------------------------------------------------- the spec's v2
def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    return SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(block)) + block


IPV4_BLOCK = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1234, 80)
IPV6_BLOCK = (ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("::1").packed
              + struct.pack("!HH", 1234, 80))  # fmt: skip
UNIX_BLOCK = b"/run/client.sock".ljust(108, b"\0") + b"/run/server.sock".ljust(108, b"\0")


@pytest.mark.parametrize(
    ("fam", "block", "family", "transport", "source"),
    [
        (0x11, IPV4_BLOCK, "inet", "stream", ("10.0.0.1", 1234)),
        (0x12, IPV4_BLOCK, "inet", "dgram", ("10.0.0.1", 1234)),
        (0x21, IPV6_BLOCK, "inet6", "stream", ("2001:db8::1", 1234)),
        (0x22, IPV6_BLOCK, "inet6", "dgram", ("2001:db8::1", 1234)),
        (0x31, UNIX_BLOCK, "unix", "stream", "/run/client.sock"),
        (0x32, UNIX_BLOCK, "unix", "dgram", "/run/client.sock"),
        (0x00, b"", "unspec", "unspec", None),
    ],
)
def test_the_spec_v2_protocol_bytes(fam: int, block: bytes, family: str, transport: str,
                                    source: object) -> None:  # fmt: skip
    """Each of the spec's "in practice" family and transport bytes, with its address length
    (12, 36, 216), under the PROXY command."""
    data = v2(0x21, fam, block)
    header = parse(data + b"client bytes")
    assert header is not None
    assert (header.version, header.command, header.family, header.transport) == (
        2, PROXY, family, transport)  # fmt: skip
    assert header.source == source and header.length == len(data)
    assert header.proxied == (source is not None)


def test_haproxy_send_proxy_v2_as_captured_on_the_wire() -> None:
    """HAProxy's header for a TCP/IPv4 client 172.19.0.1:42578 to 172.19.0.3:80, and the
    client's request right behind it (one read, as haproxy sends them)."""
    wire = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")
    header = parse(wire + b"GET / HTTP/1.1\r\n")
    assert header is not None and header.length == 28
    assert header.source == ("172.19.0.1", 42578) and header.destination == ("172.19.0.3", 80)


# HAProxy 2.6's own headers, captured from `server s1 ... send-proxy-v2 proxy-v2-options
# unique-id,authority,crc32c,ssl check`: its health check, and a client 127.0.0.9:40001 that
# connected to its frontend 127.0.0.1:18441 and sent "hello\n".
HAPROXY_CHECK = bytes.fromhex("0d0a0d0a000d0a515549540a2000000f030004889da1df2000050000000000")
HAPROXY_CLIENT = bytes.fromhex(
    "0d0a0d0a000d0a515549540a211100477f0000097f0000019c414809030004bc9f39a905002937463030"
    "303030393a394334315f37463030303030313a343830395f36423045434346375f3030303020000500"
    "0000000068656c6c6f0a"
)


def test_haproxy_26_send_proxy_v2_with_crc32c_unique_id_and_ssl() -> None:
    header = parse(HAPROXY_CLIENT)
    assert header is not None and HAPROXY_CLIENT[header.length :] == b"hello\n"
    assert header.source == ("127.0.0.9", 40001) and header.destination == ("127.0.0.1", 18441)
    assert [kind for kind, _ in header.tlvs] == [0x03, 0x05, 0x20]  # CRC32C, UNIQUE_ID, SSL
    assert dict(header.tlvs)[0x05] == b"7F000009:9C41_7F000001:4809_6B0ECCF7_0000"
    corrupted = bytearray(HAPROXY_CLIENT)
    corrupted[19] ^= 0x01  # the client's address, 127.0.0.8: the checksum catches it
    with pytest.raises(ProxyHeaderError):
        parse(bytes(corrupted))
    check = parse(HAPROXY_CHECK)
    assert check is not None and check.command == LOCAL and check.length == len(HAPROXY_CHECK)


def haproxy_tlvs() -> tuple[tuple[int, bytes], ...]:
    """What HAProxy may append: ALPN, AUTHORITY, UNIQUE_ID, SSL with its sub-TLVs, NETNS, and
    a cloud load balancer's custom type (AWS's 0xEA)."""
    ssl_subs = (struct.pack("!BH", 0x21, 7) + b"TLSv1.3" + struct.pack("!BH", 0x22, 11)
                + b"example.com")  # fmt: skip
    return ((0x01, b"h2"), (0x02, b"example.com"), (0x05, os.urandom(32)),
            (0x20, b"\x07" + struct.pack("!I", 0) + ssl_subs), (0x30, b"blue"),
            (0xEA, b"\x01vpce-0123"))  # fmt: skip


def test_v2_tlvs_are_kept_in_order_and_noop_is_dropped() -> None:
    tlvs = haproxy_tlvs()
    data = build_v2(("192.0.2.7", 5555), ("198.51.100.1", 443), tlvs=(*tlvs, (0x04, b"\0" * 5)))
    header = parse(data + b"x")
    assert header is not None and header.length == len(data)
    assert header.tlvs == tlvs and header.source == ("192.0.2.7", 5555)


def test_v2_crc32c_is_verified_when_present() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    good = build_v2(("192.0.2.7", 5555), ("198.51.100.1", 443), tlvs=haproxy_tlvs(),
                    checksum=True)  # fmt: skip
    assert parse(good) is not None
    # A flipped bit in the addresses or the TLVs. (The ones that make the header LOCAL or
    # unspecified leave nothing to trust: its block is then ignored, checksum and all.)
    for at in (16, 20, 30, len(good) - 1):
        bad = bytearray(good)
        bad[at] ^= 0x01
        with pytest.raises(ProxyHeaderError):
            parse(bytes(bad))


def test_v2_local_skips_its_block_whatever_it_holds() -> None:
    """LOCAL (HAProxy's health checks): the block is discarded, family and all, and its
    length still counts: "must not assume zero is presented for LOCAL connections"."""
    for data in (v2(0x20, 0x00, b""), v2(0x20, 0x11, IPV4_BLOCK), v2(0x20, 0x00, b"\xff" * 9)):
        header = parse(data + b"PING\r\n")
        assert header is not None and header.command == LOCAL and not header.proxied
        assert header.length == len(data)


@pytest.mark.parametrize(
    "data",
    [
        SIGNATURE + b"\x11\x11\x00\x0c" + IPV4_BLOCK,  # version 1 in the version nibble
        SIGNATURE + b"\x22\x11\x00\x0c" + IPV4_BLOCK,  # command 2
        SIGNATURE + b"\x21\x41\x00\x0c" + IPV4_BLOCK,  # family 4
        SIGNATURE + b"\x21\x13\x00\x0c" + IPV4_BLOCK,  # transport 3
        v2(0x21, 0x11, IPV4_BLOCK[:11]),  # an address block too short for IPv4
        v2(0x21, 0x21, IPV4_BLOCK),  # ... for IPv6
        v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x05ab"),  # a TLV longer than the header
        v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"),  # a header that ends inside a TLV
        v2(0x21, 0x11, IPV4_BLOCK + b"\x03\x00\x02ab"),  # a CRC32C of 2 bytes
        b"\r\n\r\n\x00\r\nQUIT\r",
    ],
)
def test_v2_refuses_bad_headers(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


@pytest.mark.parametrize(
    "data",
    [
        build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)),
        build_v2(("2001:db8::5", 1), ("::1", 2), tlvs=haproxy_tlvs(), checksum=True),
        build_v2("/a", "/b"),
        build_v2(command=LOCAL),
    ],
)
def test_every_prefix_of_a_header_asks_for_more(data: bytes) -> None:
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, cut
    assert parse(data) is not None


def test_the_version_setting_takes_only_its_version() -> None:
    line, binary = build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)), build_v2(command=LOCAL)
    assert parse(line, "v1") is not None and parse(binary, "v2") is not None
    with pytest.raises(ProxyHeaderError):
        parse(binary, "v1")
    with pytest.raises(ProxyHeaderError):
        parse(line, "v2")


# --------------------------------------------------------------------------- fuzzing
def assert_parses_or_refuses(data: bytes, versions: str) -> None:
    """The parser's one promise: a header, None, or ProxyHeaderError; a header is at most
    the input, and is the same header when parsed again from its own bytes."""
    try:
        header = parse(data, versions)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert parse(data[: header.length], versions) == header


@pytest.mark.fuzz
@fuzz_settings
@given(data=st.binary(max_size=300), versions=st.sampled_from(VERSIONS))
def test_fuzz_any_bytes(data: bytes, versions: str) -> None:
    assert_parses_or_refuses(data, versions)


@pytest.mark.fuzz
@fuzz_settings
@given(
    rest=st.binary(max_size=120),
    start=st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                           SIGNATURE, SIGNATURE + b"\x21", SIGNATURE + b"\x21\x11",
                           SIGNATURE + b"\x20"]),
)  # fmt: skip
def test_fuzz_bytes_after_a_valid_start(start: bytes, rest: bytes) -> None:
    assert_parses_or_refuses(start + rest, "any")


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
tlv_lists = st.lists(st.tuples(st.integers(0, 255).filter(lambda t: t not in (3, 4)),
                               st.binary(max_size=40)), max_size=4).map(tuple)  # fmt: skip


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, tuple | str | None]:
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v2-4", "v2-6", "v2-unix", "v2-local"]))
    if kind.startswith("v1"):
        host = draw(ipv4 if kind == "v1-4" else ipv6)
        source = (host, draw(ports))
        return build_v1(source, (host, draw(ports))), source
    if kind == "v2-local":
        return build_v2(command=LOCAL, tlvs=draw(tlv_lists)), None
    if kind == "v2-unix":
        path = draw(st.binary(min_size=1, max_size=107).filter(lambda p: b"\0" not in p))
        source = os.fsdecode(path)
        return build_v2(source, source, tlvs=draw(tlv_lists)), source
    host = draw(ipv4 if kind == "v2-4" else ipv6)
    source = (host, draw(ports))
    data = build_v2(source, (host, draw(ports)), tlvs=draw(tlv_lists),
                    transport=draw(st.sampled_from(["stream", "dgram"])),
                    checksum=draw(st.booleans()))  # fmt: skip
    return data, source


@pytest.mark.fuzz
@fuzz_settings
@given(made=valid_headers(), trailer=st.binary(max_size=40), cut=st.integers(0, 400))
def test_fuzz_valid_headers_round_trip_and_their_prefixes_ask_for_more(
    made: tuple[bytes, object], trailer: bytes, cut: int
) -> None:
    data, source = made
    header = parse(data + trailer)
    assert header is not None and header.length == len(data) and header.source == source
    if cut < len(data):
        assert parse(data[:cut]) is None


@pytest.mark.fuzz
@fuzz_settings
@given(made=valid_headers(), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)),
                                            min_size=1, max_size=4))  # fmt: skip
def test_fuzz_corrupted_headers(made: tuple[bytes, object], flips: list[tuple[int, int]]) -> None:
    data = bytearray(made[0])
    for at, mask in flips:
        data[at % len(data)] ^= mask
    assert_parses_or_refuses(bytes(data), "any")


# ------------------------------------------------------------ the header read, on sockets
@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_the_read_takes_exactly_the_header_and_leaves_the_client_bytes(pair) -> None:
    ours, theirs = pair
    data = build_v2(("192.0.2.9", 4242), ("192.0.2.1", 80), tlvs=haproxy_tlvs())
    theirs.sendall(data + b"GET / HTTP/1.1\r\n")
    header = read_header(ours, "any", 1.0)
    assert header.source == ("192.0.2.9", 4242)
    assert ours.recv(100) == b"GET / HTTP/1.1\r\n"
    assert ours.gettimeout() is None  # the socket's own timeout, back as it was


def test_the_read_gathers_a_header_sent_in_pieces(pair) -> None:
    ours, theirs = pair
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 61000 443\r\n"
    pieces = [line[:3], line[3:20], line[20:-1], line[-1:] + b"hello"]

    sender = threading.Thread(target=every, args=(0.02, len(pieces),
                                                  lambda n: theirs.sendall(pieces[n])))  # fmt: skip
    sender.start()
    header = read_header(ours, "v1", 2.0)
    sender.join()
    assert header.source == ("2001:db8::7", 61000)
    assert ours.recv(100) == b"hello"


def test_the_read_has_one_deadline_for_the_whole_header(pair) -> None:
    ours, theirs = pair
    stop = threading.Event()

    def drip() -> None:
        for byte in SIGNATURE:
            if stop.wait(0.05):  # one byte per 50 ms: each in time, the whole too late
                return
            theirs.sendall(bytes([byte]))

    dripper = threading.Thread(target=drip)
    dripper.start()
    started = time.monotonic()
    with pytest.raises(Rejected) as rejected:
        read_header(ours, "any", 0.3)
    stop.set()
    dripper.join()
    assert REJECT_REASONS[rejected.value.reason] == "timeout"
    assert 0.25 < time.monotonic() - started < 1.5


@pytest.mark.parametrize(("sent", "why"), [(b"GET / HTTP/1.0\r\n", "bad PROXY header"),
                                           (b"PROXY TCP4", "closed before")])  # fmt: skip
def test_the_read_refuses_garbage_and_an_early_close(pair, sent: bytes, why: str) -> None:
    ours, theirs = pair
    theirs.sendall(sent)
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(Rejected) as rejected:
        read_header(ours, "any", 1.0)
    assert REJECT_REASONS[rejected.value.reason] == "proxy" and why in str(rejected.value)


def test_replies_to_a_proxied_datagram_client_go_to_the_proxy() -> None:
    sent: list[tuple] = []

    class Sock:
        def sendto(self, data: bytes, *args: object) -> int:
            sent.append(args)
            return len(data)

    reply = ReplyThroughProxy(Sock(), ("127.0.0.1", 9), ("192.0.2.1", 53))  # type: ignore[arg-type]
    reply.sendto(b"x", ("192.0.2.1", 53))
    reply.sendto(b"x", 0, ("192.0.2.1", 53))
    reply.sendto(b"x", ("127.0.0.5", 7))  # someone else: as asked
    assert sent == [(("127.0.0.1", 9),), (0, ("127.0.0.1", 9)), (("127.0.0.5", 7),)]


# --------------------------------------------------------------------- who may connect
def test_networks_match_ipv4_mapped_peers_and_nothing_that_is_no_address() -> None:
    nets = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert contains(nets, "127.0.0.2") and contains(nets, "::ffff:127.0.0.1")
    assert contains(nets, "2001:db8::1")
    assert not contains(nets, "10.0.0.1") and not contains(nets, "/run/x.sock")


def test_rules_per_listener_kind() -> None:
    loopback, ten = ["127.0.0.0/8"], ("10.0.0.0/8",)
    tcp = rules_for("tcp", None, (), ["192.0.2.0/24"], loopback)
    assert tcp == Rules("", (ipaddress.ip_network("192.0.2.0/24"),), ())
    assert rules_for("tcp", None, ten, ["192.0.2.0/24"], loopback).allow == (
        ipaddress.ip_network("10.0.0.0/8"),)  # fmt: skip
    assert rules_for("unix", None, (), ["192.0.2.0/24"], loopback) == Rules()  # file mode decides
    proxied_unix = rules_for("unix", "v2", (), ["192.0.2.0/24"], loopback)
    assert proxied_unix.allow and not proxied_unix.proxy_allow  # a unix peer has no address
    assert rules_for("udp", "any", (), [], loopback).proxy_allow == (
        ipaddress.ip_network("127.0.0.0/8"),)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("tcp://127.0.0.1:0?proxy=v3", "'v3'"),
        ("tcp://127.0.0.1:0?allow=10.0.0.300/8", "10.0.0.300/8"),
        ("tcp://127.0.0.1:0?allow=10.0.0.0/8,nope", "nope"),
        ("udp://127.0.0.1:0?proxy=v1", "datagrams take proxy=v2"),
        ("unix:/tmp/x.sock?allow=10.0.0.0/8", "file mode"),
    ],
)
def test_bind_options_refuse_bad_values_naming_them(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bind(text)
    assert needle in str(err.value) and repr(text) in str(err.value)


def test_bind_options_parse_proxy_and_allow_with_a_handler() -> None:
    spec = parse_bind("tcp://[::1]:0?proxy=v2&allow=::1/128,10.0.0.0/8&allow=fd00::/8=m:H")
    assert spec.proxy == "v2" and spec.handler == "m:H"
    assert spec.allow == ("::1/128,10.0.0.0/8", "fd00::/8")
    assert parse_bind("unix:/tmp/x.sock?proxy=v1&allow=10.0.0.0/8").proxy == "v1"


def test_config_lists_of_sources_from_flags_files_and_the_library(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('allow-from = "10.0.0.0/8"\nproxy-allow = ["10.1.2.3", "fd00::/8"]\n')
    config = build(read_toml(str(path)), {})
    assert config.allow_from == ["10.0.0.0/8"] and config.proxy_allow == ["10.1.2.3", "fd00::/8"]
    assert build({}, {"allow_from": ("127.0.0.1",)}).allow_from == ["127.0.0.1"]  # a tuple
    assert Config().proxy_allow == ["127.0.0.0/8", "::1/128"]  # loopback by default
    for bad, needle in ((["10.0.0.300/8"], "10.0.0.300/8"), (["a,10.0.0.0/8"], "'a'"),
                        (5, "--allow-from")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            build({}, {"allow_from": bad})
        assert needle in str(err.value)
    with pytest.raises(ConfigError) as err:  # nobody could send the header it requires
        validate(Config(bind=["tcp://127.0.0.1:0?proxy=v2"], proxy_allow=[]))
    assert "--proxy-allow is empty" in str(err.value)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--allow-from", "10.0.0.300/8"], "10.0.0.300/8"),
        (["--proxy-allow", "127.0.0.1,nope"], "'nope'"),
        (["-b", "tcp://127.0.0.1:0?proxy=v9"], "v9"),
        (["-b", "unix:/tmp/never.sock?allow=10.0.0.0/8"], "never.sock"),
    ],
)
def test_bad_sources_on_the_command_line_exit_2_in_one_line(args: list[str], needle: str) -> None:
    assert_one_line_error(run_cluster(*args), 2, needle)

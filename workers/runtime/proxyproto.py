"""The PROXY protocol, versions 1 and 2, parsed from bytes with no I/O (haproxy's
``doc/proxy-protocol.txt`` is the spec; the section numbers below are its).

A proxy in front of us (HAProxy ``send-proxy``/``send-proxy-v2``, nginx ``proxy_protocol``,
a cloud load balancer) writes one header at the start of each connection, or of each
datagram, saying who the original client was. ``parse(data)`` looks at the bytes received so
far and answers one of three things:

- ``None``: so far so good, but the header is not complete: read more;
- a ``ProxyHeader``, whose ``length`` is the number of bytes the header took (the bytes after
  it belong to the client's own protocol and must reach the handler untouched);
- ``ProxyHeaderError``: these bytes cannot be the start of a valid header. It is the only
  exception ``parse`` raises, whatever the input (the fuzz tests hold it to that).

It never guesses (section 5): a listener configured for the protocol takes a header or
nothing. Garbage is refused as soon as a byte proves it garbage, so that a client speaking
something else is cut at once rather than at the header's deadline.

Why not the ``proxy-protocol`` package from PyPI: it has the sans-I/O shape we need, but a
short v2 address block raises ``struct.error`` and a non-ASCII v1 address a
``UnicodeDecodeError`` (neither its documented errors), v1 ports such as ``+80`` pass, and
its other half is asyncio. The spec is short; this module is written from it.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # the v2 header's first 12 bytes (section 2.2)
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (section 2.1)
V2_FIXED = 16  # signature, version and command, family and transport, length
VERSIONS = ("v1", "v2", "any")  # what a listener may accept (``?proxy=``)

LOCAL, PROXY = "LOCAL", "PROXY"
FAMILIES = {0x0: "unspec", 0x1: "inet", 0x2: "inet6", 0x3: "unix"}
TRANSPORTS = {0x0: "unspec", 0x1: "stream", 0x2: "dgram"}
ADDRESS_LENGTHS = {"inet": 12, "inet6": 36, "unix": 216}  # the address block of each family

PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04

Address = tuple[str, int] | str | None


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header (the message says how)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``source`` and ``destination`` are ``(host, port)`` for inet and inet6, a path for unix,
    and None when the header carries no addresses to use: the ``LOCAL`` command (the proxy's
    own connection, its health checks), v1 ``UNKNOWN``, or an unspecified family or transport.
    Then the connection's real endpoints stand (``proxied`` is False).
    """

    version: int  # 1 or 2
    command: str  # PROXY or LOCAL (v1 knows only PROXY)
    family: str  # inet | inet6 | unix | unspec
    transport: str  # stream | dgram | unspec
    source: Address
    destination: Address
    length: int  # bytes the header took, from the first
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2's type-length-value extensions, in order

    @property
    def proxied(self) -> bool:
        """The header names the original client: the handler sees ``source``."""
        return self.source is not None


def parse(data: bytes, versions: str = "any") -> ProxyHeader | None:
    """The header at the start of ``data``, None while incomplete, or ProxyHeaderError.

    ``versions`` is a listener's ``?proxy=`` setting: ``v1``, ``v2`` or ``any``.
    """
    if versions not in VERSIONS:
        raise ProxyHeaderError(f"unknown PROXY protocol version setting {versions!r}")
    data = bytes(data)
    if not data:
        return None
    if versions != "v1" and data[0] == SIGNATURE[0]:
        return _parse_v2(data)
    if versions != "v2" and data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    wanted = {"v1": "a PROXY v1 line", "v2": "a PROXY v2 header"}.get(versions, "a PROXY header")
    raise ProxyHeaderError(f"expected {wanted}, got {data[:8]!r}")


# ------------------------------------------------------------------------------- version 1
def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError(f"expected a PROXY v1 line, got {head!r}")
    window = data[:V1_MAX]
    end = window.find(b"\r\n")
    if end < 0:
        lone = window.find(b"\n")
        if lone >= 0 or b"\r" in window[:-1]:
            raise ProxyHeaderError("PROXY v1 line ends without CRLF")
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    line = window[len(V1_PREFIX) : end]
    if b"\n" in line or b"\r" in line:
        raise ProxyHeaderError("PROXY v1 line ends without CRLF")
    length = end + 2
    parts = line.split(b" ")
    if parts[0] == b"UNKNOWN":  # the rest of the line is to be ignored (section 2.1)
        return ProxyHeader(1, PROXY, "unspec", "unspec", None, None, length)
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"bad PROXY v1 line {data[:length]!r}")
    family = "inet" if parts[0] == b"TCP4" else "inet6"
    source_host = _v1_address(parts[1], family)
    destination_host = _v1_address(parts[2], family)
    source = (source_host, _v1_port(parts[3]))
    destination = (destination_host, _v1_port(parts[4]))
    return ProxyHeader(1, PROXY, family, "stream", source, destination, length)


def _v1_address(text: bytes, family: str) -> str:
    """A v1 address in its canonical form: IPv4 dotted decimal without leading zeroes,
    IPv6 in hex groups without a zone. (An IPv4-mapped address in its dotted form passes:
    HAProxy writes a dual-stack listener's IPv4 clients that way, with ``inet_ntop``.)"""
    try:
        if family == "inet":
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        if b"%" in text:
            raise ValueError(text)
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:  # UnicodeDecodeError and AddressValueError are ValueErrors
        raise ProxyHeaderError(f"bad {family} address {text!r} in PROXY v1 line") from None


def _v1_port(text: bytes) -> int:
    """A decimal port, 0..65535, without sign, spaces or leading zeroes."""
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0:1] == b"0"):
        raise ProxyHeaderError(f"bad port {text!r} in PROXY v1 line")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"bad port {text!r} in PROXY v1 line")
    return port


# ------------------------------------------------------------------------------- version 2
def _parse_v2(data: bytes) -> ProxyHeader | None:
    known = data[: len(SIGNATURE)]
    if not SIGNATURE.startswith(known):
        raise ProxyHeaderError(f"expected a PROXY v2 header, got {known!r}")
    if len(data) > 12 and data[12] >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {data[12] >> 4}, not 2")
    if len(data) > 12 and data[12] & 0xF not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {data[12] & 0xF}")
    if len(data) > 13 and (data[13] >> 4 not in FAMILIES or data[13] & 0xF not in TRANSPORTS):
        raise ProxyHeaderError(f"PROXY v2 header with unknown family/transport {data[13]:#04x}")
    if len(data) < V2_FIXED:
        return None
    length = V2_FIXED + struct.unpack_from("!H", data, 14)[0]
    if len(data) < length:
        return None
    command = PROXY if data[12] & 0xF else LOCAL
    family, transport = FAMILIES[data[13] >> 4], TRANSPORTS[data[13] & 0xF]
    block = data[V2_FIXED:length]
    if command == LOCAL:
        # The proxy's own connection: its block, family included, is discarded unread
        # (section 2.2), whatever it holds.
        return ProxyHeader(2, LOCAL, family, transport, None, None, length)
    if family == "unspec" or transport == "unspec":
        # Nothing we can use: the connection's real endpoints stand, and the block is
        # ignored (section 2.2: where its addresses would end is not ours to guess).
        return ProxyHeader(2, PROXY, family, transport, None, None, length)
    needed = ADDRESS_LENGTHS[family]
    if len(block) < needed:
        raise ProxyHeaderError(
            f"PROXY v2 {family} address block of {len(block)} bytes, needs {needed}"
        )
    source, destination = _v2_addresses(family, block)
    tlvs = _tlvs(data, length, needed)
    return ProxyHeader(2, PROXY, family, transport, source, destination, length, tlvs)


def _v2_addresses(family: str, block: bytes) -> tuple[Address, Address]:
    if family == "inet":
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport)
    if family == "inet6":
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
        return (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport)
    return _unix_path(block[:108]), _unix_path(block[108:216])


def _unix_path(raw: bytes) -> str:
    """A 108-byte ``sun_path``: up to its first NUL, decoded as the OS decodes file names
    (an abstract address, which starts with a NUL, comes out empty)."""
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _tlvs(data: bytes, length: int, address_length: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs after the address block, each checked to fit in the header; a CRC32C TLV is
    verified over the whole header (section 2.2.3). Types we do not use are kept, not read."""
    found = []
    at = V2_FIXED + address_length
    while at < length:
        if length - at < 3:
            raise ProxyHeaderError("PROXY v2 header ends inside a TLV")
        kind, size = data[at], struct.unpack_from("!H", data, at + 1)[0]
        if at + 3 + size > length:
            raise ProxyHeaderError(f"PROXY v2 TLV {kind:#04x} of {size} bytes overruns the header")
        value = data[at + 3 : at + 3 + size]
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyHeaderError(f"PROXY v2 CRC32C TLV of {size} bytes, not 4")
            zeroed = data[: at + 3] + b"\0\0\0\0" + data[at + 7 : length]
            if crc32c(zeroed) != struct.unpack("!I", value)[0]:
                raise ProxyHeaderError("PROXY v2 header fails its CRC32C checksum")
        if kind != PP2_TYPE_NOOP:
            found.append((kind, value))
        at += 3 + size
    return tuple(found)


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B): the checksum a v2 header may carry.

    Computed only for headers that carry one (HAProxy sends it with ``proxy-v2-options
    crc32c``); a few hundred bytes, so a table in Python is fast enough."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- building
def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line (``UNKNOWN`` without addresses): what a proxy sends; tests and tools use it."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())  # fmt: skip


def build_v2(
    source: Address = None,
    destination: Address = None,
    *,
    command: str = PROXY,
    transport: str = "stream",
    tlvs: tuple[tuple[int, bytes], ...] = (),
    checksum: bool = False,
) -> bytes:
    """A v2 header (``LOCAL``, or with no source, an unspecified one): what a proxy sends."""
    if command == LOCAL or source is None or destination is None:
        family, block = "unspec", b""
    elif isinstance(source, str) and isinstance(destination, str):
        family = "unix"
        block = os.fsencode(source).ljust(108, b"\0") + os.fsencode(destination).ljust(108, b"\0")
    else:
        assert isinstance(source, tuple) and isinstance(destination, tuple)
        ip = ipaddress.ip_address(source[0])
        family = "inet" if ip.version == 4 else "inet6"
        block = (ip.packed + ipaddress.ip_address(destination[0]).packed
                 + struct.pack("!HH", source[1], destination[1]))  # fmt: skip
    if family == "unspec":
        transport = "unspec"
    extensions = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    if checksum:
        extensions += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\0\0\0\0"
    family_code = next(code for code, name in FAMILIES.items() if name == family)
    transport_code = next(code for code, name in TRANSPORTS.items() if name == transport)
    header = SIGNATURE + bytes([0x20 | (command == PROXY), family_code << 4 | transport_code])
    header += struct.pack("!H", len(block) + len(extensions)) + block + extensions
    if checksum:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header

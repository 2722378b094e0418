"""The hand-written HTTP/1.1 client side: the one GET every lane sends and an incremental
response parser (status, headers, Content-Length, chunked, body to EOF).
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.targets import Target

MAX_HTTP_HEAD = 65536


@dataclass(frozen=True)
class HttpResponse:
    """One parsed response: enough to judge success and whether the connection stays open."""

    status: int
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    """Status line and headers; ValueError when they are not HTTP."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line[:80]!r}")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return parts[0].decode(), status, headers


def _dechunk(data: bytes, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body from ``data[start:]``: (body, end) or None while incomplete."""
    chunks = []
    pos = start
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(data[pos:eol].split(b";", 1)[0].strip(), 16)  # ValueError: unparseable
        pos = eol + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", pos - 2)  # no trailers: the CRLF right after 0\r\n
            return (b"".join(chunks), end + 4) if end >= 0 else None
        if len(data) < pos + size + 2:
            return None
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        chunks.append(data[pos : pos + size])
        pos += size + 2


def parse_http_response(data: bytes, eof: bool = False) -> tuple[HttpResponse, int] | None:
    """Parse one response from the start of ``data``: (response, bytes consumed), or None while
    more bytes are needed. ``eof`` says the server closed: it completes a body that runs to the
    end of the connection. Raises ValueError for anything unparseable."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_HTTP_HEAD:
            raise ValueError("response head larger than 64 KiB")
        if eof:
            raise ValueError("connection closed inside the response head")
        return None
    version, status, headers = _parse_head(data[:end])
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    start = end + 4
    if 100 <= status < 200 or status in (204, 304):
        return HttpResponse(status, headers, b"", keep_alive), start
    if "chunked" in headers.get("transfer-encoding", "").lower():
        decoded = _dechunk(data, start)
        if decoded is None:
            if eof:
                raise ValueError("connection closed inside a chunked body")
            return None
        return HttpResponse(status, headers, decoded[0], keep_alive), decoded[1]
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length < 0:
            raise ValueError("negative Content-Length")
        if len(data) < start + length:
            if eof:
                raise ValueError("connection closed inside the body")
            return None
        return HttpResponse(status, headers, data[start : start + length], keep_alive), (
            start + length
        )
    if not eof:  # the body runs until the server closes
        return None
    return HttpResponse(status, headers, data[start:], False), len(data)


def http_request(target: Target, close: bool) -> bytes:
    """The one GET every lane sends, built once."""
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "User-Agent: cluster-loadtest",
        "Accept: */*",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

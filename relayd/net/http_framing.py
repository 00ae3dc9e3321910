"""Strict HTTP/1.1 request framing on the shared port (RFC 9112), Sans-I/O.

``read_request`` is a generator-based coroutine over websockets'
``StreamReader``: fed bytes, it yields until one whole request (head and
body) has arrived, then returns it. Header lines are parsed by websockets'
own ``parse_headers``, or, when the whole section is in and every line is
one it takes as it is, the same way in one pass (``whole_headers``;
every line counts against its limit of 128; a name
with whitespace before the colon, or an obs-fold continuation line, is not a
token and is refused). Bodies are read here, which websockets' handshake
parser does not do: ``Content-Length`` of plain digits, or ``chunked`` with
strict chunk-size lines and CRLF after every chunk. Anything else raises
``BadRequest`` with the HTTP status to answer with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Generator

from websockets.datastructures import Headers
from websockets.exceptions import SecurityError
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request, parse_headers
from websockets.streams import StreamReader

from ..errors import ErrorCode

MAX_CHUNK_LINE = 128
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
"""RFC 9110's field-value with obs-text, as ``parse_headers`` checks it."""
_TARGET = re.compile(rb"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]{1,16}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[^\r\n]*)?")


class BadRequest(Exception):
    """A request that cannot be framed; ``code`` picks the HTTP answer (400, 413, 414, 431, 411)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class ParsedRequest:
    """One request as framed: websockets' ``Request`` (for ``process_request``) and its body."""

    request: Request
    body: bytes
    keep_alive: bool
    upgrade: bool


def _line(reader: StreamReader, limit: int, too_long: ErrorCode, what: str) -> Generator[None, None, bytes]:
    try:
        line = yield from reader.read_line(limit)
    except RuntimeError:  # StreamReader's own "line too long"
        raise BadRequest(too_long, f"{what} is longer than {limit} bytes") from None
    if not line.endswith(b"\r\n"):
        raise BadRequest(ErrorCode.BAD_REQUEST, f"{what} does not end with CRLF")
    return bytes(line[:-2])


def whole_headers(reader: StreamReader) -> Headers | None:
    """The header section, when all of it is in the buffer and every line is one ``parse_headers`` takes as it
    is (then removed from the buffer); None otherwise, and nothing is read: ``parse_headers`` then reads it line
    by line and says what is wrong. The same fields, in the same order, without a generator per line (a
    handshake's or a key lookup's head is in one read)."""
    buffer = reader.buffer
    if buffer[:2] == b"\r\n":
        del buffer[:2]
        return Headers()
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).split(b"\r\n")
    if len(lines) > MAX_NUM_HEADERS:
        return None
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if (not colon or len(line) + 2 > MAX_LINE_LENGTH or not _TOKEN.fullmatch(name)
                or not _FIELD_VALUE.fullmatch(value)):  # a bare LF is neither
            return None
        fields.append((name.decode("ascii"), value.decode("latin-1")))
    del buffer[:end + 4]
    return Headers(fields)


def _headers(reader: StreamReader) -> Generator[None, None, Headers]:
    whole = whole_headers(reader)
    if whole is not None:
        return whole
    try:
        return (yield from parse_headers(reader.read_line))
    except EOFError:
        if reader.eof:
            raise
        raise BadRequest(ErrorCode.BAD_REQUEST, "a header line does not end with CRLF") from None
    except SecurityError as exc:
        raise BadRequest(ErrorCode.HEADERS_TOO_LARGE, str(exc)) from None
    except ValueError as exc:
        raise BadRequest(ErrorCode.BAD_REQUEST, str(exc)) from None


def read_request(reader: StreamReader, max_body: int,
                 on_continue: Callable[[], None] | None = None) -> Generator[None, None, ParsedRequest]:
    """Frame one request from ``reader``; raises ``BadRequest``, or ``EOFError`` when the peer left.

    ``on_continue`` is called when the head asks ``Expect: 100-continue`` and
    a body follows, so the caller can send the interim answer.
    """
    start = b""
    for _ in range(4):  # RFC 9112 2.2: ignore empty lines before a request line (after a previous body)
        start = yield from _line(reader, MAX_LINE_LENGTH, ErrorCode.URI_TOO_LONG, "the request line")
        if start:
            break
    parts = start.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise BadRequest(ErrorCode.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(ErrorCode.BAD_REQUEST, "only HTTP/1.1 and HTTP/1.0 are spoken here")
    headers = yield from _headers(reader)
    if (on_continue is not None and version == b"HTTP/1.1" and not reader.buffer
            and any(v.strip().lower() == "100-continue" for v in headers.get_all("Expect"))
            and (headers.get_all("Transfer-Encoding") or any(v.strip() not in ("", "0")
                                                             for v in headers.get_all("Content-Length")))):
        on_continue()
    body = yield from _read_body(reader, headers, max_body)
    request = Request(target.decode("ascii"), headers, method.decode("ascii"), version.decode("ascii"))
    tokens = {t.strip().lower() for v in headers.get_all("Connection") for t in v.split(",")}
    keep_alive = "close" not in tokens if version == b"HTTP/1.1" else "keep-alive" in tokens
    upgrade = method == b"GET" and any(v.strip().lower() == "websocket" for v in headers.get_all("Upgrade"))
    return ParsedRequest(request, body, keep_alive, upgrade)


def _read_body(reader: StreamReader, headers: Headers, max_body: int) -> Generator[None, None, bytes]:
    codings = headers.get_all("Transfer-Encoding")
    lengths = headers.get_all("Content-Length")
    if codings:
        if lengths:
            raise BadRequest(ErrorCode.BAD_REQUEST, "Content-Length and Transfer-Encoding together")
        if [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
            raise BadRequest(ErrorCode.LENGTH_REQUIRED, "only Transfer-Encoding: chunked is supported")
        return (yield from _read_chunked(reader, max_body))
    if not lengths:
        return b""
    values = {v.strip() for value in lengths for v in value.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise BadRequest(ErrorCode.BAD_REQUEST, "Content-Length must be one plain decimal number")
    length = int(values.pop())
    if length > max_body:
        raise BadRequest(ErrorCode.PAYLOAD_TOO_LARGE, f"the body is larger than {max_body} bytes")
    return bytes((yield from reader.read_exact(length))) if length else b""


def _read_chunked(reader: StreamReader, max_body: int) -> Generator[None, None, bytes]:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = yield from _line(reader, MAX_CHUNK_LINE, ErrorCode.BAD_REQUEST, "a chunk-size line")
        match = _CHUNK_SIZE.fullmatch(size_line)
        if match is None:
            raise BadRequest(ErrorCode.BAD_REQUEST, "malformed chunk-size line")
        size = int(match.group(1), 16)
        total += size
        if total > max_body:
            raise BadRequest(ErrorCode.PAYLOAD_TOO_LARGE, f"the body is larger than {max_body} bytes")
        if size == 0:
            break
        chunk = yield from reader.read_exact(size + 2)
        if chunk[-2:] != b"\r\n":
            raise BadRequest(ErrorCode.BAD_REQUEST, "chunk data is not followed by CRLF")
        parts.append(bytes(chunk[:-2]))
    yield from _headers(reader)  # trailer fields, read and ignored
    return b"".join(parts)

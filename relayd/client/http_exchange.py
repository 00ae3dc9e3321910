"""One HTTP/1.1 request and its answer over asyncio streams, bounded in bytes (the caller bounds its time).

The standard library's ``http.client`` times out per read, not per call, and
reads any body whole: a relay that trickles or sends gigabytes would hang or
exhaust the client. Here the answer's head and body have byte limits, and
the call runs inside the caller's deadline as one coroutine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .display import shown
from .endpoint import Endpoint
from .errors import ProtocolViolation, RelayUnreachable

MAX_HEAD_LINE = 8192
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


class _Malformed(Exception):
    """The answer is not HTTP as a relay speaks it; the message says where."""


async def exchange(endpoint: Endpoint, method: str, path: str, body: bytes | None, headers: dict[str, str],
                   max_body: int) -> Answer:
    """Send one request (``Connection: close``) and read its answer.

    Raises OSError when no connection could be made, RelayUnreachable for an
    answer that is not HTTP, ProtocolViolation for a body over ``max_body``.
    """
    tls = endpoint.ssl_context()
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port, ssl=tls,
                                                   server_hostname=endpoint.host if tls else None,
                                                   limit=MAX_HEAD_LINE)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {endpoint.host_header}", "Connection: close",
                 *(f"{name}: {value}" for name, value in headers.items()),
                 f"Content-Length: {len(body)}" if body is not None else ""]
        writer.write(("\r\n".join(line for line in lines if line) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        try:
            answer = await _read_answer(reader, method, max_body)
        except asyncio.IncompleteReadError:
            raise RelayUnreachable(f"{method} {path} at {endpoint.where}: the connection closed before the "
                                   f"answer was complete") from None
        except asyncio.LimitOverrunError:
            raise RelayUnreachable(f"{method} {path} at {endpoint.where}: not an HTTP answer: a line longer "
                                   f"than {MAX_HEAD_LINE} bytes") from None
        except _Malformed as exc:
            raise RelayUnreachable(f"{method} {path} at {endpoint.where}: not an HTTP answer: {exc}") from None
        return answer
    finally:
        writer.transport.abort()  # nothing more to say; a hostile peer gets no chance to stall a graceful close


async def _read_answer(reader: asyncio.StreamReader, method: str, max_body: int) -> Answer:
    while True:
        status, reason, headers = await _read_head(reader)
        if status >= 200:
            break  # 1xx interim answers are skipped
    if method == "HEAD" or status in (204, 304):
        return Answer(status, reason, headers, b"")
    coding = headers.get("transfer-encoding", "").strip().lower()
    if coding:
        if coding != "chunked":
            raise _Malformed(f"unsupported Transfer-Encoding {shown(coding, 50)}")
        return Answer(status, reason, headers, await _read_chunked(reader, max_body))
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.strip().isdigit():
            raise _Malformed(f"bad Content-Length {shown(length_text, 50)}")
        length = int(length_text)
        if length > max_body:
            raise ProtocolViolation(_too_large(length, max_body))
        return Answer(status, reason, headers, await reader.readexactly(length))
    data = await reader.read(max_body + 1)
    chunks = [data]
    size = len(data)
    while data and size <= max_body:
        data = await reader.read(max_body + 1 - size)
        chunks.append(data)
        size += len(data)
    if size > max_body:
        raise ProtocolViolation(_too_large(None, max_body))
    return Answer(status, reason, headers, b"".join(chunks))


def _too_large(length: int | None, limit: int) -> str:
    size = f"of {length} bytes " if length is not None else ""
    return f"the relay's answer {size}is larger than the client's limit of {limit} bytes (max_body_bytes)"


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    status_line = (await reader.readuntil(b"\n")).decode("latin-1").rstrip("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (len(parts[1]) == 3 and parts[1].isdigit()):
        raise _Malformed(f"bad status line {shown(status_line, 100)}")
    headers: dict[str, str] = {}
    size = len(status_line)
    for _ in range(MAX_HEADERS + 1):
        line = (await reader.readuntil(b"\n")).decode("latin-1").rstrip("\r\n")
        size += len(line)
        if size > MAX_HEAD_BYTES:
            raise _Malformed(f"the answer's head is longer than {MAX_HEAD_BYTES} bytes")
        if not line:
            return int(parts[1]), parts[2] if len(parts) > 2 else "", headers
        name, colon, value = line.partition(":")
        if not colon:
            raise _Malformed(f"bad header line {shown(line, 100)}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    raise _Malformed(f"more than {MAX_HEADERS} header lines")


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        size_text = line.split(";", 1)[0].strip()
        try:
            chunk = int(size_text, 16)
        except ValueError:
            raise _Malformed(f"bad chunk size {shown(size_text, 50)}") from None
        if chunk < 0:
            raise _Malformed(f"bad chunk size {shown(size_text, 50)}")
        if chunk == 0:
            for _ in range(MAX_HEADERS + 1):  # trailers, then the blank line
                if not (await reader.readuntil(b"\n")).strip():
                    return b"".join(chunks)
            raise _Malformed(f"more than {MAX_HEADERS} trailer lines")
        size += chunk
        if size > max_body:
            raise ProtocolViolation(_too_large(None, max_body))
        chunks.append(await reader.readexactly(chunk))
        await reader.readexactly(2)

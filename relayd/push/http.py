"""One HTTP/1.1 request to an address that was checked, its answer read bounded in size and time.

Push services answer with a status and a short body; relayd never needs more. The request goes to the
address given (already checked against SSRF by the caller), with the URL's host for TLS and ``Host``, and
the whole exchange (connect, TLS, request, answer) ends within ``timeout_s``. ``Connection: close`` keeps it
simple; pushes are rare per endpoint (one per ``min_interval_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

from .subscriptions import Endpoint

MAX_HEAD_BYTES = 16384


class ResponseError(OSError):
    """The service's answer was not HTTP/1.1 as relayd reads it."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    """Header names lower-cased; a repeated header keeps its last value."""
    body: bytes = b""


async def request(method: str, endpoint: Endpoint, address: str, headers: list[tuple[str, str]], body: bytes, *,
                  ssl_context: ssl.SSLContext | None, timeout_s: float, max_bytes: int) -> Response:
    """Send one request to ``address`` (an IP) for ``endpoint``; raises ``OSError`` or ``TimeoutError``.

    A body longer than ``max_bytes`` is cut there (the status is what counts)."""
    secure = endpoint.scheme == "https"
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(
            address, endpoint.port, ssl=(ssl_context or ssl.create_default_context()) if secure else None,
            server_hostname=endpoint.host if secure else None, limit=MAX_HEAD_BYTES)
        try:
            host = endpoint.origin.split("://", 1)[1]
            lines = [f"{method} {endpoint.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
                     "Connection: close", *(f"{name}: {value}" for name, value in headers)]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
            return await _read_response(reader, max_bytes)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader, max_bytes: int) -> Response:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
        raise ResponseError(f"bad answer head: {exc}") from None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ResponseError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    response = Response(int(parts[1]))
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            response.headers[name.strip().lower()] = value.strip()
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        response.body = await _read_chunked(reader, max_bytes)
    elif response.headers.get("content-length", "").isdigit():
        length = min(int(response.headers["content-length"]), max_bytes)
        response.body = await reader.readexactly(length)
    else:
        response.body = await reader.read(max_bytes)
    return response


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    body = bytearray()
    while len(body) < max_bytes:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ResponseError("bad chunk size") from None
        if size == 0:
            break
        body += await reader.readexactly(min(size, max_bytes - len(body)))
        if len(body) < max_bytes:
            await reader.readexactly(2)
    return bytes(body[:max_bytes])

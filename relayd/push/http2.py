"""One HTTP/2 connection to one origin, kept open for many requests (one stream each) and closed when idle.

APNs asks providers to keep their connections open rather than pay a TLS handshake per push, and answers on
one connection in any order: each request is a stream whose answer a reader task hands back, read bounded in
size. The connection closes after ``idle_s`` without a request; one that the server closed while idle (or
that ends with a GOAWAY before answering) is replaced once, transparently, by a new one. Driven by ``h2``
(see ``apns``) over asyncio streams with TLS and ALPN ``h2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from .http import Response

READ_CHUNK = 65536
CLOSE_WAIT_S = 1.0
"""How long a closing connection waits for the server's side of the TLS close before it is cut."""


class ConnectionClosed(OSError):
    """The connection ended before the request was answered (it may be sent again on a new one)."""


@dataclass(slots=True)
class _Stream:
    answer: asyncio.Future[Response]
    max_bytes: int
    response: Response = field(default_factory=lambda: Response(0))
    body: bytearray = field(default_factory=bytearray)


class _Connection:
    """One TLS connection speaking HTTP/2, with the reader task that hands answers to their streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_s: float) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_s = idle_s
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.streams: dict[int, _Stream] = {}
        self.usable = True
        """False once it ends or the server said GOAWAY: new requests then go to a new connection."""
        self.last_used = asyncio.get_running_loop().time()
        self.h2.initiate_connection()
        self._flush()
        self.task = asyncio.create_task(self._read(), name="http2-reader")

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    async def exchange(self, headers: list[tuple[str, str]], body: bytes, max_bytes: int) -> Response:
        """Send one request as a new stream and wait for its answer; raises OSError."""
        if not self.usable:
            raise ConnectionClosed("the connection is closing")
        loop = asyncio.get_running_loop()
        try:
            stream_id = self.h2.get_next_available_stream_id()
            self.h2.send_headers(stream_id, headers)
            self.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.ProtocolError as exc:  # e.g. as many streams open as the server allows
            raise OSError(f"no new stream: {exc!r}") from None
        stream = self.streams[stream_id] = _Stream(loop.create_future(), max_bytes)
        self.last_used = loop.time()
        try:
            self._flush()
            try:
                await self.writer.drain()
            except OSError as exc:
                raise ConnectionClosed(f"the request could not be sent: {exc!r}") from None
            return await stream.answer
        except asyncio.CancelledError:  # the caller's timeout: tell the server, keep the connection
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.reset_stream(stream_id)
                self._flush()
            raise
        finally:
            self.streams.pop(stream_id, None)
            self.last_used = loop.time()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        why = "the server closed the connection"
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK), self.idle_s)
                except TimeoutError:
                    if not self.streams and loop.time() - self.last_used >= self.idle_s:
                        why = "idle"
                        return
                    continue
                if not chunk:
                    return
                for event in self.h2.receive_data(chunk):
                    self._on(event)
                self._flush()
        except (OSError, h2.exceptions.ProtocolError) as exc:
            why = f"the connection failed: {exc!r}"
        finally:
            self.usable = False
            for stream in self.streams.values():
                if not stream.answer.done():
                    stream.answer.set_exception(ConnectionClosed(why))
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()  # GOAWAY: we are done with it
                self._flush()
            self.writer.close()
            try:  # a server that never finishes the TLS close must not hold a relay's shutdown
                await asyncio.wait_for(self.writer.wait_closed(), CLOSE_WAIT_S)
            except Exception:
                self.writer.transport.abort()

    def _on(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            for name, value in event.headers or []:
                stream.response.headers[str(name)] = str(value)
            stream.response.status = int(stream.response.headers.get(":status", "0"))
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is not None:
                stream.body += event.data[:max(0, stream.max_bytes - len(stream.body))]
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.response.body = bytes(stream.body)
            if not stream.answer.done():
                stream.answer.set_result(stream.response)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            if not stream.answer.done():
                stream.answer.set_exception(OSError(f"the server reset the stream ({event.error_code!r})"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.usable = False  # streams it did not process may go again on a new connection
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for stream_id, each in self.streams.items():
                if stream_id > last and not each.answer.done():
                    each.answer.set_exception(ConnectionClosed(f"GOAWAY ({event.error_code!r})"))

    async def close(self) -> None:
        self.usable = False
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class Http2Client:
    """Requests to one ``host:port`` over at most one open HTTP/2 connection at a time."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, *, idle_s: float) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.ssl_context.set_alpn_protocols(["h2"])
        self.idle_s = idle_s
        self.opened = 0
        """Connections opened so far."""
        self._conn: _Connection | None = None
        self._opening = asyncio.Lock()

    async def request(self, headers: list[tuple[str, str]], body: bytes, *, timeout_s: float,
                      max_bytes: int) -> Response:
        """One request and its answer within ``timeout_s``; raises OSError or TimeoutError."""
        async with asyncio.timeout(timeout_s):
            for attempt in (1, 2):
                conn, reused = await self._connection()
                try:
                    return await conn.exchange(headers, body, max_bytes)
                except ConnectionClosed:
                    if not reused or attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def _connection(self) -> tuple[_Connection, bool]:
        """The open connection (reused: True), or a new one."""
        async with self._opening:
            if self._conn is not None and self._conn.usable:
                return self._conn, True
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl_context,
                                                           server_hostname=self.host)
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                writer.close()
                raise OSError(f"{self.host} did not agree to HTTP/2")
            self.opened += 1
            self._conn = _Connection(reader, writer, self.idle_s)
            return self._conn, False

    @property
    def connected(self) -> bool:
        """Whether a connection is open for the next request."""
        return self._conn is not None and self._conn.usable

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

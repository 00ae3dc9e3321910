"""An asyncio client for relayd (and the original relay): the reference for app developers.

``RelayClient`` opens one WebSocket, signs in (plain, or signed with a private
key: the relay's challenge is answered as README "Signing in" says), sends
messages and gets each one's answer frame, receives frames, acknowledges them,
sends typing indicators and read receipts, and talks to the REST API on the
same host and port with the standard library only. ``connect_with_backoff``
shows how to reconnect: exponential backoff with jitter, capped.

Every wait is bounded by a timeout, and every failure is one of the
``ClientError`` subclasses below, whose message says what went wrong.

    identity = Identity.from_key(load_key_file("alice.key"))
    async with RelayClient("ws://localhost:3000", identity, ack=True) as client:
        answer = await client.send(bob, "base64-ciphertext")   # delivered / queued / error
        async for frame in client:                              # until the connection closes
            if frame["type"] == "message":
                await client.ack([frame["messageId"]])
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl as ssl_module
import urllib.parse
from typing import Any, AsyncIterator, Callable

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import (
    ConnectionClosed,
)

from ..identity.signatures import SignatureFormat
from .errors import (
    ClientError,
    ClientTimeout,
    ConnectionLost,
    ProtocolViolation,
)
from .messaging import MessagingCalls
from .rest import RestCalls
from .signin import SignInSteps
from .values import (
    DEFAULT_TIMEOUT,
    Frame,
    Identity,
    SignIn,
)


def _close_text(ws: ClientConnection) -> tuple[int | None, str]:
    """The close code and reason (1006 when the connection dropped without a close frame)."""
    return ws.close_code, ws.close_reason or ""


_CLOSED = object()


class RelayClient(MessagingCalls, RestCalls, SignInSteps):
    """One connection to a relay, plus its REST API on the same host and port.

    ``url`` is ``ws://host:port`` or ``wss://host:port`` (REST goes to http://
    or https:// of the same host and port). ``identity`` may be None for REST
    calls only. ``ack`` opts in to acknowledged delivery. ``timeout`` bounds
    every single wait (connecting, signing in, each answer, each REST call).
    ``connect()`` may be called again after the connection was lost.
    """

    def __init__(self, url: str, identity: Identity | None = None, *, ack: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, signature_format: str = SignatureFormat.DOUBLE_HASH.value,
                 ssl: ssl_module.SSLContext | None = None, max_incoming: int = 1024) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"relay URL must be ws://HOST[:PORT] or wss://HOST[:PORT], got {url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"relay URL has an invalid port: {url!r}") from None
        if signature_format not in [f.value for f in SignatureFormat]:
            raise ValueError(f"signature format must be doubleHash or prefix, got {signature_format!r}")
        self.url = url
        self.identity = identity
        self.ack_mode = ack
        self.timeout = timeout
        self.signature_format = signature_format
        self.tls = parts.scheme == "wss"
        self.host = parts.hostname
        self.port = port or (443 if self.tls else 80)
        self.http_base = urllib.parse.urlunsplit(("https" if self.tls else "http", parts.netloc, "", "", ""))
        self._ssl = ssl
        self._max_incoming = max_incoming
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._incoming: asyncio.Queue[Any] = asyncio.Queue()
        self._room = asyncio.Event()
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._pongs: collections.deque[asyncio.Future[Frame]] = collections.deque()
        self._eof = False
        self.sign_in: SignIn | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    # Connection

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._eof

    @property
    def token(self) -> str | None:
        """The bearer token of a signed sign-in, for private REST routes."""
        return self.sign_in.token if self.sign_in else None

    async def connect(self) -> SignIn:
        """Open the WebSocket and sign in as ``identity``.

        Raises RelayUnreachable, ClientTimeout, AuthRefused, ConnectionLost or
        ProtocolViolation; the connection is closed again on any of them.
        """
        if self.identity is None:
            raise ClientError("this client has no identity: it can only make REST calls")
        if self.connected:
            raise ClientError("already connected")
        await self._discard_connection()
        ws = await self._open()
        try:
            self.sign_in = await self._sign_in(ws, asyncio.get_running_loop().time() + self.timeout)
        except BaseException:
            await self._abort(ws)
            raise
        self._ws = ws
        self._eof = False
        self._incoming = asyncio.Queue()
        self.close_code, self.close_reason = None, ""
        self._reader = asyncio.create_task(self._read_loop(ws))
        return self.sign_in

    async def _send_on(self, ws: ClientConnection, frame: Frame) -> None:
        try:
            await asyncio.wait_for(ws.send(json.dumps(frame)), self.timeout)
        except ConnectionClosed:
            code, reason = _close_text(ws)
            raise ConnectionLost(f"connection closed while sending {frame.get('type')}"
                                 + (f" (code {code} {reason})".rstrip() if code else ""), code, reason) from None
        except TimeoutError:
            raise ClientTimeout(f"timeout sending {frame.get('type')} (the relay does not read)") from None

    async def _read_on(self, ws: ClientConnection, deadline: float, what: str) -> Frame:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            raw = await asyncio.wait_for(ws.recv(), max(0.0, remaining))
        except TimeoutError:
            raise ClientTimeout(f"timeout waiting for {what} after {self.timeout:g} s") from None
        except ConnectionClosed:
            code, reason = _close_text(ws)
            raise ConnectionLost(f"connection closed while waiting for {what}"
                                 + (f" (code {code} {reason})".rstrip() if code else ""), code, reason) from None
        return self._decode(raw)

    @staticmethod
    def _decode(raw: str | bytes) -> Frame:
        try:
            frame = json.loads(raw)
        except ValueError:
            raise ProtocolViolation(f"the relay sent a frame that is not JSON: {raw[:100]!r}") from None
        if not isinstance(frame, dict):
            raise ProtocolViolation(f"the relay sent a frame that is not a JSON object: {raw[:100]!r}")
        return frame

    async def _read_loop(self, ws: ClientConnection) -> None:
        """Route answers to the waiting ``send``/``ping``; queue everything else for ``recv``.

        Past ``max_incoming`` unread frames it stops reading the socket, so a
        slow consumer pushes back on the relay instead of filling memory.
        """
        try:
            async for raw in ws:
                try:
                    frame = self._decode(raw)
                except ProtocolViolation as exc:
                    frame = {"type": "client_error", "message": str(exc)}
                ftype = frame.get("type")
                mid = frame.get("messageId")
                if ftype in ("delivered", "queued", "error") and isinstance(mid, str) and mid in self._pending:
                    future = self._pending.pop(mid)
                    if not future.done():
                        future.set_result(frame)
                    continue
                if ftype == "pong" and self._pongs:
                    future = self._pongs.popleft()
                    if not future.done():
                        future.set_result(frame)
                    continue
                if self._incoming.qsize() >= self._max_incoming:
                    self._room.clear()
                    await self._room.wait()
                self._incoming.put_nowait(frame)
        except ConnectionClosed:
            pass
        finally:
            self.close_code, self.close_reason = _close_text(ws)
            lost = ConnectionLost(f"connection closed (code {self.close_code} {self.close_reason})".rstrip()
                                  if self.close_code else "connection closed", self.close_code, self.close_reason)
            for future in [*self._pending.values(), *self._pongs]:
                if not future.done():
                    future.set_exception(lost)
            self._pending.clear()
            self._pongs.clear()
            self._incoming.put_nowait(_CLOSED)

    async def close(self) -> None:
        """Close the connection (bounded by the timeout); safe to call twice."""
        ws, self._ws = self._ws, None
        if ws is not None:
            await self._abort(ws)
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        self._eof = True

    async def _discard_connection(self) -> None:
        if self._ws is not None:
            await self.close()

    async def _abort(self, ws: ClientConnection) -> None:
        try:
            await asyncio.wait_for(ws.close(), self.timeout)
        except (TimeoutError, OSError, ConnectionClosed):
            pass

    async def __aenter__(self) -> "RelayClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # Frames

    def _live(self) -> ClientConnection:
        if self._ws is None or self._eof:
            raise ConnectionLost("not connected", self.close_code, self.close_reason)
        return self._ws

    async def send_frame(self, frame: Frame) -> None:
        """Send any frame as JSON (the typed helpers below are preferred)."""
        await self._send_on(self._live(), frame)

    async def _wait(self, future: asyncio.Future[Frame], what: str, timeout: float | None) -> Frame:
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise ClientTimeout(f"timeout waiting for {what} after {limit:g} s") from None

    async def recv(self, timeout: float | None = None) -> Frame:
        """The next incoming frame that is not an answer to ``send``/``ping``.

        Raises ClientTimeout after ``timeout`` (default: the client's), and
        ConnectionLost once the connection has closed and every frame was read.
        """
        if self._eof:
            raise ConnectionLost("connection closed", self.close_code, self.close_reason)
        limit = self.timeout if timeout is None else timeout
        try:
            item = await asyncio.wait_for(self._incoming.get(), limit)
            self._room.set()
        except TimeoutError:
            raise ClientTimeout(f"timeout waiting for a frame after {limit:g} s") from None
        if item is _CLOSED:
            self._eof = True
            detail = f" (code {self.close_code} {self.close_reason})".rstrip() if self.close_code else ""
            raise ConnectionLost(f"connection closed{detail}", self.close_code, self.close_reason)
        return item

    async def recv_matching(self, match: Callable[[Frame], bool], what: str,
                            timeout: float | None = None) -> Frame:
        """The first incoming frame ``match`` accepts, discarding others; bounded by one timeout overall."""
        limit = self.timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                frame = await self.recv(max(0.0, remaining))
            except ClientTimeout:
                raise ClientTimeout(f"timeout waiting for {what} after {limit:g} s") from None
            if match(frame):
                return frame

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        """Incoming frames until the connection closes (liveness is kept by WebSocket pings)."""
        while not self._eof:
            item = await self._incoming.get()
            self._room.set()
            if item is _CLOSED:
                self._eof = True
                return
            yield item


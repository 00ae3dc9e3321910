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
import base64
import collections
import http.client
import json
import os
import random
import secrets
import ssl as ssl_module
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .addresses import is_address
from .identity.statements import auth_statement, key_statement
from .identity.signatures import SignatureFormat, verify
from .identity.signing import SigningKey, load_key_file

__all__ = [
    "AuthRefused",
    "ClientError",
    "ClientTimeout",
    "ConnectionLost",
    "HttpError",
    "Identity",
    "KeyVerificationError",
    "ProtocolViolation",
    "RelayClient",
    "RelayUnreachable",
    "SignIn",
    "backoff_delays",
    "connect_with_backoff",
    "random_public_key",
    "verify_key_record",
]

DEFAULT_TIMEOUT = 10.0
MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_ACK_IDS = 1000
Frame = dict[str, Any]


# Errors


class ClientError(Exception):
    """Base of every error this client raises; the message is meant for a human."""


class RelayUnreachable(ClientError):
    """No WebSocket or HTTP conversation: refused, unresolvable, TLS failure, or not a WebSocket server.

    ``status`` is the HTTP status when the server answered the upgrade with one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ClientTimeout(ClientError, TimeoutError):
    """Nothing came within the timeout; the message says what was awaited."""


class ConnectionLost(ClientError):
    """The WebSocket closed; ``code``/``reason`` are the close frame's, when one came."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class AuthRefused(ClientError):
    """The relay refused the sign-in with an ``error`` frame (``code``: auth_failed, auth_required, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"sign-in refused: {code}: {message}")
        self.code = code
        self.relay_message = message


class ProtocolViolation(ClientError):
    """The peer sent something a relay never sends (not JSON, an unexpected frame, a malformed challenge)."""


class HttpError(ClientError):
    """A REST answer with status >= 400; ``code`` is the relay's error code when the body has one."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        self.code: str | None = None
        text = body.decode("utf-8", "replace").strip()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), str):
            self.code = parsed["code"]
        super().__init__(f"{method} {path}: HTTP {status}: {text[:300] or '(empty body)'}")


class KeyVerificationError(ClientError):
    """A public-key record whose statement or signature does not prove it came from its address."""


# Values


@dataclass(frozen=True)
class Identity:
    """Who signs in: an address, and the private key that proves it when there is one."""

    address: str
    key: SigningKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not is_address(self.address):
            raise ValueError(f"not an Idena address (0x followed by 40 hex digits): {self.address!r}")
        object.__setattr__(self, "address", self.address.lower())
        if self.key is not None and self.key.address != self.address:
            raise ValueError(f"the key controls {self.key.address}, not {self.address}")

    @classmethod
    def from_key(cls, key: SigningKey) -> "Identity":
        return cls(key.address, key)

    @classmethod
    def generate(cls) -> "Identity":
        """A throwaway signed identity (a fresh random key)."""
        return cls.from_key(SigningKey.generate())

    @classmethod
    def parse(cls, spec: str) -> "Identity":
        """An address (plain sign-in) or the path of a key file (signed sign-in).

        Raises ValueError for a malformed address, KeyFileError for a bad key file.
        """
        if is_address(spec):
            return cls(spec)
        if spec.lower().startswith("0x") and not os.path.exists(spec):
            raise ValueError(f"{spec!r} is neither an Idena address (0x followed by 40 hex digits) "
                             f"nor an existing key file")
        return cls.from_key(load_key_file(spec))

    @property
    def signed(self) -> bool:
        return self.key is not None


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in: the ``auth_success`` frame and what it granted."""

    address: str
    verified: bool
    token: str | None
    token_expires_at: int | None
    challenge: Frame | None
    frame: Frame


def random_public_key() -> str:
    """Canonical base64 of 32 random bytes: the shape of an X25519 public key, for checks and tests."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def verify_key_record(record: Frame, address: str | None = None) -> None:
    """Check a ``GET /api/public-keys/:address`` answer locally instead of trusting the relay.

    The statement must be exactly the one rebuilt from the record's own fields
    and its signature must recover to the record's address (and to ``address``
    when given). Raises KeyVerificationError saying which check failed.
    """
    owner = record.get("address")
    if not isinstance(owner, str) or not is_address(owner):
        raise KeyVerificationError(f"the record has no valid address: {owner!r}")
    if address is not None and owner.lower() != address.lower():
        raise KeyVerificationError(f"the record is for {owner}, not {address}")
    missing = [name for name in ("keyType", "issuedAt", "format", "signature", "statement", "publicKey")
               if record.get(name) is None]
    if missing:
        raise KeyVerificationError(f"the key of {owner} is not signed (no {', '.join(missing)})")
    issued = record["issuedAt"]
    if isinstance(issued, bool) or not isinstance(issued, int):
        raise KeyVerificationError(f"issuedAt is not an integer: {issued!r}")
    expected = key_statement(owner.lower(), record["keyType"], record["publicKey"], issued)
    if record["statement"] != expected:
        raise KeyVerificationError(f"the statement does not match the record's fields: {record['statement']!r}")
    if record["format"] not in [f.value for f in SignatureFormat]:
        raise KeyVerificationError(f"unknown signature format {record['format']!r}")
    if not verify(expected, record["signature"], record["format"], owner):
        raise KeyVerificationError(f"the signature does not recover to {owner.lower()}")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _close_text(ws: ClientConnection) -> tuple[int | None, str]:
    """The close code and reason (1006 when the connection dropped without a close frame)."""
    return ws.close_code, ws.close_reason or ""


_CLOSED = object()


# The client


class RelayClient:
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

    async def _open(self) -> ClientConnection:
        where = f"{self.host}:{self.port}"
        extra: dict[str, Any] = {}
        if self.tls:
            extra["ssl"] = self._ssl or ssl_module.create_default_context()
        try:
            return await ws_connect(self.url, compression=None, open_timeout=self.timeout,
                                    close_timeout=self.timeout, max_size=MAX_FRAME_BYTES, proxy=None, **extra)
        except InvalidStatus as exc:
            response = exc.response
            body = response.body.decode("utf-8", "replace").strip()[:200] if response.body else ""
            raise RelayUnreachable(f"{where} answered HTTP {response.status_code} {response.reason_phrase} "
                                   f"instead of a WebSocket upgrade (not a relay?)"
                                   + (f": {body}" if body else ""), status=response.status_code) from None
        except (InvalidHandshake, InvalidURI) as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise RelayUnreachable(f"{where} did not answer like a WebSocket server (not a relay?): "
                                   f"{exc}{cause}") from None
        except TimeoutError:
            raise ClientTimeout(f"timeout opening a WebSocket to {where} after {self.timeout:g} s") from None
        except ConnectionRefusedError:
            raise RelayUnreachable(f"connection refused by {where} (nothing listening?)") from None
        except ssl_module.SSLError as exc:
            raise RelayUnreachable(f"TLS with {where} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise RelayUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from None

    async def _sign_in(self, ws: ClientConnection, deadline: float) -> SignIn:
        """Answer the challenge if the relay sends one, then authenticate.

        A signed identity must know whether a challenge is coming (open-mode
        relays send none). The relay sends its challenge as soon as the
        connection opens, before it reads anything, so the client sends a
        ``ping`` first: if a challenge exists it arrives before the
        ``not_authenticated`` answer to that ping. A plain identity skips the
        challenge and authenticates at once, as today's app does.
        """
        identity = self.identity
        assert identity is not None
        challenge: Frame | None = None
        probing = False
        if identity.key is not None:
            await self._send_on(ws, {"type": "ping"})
            first = await self._read_on(ws, deadline, "the sign-in challenge")
            if first.get("type") == "challenge":
                challenge = self._check_challenge(first)
                probing = True
            elif not (first.get("type") == "pong"  # the original relay answers pings before auth
                      or first.get("type") == "error" and first.get("code") == "not_authenticated"):
                raise ProtocolViolation(f"expected a challenge or not_authenticated before auth, got {first}")
        auth: Frame = {"type": "auth", "address": identity.address}
        if self.ack_mode:
            auth["ack"] = True
        if challenge is not None and identity.key is not None:
            text = auth_statement(challenge["relay"], identity.address, challenge["nonce"], challenge["issuedAt"])
            auth.update(nonce=challenge["nonce"], signature=identity.key.sign(text, self.signature_format),
                        format=self.signature_format)
        await self._send_on(ws, auth)
        while True:
            frame = await self._read_on(ws, deadline, "auth_success")
            ftype = frame.get("type")
            if ftype == "auth_success":
                break
            if ftype == "challenge" and identity.key is None:
                continue
            if ftype == "error" and probing and frame.get("code") == "not_authenticated":
                probing = False
                continue
            if ftype == "error":
                raise AuthRefused(str(frame.get("code")), str(frame.get("message", "")))
            raise ProtocolViolation(f"expected auth_success, got {frame}")
        token = frame.get("token")
        expires = frame.get("tokenExpiresAt")
        return SignIn(address=str(frame.get("address", identity.address)), verified=frame.get("verified") is True,
                      token=token if isinstance(token, str) else None,
                      token_expires_at=expires if isinstance(expires, int) else None,
                      challenge=challenge, frame=frame)

    def _check_challenge(self, frame: Frame) -> Frame:
        nonce, relay, issued = frame.get("nonce"), frame.get("relay"), frame.get("issuedAt")
        if not isinstance(nonce, str) or not isinstance(relay, str) or isinstance(issued, bool) \
                or not isinstance(issued, int):
            raise ProtocolViolation(f"malformed challenge (needs nonce, relay, issuedAt): {frame}")
        formats = frame.get("formats")
        if isinstance(formats, list) and self.signature_format not in formats:
            raise ProtocolViolation(f"the relay accepts signature formats {formats}, "
                                    f"not {self.signature_format}")
        return frame

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

    async def send(self, to: str, content: str, *, message_id: str | None = None,
                   timestamp: int | None = None, timeout: float | None = None) -> Frame:
        """Send a message and return the relay's answer: ``delivered``, ``queued`` or ``error``.

        Resending the same ``message_id`` after a lost answer is safe: the relay
        answers again and delivers once. Raises ClientTimeout or ConnectionLost.
        """
        mid = message_id or str(uuid.uuid4())
        if mid in self._pending:
            raise ClientError(f"message {mid} is already awaiting its answer")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[mid] = future
        try:
            await self.send_frame({"type": "message", "to": to, "content": content, "messageId": mid,
                                   "timestamp": _now_ms() if timestamp is None else timestamp})
            return await self._wait(future, f"the answer to message {mid}", timeout)
        finally:
            self._pending.pop(mid, None)

    async def ping(self, timeout: float | None = None) -> Frame:
        """Application-level ping; returns the ``pong`` frame."""
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        try:
            await self.send_frame({"type": "ping"})
            return await self._wait(future, "pong", timeout)
        finally:
            if future in self._pongs:
                self._pongs.remove(future)

    async def ack(self, message_ids: list[str]) -> None:
        """Acknowledge received messages (ack mode), in frames of at most 1000 ids."""
        for start in range(0, len(message_ids), MAX_ACK_IDS):
            await self.send_frame({"type": "ack", "messageIds": list(message_ids[start:start + MAX_ACK_IDS])})

    async def typing(self, to: str, is_typing: bool = True) -> None:
        await self.send_frame({"type": "typing", "to": to, "isTyping": is_typing})

    async def read_receipt(self, to: str, message_id: str) -> None:
        """Tell ``to`` (the sender) that its message ``message_id`` was read."""
        await self.send_frame({"type": "read_receipt", "to": to, "messageId": message_id})

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

    # REST

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      timeout: float | None = None) -> Any:
        """One REST call; returns the parsed JSON answer.

        Raises HttpError for a status >= 400, RelayUnreachable when no HTTP
        conversation happened, ClientTimeout, or ProtocolViolation for a
        successful answer that is not JSON.
        """
        limit = self.timeout if timeout is None else timeout
        status, payload = await asyncio.to_thread(self._http, method, path, body, token, limit)
        if status >= 400:
            raise HttpError(method, path, status, payload)
        try:
            return json.loads(payload)
        except ValueError:
            raise ProtocolViolation(f"{method} {path}: HTTP {status} with a body that is not JSON: "
                                    f"{payload[:100]!r}") from None

    def _http(self, method: str, path: str, body: Any, token: str | None, timeout: float) -> tuple[int, bytes]:
        where = f"{self.host}:{self.port}"
        if self.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self._ssl or ssl_module.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except TimeoutError:
            raise ClientTimeout(f"timeout on {method} {path} at {where} after {timeout:g} s") from None
        except ConnectionRefusedError:
            raise RelayUnreachable(f"connection refused by {where} (nothing listening?)") from None
        except ssl_module.SSLError as exc:
            raise RelayUnreachable(f"TLS with {where} failed: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise RelayUnreachable(f"{method} {path} at {where} failed: "
                                   f"{getattr(exc, 'strerror', None) or exc!r}") from None
        finally:
            conn.close()

    def _own_address(self) -> str:
        if self.identity is None:
            raise ClientError("this call needs an identity")
        return self.identity.address

    async def health(self) -> Frame:
        return await self.request("GET", "/health")

    async def status(self, address: str) -> Frame:
        """``{"address", "online", "timestamp"}`` of any address."""
        return await self.request("GET", f"/api/status/{urllib.parse.quote(address)}")

    async def queue_size(self, address: str) -> int:
        reply = await self.request("GET", f"/api/messages/{urllib.parse.quote(address)}/queue-size")
        return int(reply["queueSize"])

    async def get_key(self, address: str, *, verify: bool = False) -> Frame | None:
        """The published key record of ``address``, or None when it has none.

        With ``verify`` the record must be signed and check out locally
        (``verify_key_record``), or KeyVerificationError is raised.
        """
        try:
            record = await self.request("GET", f"/api/public-keys/{urllib.parse.quote(address)}")
        except HttpError as exc:
            if exc.status == 404 and exc.code in ("key_not_found", None):
                return None
            raise
        if verify:
            verify_key_record(record, address)
        return record

    async def put_key(self, public_key: str, *, signed: bool | None = None, issued_at: int | None = None) -> Frame:
        """Publish this identity's encryption key; signed (README "Signed keys") by default when it has a key."""
        identity = self.identity
        if identity is None:
            raise ClientError("publishing a key needs an identity")
        signed = identity.signed if signed is None else signed
        body: Frame = {"address": identity.address, "publicKey": public_key}
        if signed:
            if identity.key is None:
                raise ClientError("a signed key needs a private key, not just an address")
            issued = int(time.time()) if issued_at is None else issued_at
            statement = key_statement(identity.address, "x25519", public_key, issued)
            body.update(keyType="x25519", issuedAt=issued, format=self.signature_format,
                        signature=identity.key.sign(statement, self.signature_format))
        return await self.request("POST", "/api/public-keys", body)

    async def delete_key(self) -> Frame:
        """Remove this identity's key (needs the sign-in token outside open mode)."""
        return await self.request("DELETE", f"/api/public-keys/{self._own_address()}", token=self.token)

    async def messages(self, limit: int | None = None) -> Frame:
        """This identity's stored messages over REST; with ``limit`` a peek, without it they are removed."""
        query = "" if limit is None else f"?limit={int(limit)}"
        return await self.request("GET", f"/api/messages/{self._own_address()}{query}", token=self.token)


# Reconnecting


def backoff_delays(base: float = 0.5, cap: float = 30.0, *,
                   rng: Callable[[], float] = random.random) -> Iterator[float]:
    """Delays before each retry: exponential (base * 2^n) capped at ``cap``, with "equal jitter".

    Each delay is uniform in [d/2, d] for the step's d, so clients that lost
    the same relay at once spread out instead of reconnecting in lockstep,
    and none retries sooner than half the step.
    """
    step = 0
    while True:
        d = min(cap, base * (2 ** step))
        yield d / 2 + rng() * d / 2
        if d < cap:
            step += 1


async def connect_with_backoff(client: RelayClient, *, attempts: int | None = 8, base: float = 0.5,
                               cap: float = 30.0, rng: Callable[[], float] = random.random,
                               on_retry: Callable[[int, float, ClientError], None] | None = None) -> SignIn:
    """``client.connect()``, retried with ``backoff_delays`` while the relay is unreachable or busy.

    Retries unreachable relays, timeouts, lost connections and ``rate_limited``
    refusals; any other sign-in refusal is final and raised at once. Gives up
    after ``attempts`` tries (None: never) and raises the last error.
    ``on_retry(attempt, delay, error)`` is told before each wait.
    """
    delays = backoff_delays(base, cap, rng=rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await client.connect()
        except AuthRefused as exc:
            if exc.code != "rate_limited":
                raise
            error: ClientError = exc
        except (RelayUnreachable, ClientTimeout, ConnectionLost) as exc:
            error = exc
        if attempts is not None and attempt >= attempts:
            raise error
        delay = next(delays)
        if on_retry is not None:
            on_retry(attempt, delay, error)
        await asyncio.sleep(delay)


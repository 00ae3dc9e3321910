"""An asyncio client for relayd (and the original relay): the reference for app developers.

``RelayClient`` opens one WebSocket, signs in (plain, or signed with a private
key: the relay's challenge is answered as docs/protocol.md, "Signing in", says), sends
messages and gets each one's answer frame, receives frames, acknowledges them,
sends typing indicators and read receipts, and talks to the REST API on the
same host and port. ``connect_with_backoff`` shows how to reconnect:
exponential backoff with jitter, capped.

Every call is bounded by one deadline as a whole, every frame and REST answer
by a size, and every failure is one of the ``ClientError`` subclasses, whose
message says what went wrong (relay text in it cut and escaped): a hostile
or broken relay can make a call fail, never hang or exhaust the client.

    identity = Identity.from_key(load_key_file("alice.key"))
    async with RelayClient("ws://localhost:3000", identity, ack=True) as client:
        answer = await client.send(bob, "base64-ciphertext")   # delivered / queued / error
        async for frame in client:                              # until the connection closes
            if frame["type"] == "message":
                await client.ack([frame["messageId"]])
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from typing import Any, AsyncIterator, Callable

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ..identity.signatures import SignatureFormat
from .decoding import parse_object
from .endpoint import Endpoint
from .errors import ClientError, ConnectionLost, ProtocolViolation, close_detail
from .inbox import Inbox, closed_inbox
from .messaging import AnswerWaiters, Messaging
from .rest import RestApi
from .signin import SignInExchange
from .transport import FrameStream
from .values import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_INCOMING,
    DEFAULT_MAX_INCOMING_BYTES,
    DEFAULT_TIMEOUT,
    Deadline,
    Frame,
    Identity,
    Limits,
    SignIn,
)


class RelayClient:
    """One connection to a relay, plus its REST API on the same host and port.

    ``url`` is ``ws://host:port`` or ``wss://host:port`` (REST goes to http://
    or https:// of the same host and port). ``identity`` may be None for REST
    calls only. ``ack`` opts in to acknowledged delivery. ``timeout`` bounds
    each call as a whole (connecting and signing in, each send with its
    answer, each REST call). ``max_frame_bytes`` bounds one incoming frame,
    ``max_body_bytes`` one REST answer; past ``max_incoming`` frames or
    ``max_incoming_bytes`` unread the client stops reading the socket.
    ``connect()`` may be called again after the connection was lost.
    """

    def __init__(self, url: str, identity: Identity | None = None, *, ack: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, signature_format: str = SignatureFormat.DOUBLE_HASH.value,
                 ssl: ssl_module.SSLContext | None = None, max_incoming: int = DEFAULT_MAX_INCOMING,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_incoming_bytes: int = DEFAULT_MAX_INCOMING_BYTES) -> None:
        if signature_format not in [f.value for f in SignatureFormat]:
            raise ValueError(f"signature format must be doubleHash or prefix, got {signature_format!r}")
        self.endpoint = Endpoint.parse(url, ssl)
        self.limits = Limits(timeout, max_frame_bytes, max_body_bytes, max_incoming, max_incoming_bytes)
        self.identity = identity
        self.ack_mode = ack
        self.signature_format = signature_format
        self.waiters = AnswerWaiters()
        self.messaging = Messaging(self._send_frame, self.waiters, timeout)
        self.rest = RestApi(self.endpoint, self.limits, identity, signature_format, lambda: self.token)
        self.sign_in: SignIn | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self._stream: FrameStream | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inbox = closed_inbox(ConnectionLost("not connected"))

    # Where and how

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def tls(self) -> bool:
        return self.endpoint.tls

    @property
    def http_base(self) -> str:
        return self.endpoint.http_base

    @property
    def timeout(self) -> float:
        return self.limits.timeout

    # Connection

    @property
    def connected(self) -> bool:
        return self._stream is not None and not self._inbox.ended

    @property
    def token(self) -> str | None:
        """The bearer token of a signed sign-in, for private REST routes."""
        return self.sign_in.token if self.sign_in else None

    async def connect(self) -> SignIn:
        """Open the WebSocket and sign in as ``identity``, both within one ``timeout``.

        Raises RelayUnreachable, ClientTimeout, AuthRefused, ConnectionLost or
        ProtocolViolation; the connection is closed again on any of them.
        """
        if self.identity is None:
            raise ClientError("this client has no identity: it can only make REST calls")
        if self.connected:
            raise ClientError("already connected")
        await self.close()
        deadline = Deadline(self.limits.timeout)
        stream = await FrameStream.open(self.endpoint, self.limits, deadline)
        exchange = SignInExchange(self.identity, ack=self.ack_mode, signature_format=self.signature_format)
        try:
            self.sign_in = await exchange.run(stream, deadline)
        except BaseException:
            await stream.close(deadline=deadline)
            raise
        self._stream = stream
        self._inbox = Inbox(self.limits.max_incoming, self.limits.max_incoming_bytes)
        self.close_code, self.close_reason = None, ""
        self._reader = asyncio.create_task(self._read_loop(stream, self._inbox))
        return self.sign_in

    async def _read_loop(self, stream: FrameStream, inbox: Inbox) -> None:
        """Route answers to the waiting ``send``/``ping``; put everything else in the inbox.

        A frame that is not a JSON object ends the connection: the waiting
        calls and the reader of the inbox get the ProtocolViolation that says why.
        """
        end: ClientError = ConnectionLost("connection closed")
        try:
            async for raw in stream.ws:
                frame = parse_object(raw)
                if not self.waiters.resolve(frame):
                    await inbox.put(frame, len(raw))
            end = stream.lost("reading")
        except ConnectionClosed:
            end = stream.lost("reading")
        except ProtocolViolation as exc:
            end = exc
            await stream.close(CloseCode.INVALID_DATA, "invalid JSON")
        finally:
            self.close_code, self.close_reason = stream.close_code, stream.close_reason
            if isinstance(end, ConnectionLost):
                end = ConnectionLost(f"connection closed{close_detail(self.close_code, self.close_reason)}",
                                     self.close_code, self.close_reason)
            self.waiters.fail_all(end)
            inbox.end(end)

    async def close(self) -> None:
        """Close the connection (bounded by the timeout); safe to call twice."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        if stream is not None:
            self.close_code, self.close_reason = stream.close_code, stream.close_reason
        self._inbox = closed_inbox(ConnectionLost("connection closed", self.close_code, self.close_reason))

    async def __aenter__(self) -> "RelayClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # Frames

    async def _send_frame(self, frame: Frame, deadline: Deadline) -> None:
        stream = self._stream
        if stream is None or self._inbox.ended:
            raise ConnectionLost("not connected", self.close_code, self.close_reason)
        await stream.send(frame, deadline)

    async def send_frame(self, frame: Frame) -> None:
        """Send any frame as JSON (the typed helpers below are preferred)."""
        await self._send_frame(frame, Deadline(self.limits.timeout))

    async def recv(self, timeout: float | None = None) -> Frame:
        """The next incoming frame that is not an answer to ``send``/``ping``.

        Raises ClientTimeout after ``timeout`` (default: the client's), and
        ConnectionLost (or the ProtocolViolation that ended it) once the
        connection has closed and every frame was read.
        """
        return await self._inbox.get(Deadline(self.limits.timeout if timeout is None else timeout))

    async def recv_matching(self, match: Callable[[Frame], bool], what: str,
                            timeout: float | None = None) -> Frame:
        """The first incoming frame ``match`` accepts, discarding others; bounded by one timeout overall."""
        deadline = Deadline(self.limits.timeout if timeout is None else timeout)
        return await self._inbox.get_matching(match, what, deadline)

    def __aiter__(self) -> AsyncIterator[Frame]:
        """Incoming frames until the connection closes (liveness is kept by WebSocket pings)."""
        return self._inbox.frames()

    # Messages (``messaging``)

    async def send(self, to: str, content: str, *, message_id: str | None = None,
                   timestamp: int | None = None, timeout: float | None = None) -> Frame:
        """Send a message and return the relay's answer: ``delivered``, ``queued`` or ``error``.

        Resending the same ``message_id`` after a lost answer is safe: the relay
        answers again and delivers once. Raises ClientTimeout or ConnectionLost.
        """
        return await self.messaging.send(to, content, message_id=message_id, timestamp=timestamp,
                                         timeout=timeout)

    async def ping(self, timeout: float | None = None) -> Frame:
        """Application-level ping; returns the ``pong`` frame."""
        return await self.messaging.ping(timeout)

    async def ack(self, message_ids: list[str]) -> None:
        """Acknowledge received messages (ack mode), in frames of at most 1000 ids."""
        await self.messaging.ack(message_ids)

    async def typing(self, to: str, is_typing: bool = True) -> None:
        await self.messaging.typing(to, is_typing)

    async def read_receipt(self, to: str, message_id: str) -> None:
        """Tell ``to`` (the sender) that its message ``message_id`` was read."""
        await self.messaging.read_receipt(to, message_id)

    # Push notifications (``messaging``): see docs/push.md

    async def push_subscribe(self, subscription: Frame | None = None, *, provider: str | None = None,
                             token: str | None = None, timeout: float | None = None) -> Frame:
        """Subscribe this address to pushes: a Web Push ``PushSubscription`` JSON, or ``provider`` fcm/apns
        with its device ``token``. Returns ``{"type": "push_subscribed", "id"}`` or the error frame."""
        frame: Frame = {"type": "push_subscribe"}
        if subscription is not None:
            frame["subscription"] = subscription
        if provider is not None:
            frame["provider"] = provider
        if token is not None:
            frame["token"] = token
        return await self.messaging.push(frame, timeout)

    async def push_unsubscribe(self, subscription_id: str, timeout: float | None = None) -> Frame:
        """Remove one subscription; returns ``push_unsubscribed`` or the error frame."""
        return await self.messaging.push({"type": "push_unsubscribe", "id": subscription_id}, timeout)

    async def vapid_public_key(self) -> str:
        """The relay's Web Push key (``applicationServerKey``); raises when push is off on the relay."""
        return str((await self.rest.request("GET", "/api/push/vapid-public-key"))["publicKey"])

    # REST (``rest``)

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      timeout: float | None = None) -> Any:
        """One REST call; returns the parsed JSON answer (see ``RestApi.request``)."""
        return await self.rest.request(method, path, body, token=token, timeout=timeout)

    async def health(self) -> Frame:
        return await self.rest.health()

    async def status(self, address: str) -> Frame:
        """``{"address", "online", "timestamp"}`` of any address."""
        return await self.rest.status(address)

    async def queue_size(self, address: str) -> int:
        return await self.rest.queue_size(address)

    async def get_key(self, address: str, *, verify: bool = False) -> Frame | None:
        """The published key record of ``address``, or None; with ``verify`` checked locally."""
        return await self.rest.get_key(address, verify=verify)

    async def put_key(self, public_key: str, *, signed: bool | None = None, issued_at: int | None = None) -> Frame:
        """Publish this identity's encryption key; signed (docs/protocol.md, "Signed keys") by default when it has a key."""
        return await self.rest.put_key(public_key, signed=signed, issued_at=issued_at)

    async def delete_key(self) -> Frame:
        """Remove this identity's key (needs the sign-in token outside open mode)."""
        return await self.rest.delete_key()

    async def messages(self, limit: int | None = None) -> Frame:
        """This identity's stored messages over REST; with ``limit`` a peek, without it they are removed."""
        return await self.rest.messages(limit)

"""The relay protocol for one session: every answer, error frame and close code is decided here.

The connection layer reports what happens on a session (opened, a frame
received, too many frames, auth timed out, closed) and the router answers
through the session's ``Outbox``. It never touches a socket; storage,
routing and sign-in are reached through injected interfaces, so it is
tested with plain objects. A bad frame never closes an authenticated
connection: it gets exactly one ``error`` frame.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .backlog import Backlog
from ..clock import Clock, wall_ms
from ..config import Config
from .history import History
from .delivery import Delivery
from ..errors import CLOSE_CODES, CloseCode, ErrorCode, RelayError
from ..frames import decode, field_address, field_bool, message_id_of, utf8_len
from ..identity.auth import SignIn
from ..ops.metrics import RelayMetrics
from .push import PushFrames
from .senders import Answers
from .seams import NO_PEERS, NO_PUSH, MessagePath, Peers, PushRegistry, Routes, SignInService
from ..ratelimit import Verdict
from .session import Session
from ..storage.store import QueuedMessage, StorageUnavailable, Store
from .writes import AddressWrites

log = logging.getLogger("relayd.protocol.router")

Handler = Callable[[Session, dict[str, Any]], Awaitable[None] | None]
"""Applies one decoded frame; returns an awaitable when it must wait (sign-in, storing), else None."""


class Router:
    """Applies the seed protocol plus relayd's sign-in and ack extensions to sessions."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics,
                 authenticator: SignInService, clock: Clock, *, delivery: MessagePath | None = None,
                 peers: Peers = NO_PEERS, writes: AddressWrites | None = None,
                 push: PushRegistry = NO_PUSH, answers: Answers | None = None) -> None:
        """``delivery``: the message path (``Delivery`` on this instance when None); ``peers``: the other
        instances sharing the store; ``writes``: the pending writes per address, shared with whatever else
        writes for an address (a backlog read awaits them); ``push``: push subscriptions; ``answers``: with peers,
        the local message path's memory of messageIds (``Delivery.answers``), where a flush records what it pushed."""
        self.routes = routes
        self.peers = peers
        self.metrics = metrics
        self.authenticator = authenticator
        self.clock = clock
        writes = writes if writes is not None else AddressWrites()
        if delivery is None:
            delivery = Delivery(config, routes, store, metrics, clock, writes)
        self.delivery: MessagePath = delivery
        self.backlog = Backlog(config, routes, store, metrics, clock, writes, peers, answers)
        self.delivery.on_stored = self.backlog.stored
        self.history = History(config, store)
        self.push = PushFrames(config, push)
        self.max_preauth = 0
        self._handlers: dict[str, Handler] = {
            "auth": self._on_auth,
            "message": self.delivery.message,
            "typing": self._on_typing,
            "read_receipt": self.delivery.read_receipt,
            "ping": self._on_ping,
            "ack": self.backlog.ack,
            "history": self.history.page,
            "history_delete": self.history.delete,
            "push_subscribe": self.push.subscribe,
            "push_unsubscribe": self.push.unsubscribe,
        }
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply (re)loaded limits; called at start and on SIGHUP."""
        self.max_preauth = config.limits.max_preauth_frame_bytes
        self.delivery.configure(config)
        self.backlog.configure(config)
        self.history.configure(config)
        self.push.configure(config)

    # Events from the connection layer

    def opened(self, session: Session) -> None:
        """A WebSocket opened: send the sign-in challenge, if the mode has one."""
        challenge = self.authenticator.challenge(session.id)
        if challenge is not None:
            session.send(challenge)

    def receive(self, session: Session, raw: str | bytes) -> Awaitable[None] | None:
        """Apply one frame from ``session``: answer it, route it, or refuse it. Never raises.

        Returns None once the frame has been applied (live routing, pings,
        typing, errors: no I/O to wait for), else an awaitable that the
        caller must await before it hands over the session's next frame
        (sign-in, a full write pipeline). Messages that must be stored are
        answered later, in order, while the caller reads on (see
        ``Delivery.message``).
        """
        frame: dict[str, Any] | None = None
        try:
            if session.address is None and (
                    len(raw) if isinstance(raw, (bytes, bytearray)) else utf8_len(raw)) > self.max_preauth:
                self.metrics.rate_limited.labels(limit="preauth_size").inc()
                self._refuse(session, RelayError(ErrorCode.MESSAGE_TOO_LARGE,
                                                 f"Frames before auth are limited to {self.max_preauth} bytes"),
                             CloseCode.MESSAGE_TOO_BIG)
                return None
            frame = decode(raw)
            ftype = frame.get("type")
            handler = self._handlers.get(ftype) if isinstance(ftype, str) else None
            if handler is None:
                if ftype is None:
                    raise RelayError(ErrorCode.MISSING_FIELD, "Missing field: type")
                raise RelayError(ErrorCode.UNKNOWN_TYPE, f"Unknown frame type: {str(ftype)[:64]}")
            if session.address is None:
                if ftype != "auth":
                    raise RelayError(ErrorCode.NOT_AUTHENTICATED)
            elif not session.ready:
                self.backlog.listening(session)
            pending = handler(session, frame)
            if pending is not None:
                return self._finish(session, frame, pending)
            self.metrics.frame_ok.inc()
        except Exception as exc:
            self._failed(session, frame, exc)
        return None

    async def _finish(self, session: Session, frame: dict[str, Any], pending: Awaitable[None]) -> None:
        try:
            await pending
            self.metrics.frame_ok.inc()
        except Exception as exc:
            self._failed(session, frame, exc)

    def _failed(self, session: Session, frame: dict[str, Any] | None, exc: Exception) -> None:
        """A frame was refused (``RelayError``: its error frame and close code) or broke a handler (logged)."""
        self.metrics.frame_error.inc()
        if isinstance(exc, RelayError):
            if exc.message_id is None and frame is not None:
                exc.message_id = message_id_of(frame)
            self._refuse(session, exc, CLOSE_CODES.get(exc.code))
            return
        log.error("internal error handling a frame", exc_info=exc)
        session.send(RelayError(ErrorCode.INTERNAL_ERROR, message_id=message_id_of(frame or {})).frame())

    def throttled(self, session: Session, verdict: Verdict) -> None:
        """The session sent frames faster than ``frames_per_s`` allows; the frame was dropped."""
        self.metrics.rate_limited.labels(limit="frames").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("frame rate limit hit by session %d", session.id)
        if verdict is Verdict.CLOSE:
            session.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        else:
            session.send(RelayError(ErrorCode.RATE_LIMITED, "Too many frames; slow down").frame())

    def undelivered(self, session: Session, parcels: list[Any]) -> None:
        """The connection ended before these messages' bytes reached the peer: keep them for its next one."""
        self.delivery.undelivered(session, parcels)

    def auth_timed_out(self, session: Session) -> None:
        """No ``auth`` within ``[server] auth_timeout_s``."""
        self._refuse(session, RelayError(ErrorCode.AUTH_TIMEOUT), CLOSE_CODES[ErrorCode.AUTH_TIMEOUT],
                     "authentication timeout")

    def closed(self, session: Session) -> None:
        """The connection is gone: forget the session everywhere."""
        session.closed = True
        self.authenticator.forget(session.id)
        self.delivery.closed(session)
        self.backlog.closed(session)
        if session.address is not None and self.routes.detach(session) and log.isEnabledFor(logging.DEBUG):
            log.debug("%s went offline", session.address)

    def evict_unverified(self, address: str) -> None:
        """Once an address proves ownership, sessions that merely claimed it must go, on every instance."""
        self.evict_here(address)
        self.peers.evict_unverified(address)

    def evict_here(self, address: str) -> None:
        """The unsigned sessions of ``address`` on this instance go."""
        refusal = RelayError(ErrorCode.AUTH_REQUIRED, "This address has proven ownership: sign in with a signature")
        for session in self.routes.sessions(address):
            if not session.verified:
                self._refuse(session, refusal, CLOSE_CODES[ErrorCode.AUTH_REQUIRED])
                self.closed(session)

    def key_uploaded(self, address: str) -> None:
        """A key was published for ``address`` over REST: its app is about to listen (on any instance)."""
        self.backlog.key_uploaded(address)
        self.peers.key_uploaded(address)

    async def settle(self) -> None:
        """Wait until every message, receipt and ack being stored has landed (shutdown, tests)."""
        await self.delivery.settle()
        await self.backlog.settle()

    def _refuse(self, session: Session, err: RelayError, close: CloseCode | None, reason: str | None = None) -> None:
        session.send(err.frame())
        if close is not None:
            session.close(close, reason or err.code.value)

    # Frames

    async def _on_auth(self, session: Session, frame: dict[str, Any]) -> None:
        address = field_address(frame, "address")
        if session.address is not None:
            if session.address != address:
                raise RelayError(ErrorCode.ALREADY_AUTHENTICATED)
            session.send({"type": "auth_success", "address": address, "timestamp": wall_ms(self.clock),
                          "verified": session.verified})
            return
        ack = field_bool(frame, "ack", default=False)
        result = await self.authenticator.sign_in(session.id, session.ip, address, frame)
        if session.closed:
            return
        session.address = address
        session.spelling = frame["address"]
        session.ack = ack
        session.verified = result.proven
        self.routes.attach(session)
        self.push.registry.signed_in(address)
        if result.proven:
            self.evict_unverified(address)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %d authenticated as %s (ack=%s)", session.id, address, ack)
        try:
            empty = await self.backlog.prepare(session)
        except StorageUnavailable as exc:
            log.error("cannot read the offline queue: %s; live delivery continues", exc)
            session.send({"type": "auth_success", "address": address, "timestamp": wall_ms(self.clock),
                          **result.fields})
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE,
                             "Storage is unavailable; the stored backlog was not sent") from None
        if session.closed:
            return
        session.send({"type": "auth_success", "address": address, "timestamp": wall_ms(self.clock),
                      **result.fields})
        if not empty:
            flushing = self.backlog.start(session)
            if flushing is not None:
                await flushing
        elif session.ack:
            session.send({"type": "queue_empty"})

    def _on_typing(self, session: Session, frame: dict[str, Any]) -> None:
        to = field_address(frame, "to")
        is_typing = field_bool(frame, "isTyping")
        typing = {"type": "typing", "from": session.spelling, "isTyping": is_typing}
        self.delivery.typing(typing, to)

    def _on_ping(self, session: Session, frame: dict[str, Any]) -> Awaitable[None] | None:
        """A pong; an ack session's comes once its earlier acks are stored, so it confirms them."""
        if session.ack and session.address is not None and self.backlog.acks_pending(session.address):
            return self._pong_after_acks(session, session.address)
        session.send({"type": "pong", "timestamp": wall_ms(self.clock)})
        return None

    async def _pong_after_acks(self, session: Session, address: str) -> None:
        await self.backlog.acks_written(address)
        session.send({"type": "pong", "timestamp": wall_ms(self.clock)})

"""The relay protocol: one decoded frame in, frames out and writes to the store.

The router knows sessions only through ``Session.push`` and addresses only
through ``Routes``; it never touches a socket, so it is tested with plain
objects. Every refusal is a ``RelayError`` turned into one ``error`` frame;
a bad frame never closes a connection here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from .config import Config
from .errors import CLOSE_CODES, ErrorCode, RelayError
from .frames import (
    decode,
    encode,
    field_address,
    field_bool,
    field_message_id,
    field_str,
    field_timestamp,
    message_id_of,
    utf8_len,
)
from .ops.metrics import RelayMetrics
from .presence import Routes
from .ratelimit import TokenBucket
from .session import Session
from .storage.store import (
    EnqueueResult,
    QueuedMessage,
    QueueLimits,
    Receipt,
    StorageUnavailable,
    Store,
)

log = logging.getLogger("relayd.router")

FLUSH_BATCH = 256
MAX_ACK_IDS = 1000
RECENT_IDS = 16384
MAX_IN_FLIGHT = 64

Handler = Callable[[Session, dict[str, Any]], Awaitable[None]]


def now_ms() -> int:
    return int(time.time() * 1000)


def message_data(sender: str, content: str, message_id: str, timestamp: int, *, queued: bool) -> str:
    """The encoded ``message`` frame a recipient gets, live or from its queue."""
    return encode({"type": "message", "from": sender, "content": content, "messageId": message_id,
                   "timestamp": timestamp, "queued": queued})


class Router:
    """Applies the seed protocol plus relayd's ack extension."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics,
                 authenticator: Any = None) -> None:
        self.routes = routes
        self.store = store
        self.metrics = metrics
        self.authenticator = authenticator
        self._recent: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._in_flight: set[asyncio.Future[None]] = set()
        self._queue_window: dict[str, set[str]] = {}
        self._queue_window_start = time.monotonic()
        self._handlers: dict[str, Handler] = {
            "auth": self._on_auth,
            "message": self._on_message,
            "typing": self._on_typing,
            "read_receipt": self._on_read_receipt,
            "ping": self._on_ping,
            "ack": self._on_ack,
        }
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply (re)loaded limits; called at start and on SIGHUP."""
        limits = config.limits
        self.max_content = limits.max_message_bytes
        self.max_preauth = limits.max_preauth_frame_bytes
        self.frame_rate = limits.frames_per_s
        self.frame_burst = limits.frame_burst
        self.strike_limit = limits.rate_limited_close_after
        self.new_queues = limits.new_queues_per_sender_per_hour
        q = config.queue
        self.limits = QueueLimits(q.max_offline_messages, q.max_offline_bytes, q.overflow == "drop_oldest")

    async def handle(self, session: Session, raw: str | bytes) -> None:
        frame: dict[str, Any] | None = None
        try:
            if session.address is None and (
                    len(raw) if isinstance(raw, (bytes, bytearray)) else utf8_len(raw)) > self.max_preauth:
                self.metrics.rate_limited.labels(limit="preauth_size").inc()
                session.send(RelayError(ErrorCode.MESSAGE_TOO_LARGE,
                                        f"Frames before auth are limited to {self.max_preauth} bytes").frame())
                session.close(1009, "frame too large before auth")
                return
            if self.frame_rate and not self._admit(session):
                return
            frame = decode(raw)
            ftype = frame.get("type")
            handler = self._handlers.get(ftype) if isinstance(ftype, str) else None
            if handler is None:
                if ftype is None:
                    raise RelayError(ErrorCode.MISSING_FIELD, "Missing field: type", message_id=message_id_of(frame))
                raise RelayError(ErrorCode.UNKNOWN_TYPE, f"Unknown frame type: {str(ftype)[:64]}",
                                 message_id=message_id_of(frame))
            if session.address is None and ftype != "auth":
                raise RelayError(ErrorCode.NOT_AUTHENTICATED, message_id=message_id_of(frame))
            await handler(session, frame)
            self.metrics.frame_ok.inc()
        except RelayError as err:
            self.metrics.frame_error.inc()
            if err.message_id is None and frame is not None:
                err.message_id = message_id_of(frame)
            session.send(err.frame())
            close_code = CLOSE_CODES.get(err.code)
            if close_code is not None:
                session.close(close_code, err.code.value)
        except Exception:
            log.exception("internal error handling a frame")
            self.metrics.frame_error.inc()
            session.send(RelayError(ErrorCode.INTERNAL_ERROR, message_id=message_id_of(frame or {})).frame())

    def _admit(self, session: Session) -> bool:
        """Per-connection token bucket: refuse with rate_limited, close on sustained abuse."""
        now = time.monotonic()
        bucket = session.bucket
        if bucket is None:
            bucket = session.bucket = TokenBucket(self.frame_rate, self.frame_burst, now)
        if bucket.take(now):
            session.strikes = 0
            return True
        session.strikes += 1
        self.metrics.rate_limited.labels(limit="frames").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("frame rate limit hit by session %d", session.id)
        if session.strikes >= self.strike_limit:
            session.close(1008, "rate limit exceeded")
        else:
            session.send(RelayError(ErrorCode.RATE_LIMITED, "Too many frames; slow down").frame())
        return False

    # Session lifecycle

    async def _on_auth(self, session: Session, frame: dict[str, Any]) -> None:
        address = field_address(frame, "address")
        if session.address is not None:
            if session.address != address:
                raise RelayError(ErrorCode.ALREADY_AUTHENTICATED)
            session.send({"type": "auth_success", "address": address, "timestamp": now_ms()})
            return
        ack = field_bool(frame, "ack", default=False)
        extra: dict[str, Any] = {}
        if self.authenticator is not None:
            extra = await self.authenticator.authenticate(session, address, frame)
        if session.closed:
            return
        session.extra = None
        session.address = address
        session.ack = ack
        self.routes.attach(session)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %d authenticated as %s (ack=%s)", session.id, address, ack)
        session.send({"type": "auth_success", "address": address, "timestamp": now_ms(), **extra})
        await self.flush(session)

    def closed(self, session: Session) -> None:
        session.closed = True
        if session.address is not None and self.routes.detach(session) and log.isEnabledFor(logging.DEBUG):
            log.debug("%s went offline", session.address)

    async def flush(self, session: Session) -> None:
        """Send the stored backlog in order, then mark the session ready for live traffic.

        While a session is not ready, messages for it are stored, so they
        join the backlog behind older ones instead of overtaking them.
        """
        address = session.address
        assert address is not None
        after = 0
        try:
            while not session.closed:
                batch = await self.store.pending(address, FLUSH_BATCH, after)
                if not batch:
                    session.ready = True
                    break
                written = []
                for msg in batch:
                    waiter = session.congested()
                    if waiter is not None:
                        await waiter
                    if not session.push(message_data(msg.sender, msg.content, msg.message_id, msg.timestamp,
                                                     queued=True)):
                        break
                    written.append(msg.seq)
                self.metrics.flushed.inc(len(written))
                after = batch[-1].seq
                if not session.ack and written:
                    await self.store.remove(address, written)
                if len(written) < len(batch):
                    return
            while not session.closed:
                receipts = await self.store.receipts(address, FLUSH_BATCH)
                sent = []
                for r in receipts:
                    if not session.send({"type": "read", "from": r.reader, "messageId": r.message_id,
                                         "timestamp": r.timestamp}):
                        break
                    sent.append(r.seq)
                if sent:
                    await self.store.remove_receipts(address, sent)
                if len(sent) < FLUSH_BATCH:
                    break
        except StorageUnavailable as exc:
            log.error("cannot read the offline queue: %s; live delivery continues", exc)
            if not session.closed:
                session.ready = True
                session.send(RelayError(ErrorCode.STORAGE_UNAVAILABLE,
                                        "Storage is unavailable; the stored backlog was not sent").frame())
            return
        except ConnectionError:
            return
        if session.ack and not session.closed:
            session.send({"type": "queue_empty"})

    # Traffic

    async def _on_message(self, session: Session, frame: dict[str, Any]) -> None:
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        content = field_str(frame, "content", max_len=self.max_content, message_id=mid)
        stamp = field_timestamp(frame, "timestamp", message_id=mid)
        sender = session.address
        assert sender is not None and content is not None
        key = (sender, to, mid)
        answer = self._recent.get(key)
        if answer is None:
            now = now_ms()
            timestamp = now if stamp is None else stamp
            targets = self.routes.ready_sessions(to)
            if targets and not session.in_flight and not any(s.ack for s in targets):
                data = message_data(sender, content, mid, timestamp, queued=False)
                if sum(s.push(data) for s in targets):
                    self.metrics.routed_live.inc()
                    answer = "delivered"
            if answer is None:
                await self._store_later(session, key, QueuedMessage(to, sender, mid, content, timestamp, now))
                return
            self._remember(key, answer)
        session.send({"type": answer, "messageId": mid, "to": to, "timestamp": now_ms()})

    async def _store_later(self, session: Session, key: tuple[str, str, str], msg: QueuedMessage) -> None:
        """Store a message and answer when it is committed, while the connection reads on.

        Writes start in arrival order and the store commits them in that
        order, so one connection can keep many messages in flight, which the
        group commit turns into throughput. While a sender has writes in
        flight its later messages take the same path, so none overtakes an
        earlier one; past ``MAX_IN_FLIGHT`` the connection waits.
        """
        try:
            self._check_new_queue(msg.sender, msg.recipient, msg.message_id)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            raise
        if session.in_flight >= MAX_IN_FLIGHT:
            await asyncio.wait([session.tail])
        session.in_flight += 1
        task = asyncio.ensure_future(self._store_and_answer(session, key, msg))
        session.tail = task
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _store_and_answer(self, session: Session, key: tuple[str, str, str], msg: QueuedMessage) -> None:
        try:
            try:
                result = await self.store.enqueue(msg, self.limits)
            except StorageUnavailable:
                raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=msg.message_id) from None
            if result is EnqueueResult.FULL:
                raise RelayError(ErrorCode.QUEUE_FULL, message_id=msg.message_id)
            answer = "queued" if result is EnqueueResult.DUPLICATE else await self._deliver_stored(msg)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            session.send(err.frame())
            return
        except Exception:
            log.exception("internal error storing a message")
            session.send(RelayError(ErrorCode.INTERNAL_ERROR, message_id=msg.message_id).frame())
            return
        finally:
            session.in_flight -= 1
        self._remember(key, answer)
        session.send({"type": answer, "messageId": msg.message_id, "to": msg.recipient, "timestamp": now_ms()})

    async def settle(self) -> None:
        """Wait for every message still being stored (tests, shutdown)."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    async def _deliver_stored(self, msg: QueuedMessage) -> str:
        """Push a just-committed message to whoever became ready meanwhile.

        Ack sessions keep it stored until they ack; if only plain sessions
        took it, it leaves the store as the original relay's semantics say.
        """
        targets = self.routes.ready_sessions(msg.recipient)
        taken: list[Session] = []
        if targets:
            data = message_data(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
            taken = [s for s in targets if s.push(data)]
        if not taken:
            self.metrics.queued.inc()
            return "queued"
        self.metrics.routed_live.inc()
        if not any(s.ack for s in taken):
            try:
                await self.store.remove(msg.recipient, [msg.seq])
            except StorageUnavailable as exc:
                log.error("cannot remove a delivered message: %s", exc)
        return "delivered"

    def _check_new_queue(self, sender: str, to: str, mid: str) -> None:
        """Bound how many distinct offline recipients one sender may queue for per hour,
        so random ``to`` addresses cannot fill the disk."""
        if not self.new_queues:
            return
        if time.monotonic() - self._queue_window_start >= 3600:
            self._queue_window.clear()
            self._queue_window_start = time.monotonic()
        recipients = self._queue_window.setdefault(sender, set())
        if to in recipients:
            return
        if len(recipients) >= self.new_queues:
            self.metrics.rate_limited.labels(limit="new_queues").inc()
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour",
                             message_id=mid)
        recipients.add(to)

    def _remember(self, key: tuple[str, str, str], answer: str) -> None:
        recent = self._recent
        recent[key] = answer
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)

    async def _on_typing(self, session: Session, frame: dict[str, Any]) -> None:
        to = field_address(frame, "to")
        is_typing = field_bool(frame, "isTyping")
        targets = self.routes.ready_sessions(to)
        if targets:
            data = encode({"type": "typing", "from": session.address, "isTyping": is_typing})
            for s in targets:
                s.push(data)

    async def _on_read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        reader = session.address
        assert reader is not None
        stamp = now_ms()
        targets = self.routes.ready_sessions(to)
        if targets:
            data = encode({"type": "read", "from": reader, "messageId": mid, "timestamp": stamp})
            if sum(s.push(data) for s in targets):
                return
        try:
            await self.store.add_receipt(Receipt(to, reader, mid, stamp))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Storage is unavailable; the receipt was not stored",
                             message_id=mid) from None

    async def _on_ping(self, session: Session, frame: dict[str, Any]) -> None:
        session.send({"type": "pong", "timestamp": now_ms()})

    async def _on_ack(self, session: Session, frame: dict[str, Any]) -> None:
        ids = frame.get("messageIds")
        if ids is None:
            raise RelayError(ErrorCode.MISSING_FIELD, "Missing field: messageIds")
        if (not isinstance(ids, list) or len(ids) > MAX_ACK_IDS
                or not all(isinstance(i, str) and i for i in ids)):
            raise RelayError(ErrorCode.INVALID_FIELD,
                             f"Field messageIds must be a list of at most {MAX_ACK_IDS} non-empty strings")
        if not ids:
            return
        assert session.address is not None
        try:
            removed = await self.store.ack(session.address, ids)
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Storage is unavailable; ack not recorded") from None
        self.metrics.acked.inc(removed)

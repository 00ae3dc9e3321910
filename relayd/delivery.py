"""Getting messages and receipts to their recipients: live when a ready session takes them, else stored.

A message to a recipient with a ready session is pushed and answered
``delivered`` at once. Otherwise it is stored, and the sender is answered
``queued`` only after the store has committed it; meanwhile the sender's
connection reads on (up to ``MAX_IN_FLIGHT`` writes), and its later messages
follow the same path so that none overtakes an earlier one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from .clock import Clock, wall_ms
from .config import Config
from .errors import ErrorCode, RelayError
from .frames import encode, field_address, field_message_id, field_str, field_timestamp
from .ops.metrics import RelayMetrics
from .presence import Routes
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
NEW_QUEUE_WINDOW_S = 3600.0

Ident = tuple[str, str, str]
"""(sender, recipient, messageId): what makes a message the same message."""


def message_text(sender: str, content: str, message_id: str, timestamp: int, *, queued: bool) -> str:
    """The encoded ``message`` frame a recipient gets, live or from its queue."""
    return encode({"type": "message", "from": sender, "content": content, "messageId": message_id,
                   "timestamp": timestamp, "queued": queued})


class _Pipeline:
    """One sender's stored-but-unanswered messages: how many, and the last one's task."""

    __slots__ = ("in_flight", "tail")

    def __init__(self) -> None:
        self.in_flight = 0
        self.tail: asyncio.Future[None] | None = None


class Delivery:
    """The message path of the protocol: live routing, storing, answering, backlog flush, acks."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock) -> None:
        self.routes = routes
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._recent: OrderedDict[Ident, str] = OrderedDict()
        self._pipelines: dict[Session, _Pipeline] = {}
        self._writes: set[asyncio.Future[None]] = set()
        self._new_queues: dict[str, set[str]] = {}
        self._new_queues_since = clock.monotonic()
        self.configure(config)

    def configure(self, config: Config) -> None:
        limits = config.limits
        self.max_content = limits.max_message_bytes
        self.new_queue_budget = limits.new_queues_per_sender_per_hour
        q = config.queue
        self.limits = QueueLimits(q.max_offline_messages, q.max_offline_bytes, q.overflow == "drop_oldest")

    def in_flight(self, session: Session) -> int:
        """How many of ``session``'s messages are being stored and not yet answered."""
        pipeline = self._pipelines.get(session)
        return pipeline.in_flight if pipeline else 0

    def undelivered(self, session: Session, parcels: list[Any]) -> None:
        """Messages pushed to a plain session whose bytes never reached its peer (to be stored again)."""

    def closed(self, session: Session) -> None:
        """Forget a closed sender's pipeline; its writes still finish and are answered into the void."""
        self._pipelines.pop(session, None)

    async def settle(self) -> None:
        """Wait for every message still being stored (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def forward(self, frame: dict[str, Any], to: str) -> int:
        """Push a frame that is never stored (typing) to every ready session of ``to``; how many took it."""
        targets = self.routes.ready_sessions(to)
        if not targets:
            return 0
        data = encode(frame)
        return sum(s.push(data) for s in targets)

    # Messages

    async def message(self, session: Session, frame: dict[str, Any]) -> None:
        """Route one ``message`` frame; answer ``delivered``, ``queued`` or an error, in send order."""
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        content = field_str(frame, "content", max_len=self.max_content, message_id=mid)
        stamp = field_timestamp(frame, "timestamp", message_id=mid)
        sender = session.address
        assert sender is not None and content is not None
        ident = (sender, to, mid)
        answer = self._recent.get(ident)
        if answer is None:
            now = wall_ms(self.clock)
            timestamp = now if stamp is None else stamp
            targets = self.routes.ready_sessions(to)
            pipeline = self._pipelines.get(session)
            if targets and not (pipeline and pipeline.in_flight) and not any(s.ack for s in targets):
                data = message_text(sender, content, mid, timestamp, queued=False)
                if sum(s.push(data) for s in targets):
                    self.metrics.routed_live.inc()
                    answer = "delivered"
            if answer is None:
                await self._store_then_answer(session, ident, QueuedMessage(to, sender, mid, content, timestamp, now))
                return
            self._remember(ident, answer)
        session.send({"type": answer, "messageId": mid, "to": to, "timestamp": wall_ms(self.clock)})

    async def _store_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage) -> None:
        """Start storing ``msg`` and return; the answer goes out once the store has committed it.

        Past ``MAX_IN_FLIGHT`` unanswered writes the sender waits for its
        oldest, which is what bounds the memory one connection can pin.
        """
        try:
            self._spend_new_queue(msg.sender, msg.recipient, msg.message_id)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            raise
        pipeline = self._pipelines.get(session)
        if pipeline is None:
            pipeline = self._pipelines[session] = _Pipeline()
        if pipeline.in_flight >= MAX_IN_FLIGHT and pipeline.tail is not None:
            await asyncio.wait([pipeline.tail])
        pipeline.in_flight += 1
        task = asyncio.ensure_future(self._store_and_answer(session, pipeline, ident, msg))
        pipeline.tail = task
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store_and_answer(self, session: Session, pipeline: _Pipeline, ident: Ident,
                                msg: QueuedMessage) -> None:
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
            pipeline.in_flight -= 1
        self._remember(ident, answer)
        session.send({"type": answer, "messageId": msg.message_id, "to": msg.recipient,
                      "timestamp": wall_ms(self.clock)})

    async def _deliver_stored(self, msg: QueuedMessage) -> str:
        """Push a just-committed message to whoever became ready meanwhile.

        Ack sessions keep it stored until they ack; if only plain sessions
        took it, it leaves the store as the original relay's semantics say.
        """
        targets = self.routes.ready_sessions(msg.recipient)
        taken: list[Session] = []
        if targets:
            data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
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

    def _spend_new_queue(self, sender: str, to: str, mid: str) -> None:
        """Bound how many distinct offline recipients one sender may queue for per hour,
        so random ``to`` addresses cannot fill the disk."""
        if not self.new_queue_budget:
            return
        now = self.clock.monotonic()
        if now - self._new_queues_since >= NEW_QUEUE_WINDOW_S:
            self._new_queues.clear()
            self._new_queues_since = now
        recipients = self._new_queues.setdefault(sender, set())
        if to in recipients:
            return
        if len(recipients) >= self.new_queue_budget:
            self.metrics.rate_limited.labels(limit="new_queues").inc()
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour",
                             message_id=mid)
        recipients.add(to)

    def _remember(self, ident: Ident, answer: str) -> None:
        recent = self._recent
        recent[ident] = answer
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)

    # Receipts and acks

    async def read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        """Forward a read receipt to the sender's ready sessions, or store it for its next connection."""
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        reader = session.address
        assert reader is not None
        stamp = wall_ms(self.clock)
        if self.forward({"type": "read", "from": reader, "messageId": mid, "timestamp": stamp}, to):
            return
        try:
            await self.store.add_receipt(Receipt(to, reader, mid, stamp))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Storage is unavailable; the receipt was not stored",
                             message_id=mid) from None

    async def ack(self, session: Session, frame: dict[str, Any]) -> None:
        """Remove acknowledged messages of an ack-mode session's address."""
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

    # Backlog

    async def flush(self, session: Session) -> None:
        """Send the stored backlog in order, then mark the session ready for live traffic.

        While a session is not ready, messages for it are stored, so they
        join the backlog behind older ones instead of overtaking them.
        Plain sessions have what they were sent removed; ack sessions keep it
        until acked and get ``queue_empty`` at the end.
        """
        address = session.address
        assert address is not None
        try:
            if not await self._flush_messages(session, address):
                return
            await self._flush_receipts(session, address)
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

    async def _flush_messages(self, session: Session, address: str) -> bool:
        """True once the whole backlog was written and the session is ready."""
        after = 0
        while not session.closed:
            batch = await self.store.pending(address, FLUSH_BATCH, after)
            if not batch:
                session.ready = True
                return True
            written = []
            for msg in batch:
                waiter = session.outbox.congested()
                if waiter is not None:
                    await waiter
                if not session.push(message_text(msg.sender, msg.content, msg.message_id, msg.timestamp,
                                                 queued=True)):
                    break
                written.append(msg.seq)
            self.metrics.flushed.inc(len(written))
            after = batch[-1].seq
            if not session.ack and written:
                await self.store.remove(address, written)
            if len(written) < len(batch):
                return False
        return False

    async def _flush_receipts(self, session: Session, address: str) -> None:
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
                return

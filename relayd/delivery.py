"""Getting messages and receipts to their recipients: live when a ready session takes them, else stored.

A message to a recipient with a ready session is pushed and answered
``delivered`` at once; if that session's connection then ends before the
frame's bytes reached its peer, the message is stored after all
(``undelivered``). Otherwise it is stored, and the sender is answered
``queued`` only after the store has committed it; meanwhile the sender's
connection reads on (up to ``MAX_IN_FLIGHT`` writes or ``MAX_IN_FLIGHT_BYTES``),
and its later messages follow the same path so that none overtakes an
earlier one. Receipts for offline senders are stored in batches, one
commit per loop iteration.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Callable

from .clock import Clock, wall_ms
from .config import Config
from .errors import ErrorCode, RelayError
from .frames import encode, field_address, field_message_id, field_str, field_timestamp
from .net.clientip import limit_key
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
from .writes import AddressWrites

log = logging.getLogger("relayd.router")

RECENT_IDS = 16384
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 1 << 20
NEW_QUEUE_WINDOW_S = 3600.0

Ident = tuple[str, str, str]
"""(sender, recipient, messageId), addresses lower-cased: what makes a message the same message."""


def message_text(sender: str, content: str, message_id: str, timestamp: int, *, queued: bool) -> str:
    """The encoded ``message`` frame a recipient gets, live or from its queue."""
    return encode({"type": "message", "from": sender, "content": content, "messageId": message_id,
                   "timestamp": timestamp, "queued": queued})


class _Pipeline:
    """One sender's stored-but-unanswered messages: how many, how large, and the last one's task."""

    __slots__ = ("in_flight", "bytes", "tail")

    def __init__(self) -> None:
        self.in_flight = 0
        self.bytes = 0
        self.tail: asyncio.Future[None] | None = None


class Delivery:
    """The message path of the protocol: live routing, storing and answering, receipts."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock,
                 writes: AddressWrites) -> None:
        self.routes = routes
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.writes = writes
        self._recent: OrderedDict[Ident, str] = OrderedDict()
        self._pipelines: dict[Session, _Pipeline] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._new_queues: dict[str, set[str]] = {}
        self._new_queues_since = clock.monotonic()
        self._receipts: list[tuple[Session, Receipt]] = []
        self.storage_budget = 0
        """The store-wide byte budget when ``[storage] max_bytes`` is auto, as the server measured it."""
        self.on_stored: Callable[[str], None] = lambda recipient: None
        """Told the recipient of each message stored because none of its sessions was ready."""
        self.configure(config)

    def configure(self, config: Config) -> None:
        limits = config.limits
        self.max_content = limits.max_message_bytes
        self.new_queue_budget = limits.new_queues_per_sender_per_hour
        self.new_queue_budget_per_ip = limits.new_queues_per_ip_per_hour
        q = config.queue
        budget = config.storage.max_bytes if config.storage.max_bytes >= 0 else self.storage_budget
        self.limits = QueueLimits(q.max_offline_messages, q.max_offline_bytes, q.overflow == "drop_oldest", budget)
        self.max_receipts = q.max_receipts_per_recipient

    def in_flight(self, session: Session) -> int:
        """How many of ``session``'s messages are being stored and not yet answered."""
        pipeline = self._pipelines.get(session)
        return pipeline.in_flight if pipeline else 0

    def closed(self, session: Session) -> None:
        """Forget a closed sender's pipeline; its writes still finish and are answered into the void."""
        self._pipelines.pop(session, None)

    async def settle(self) -> None:
        """Wait for every message and receipt still being stored (tests, shutdown)."""
        self._store_receipts()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            msg = QueuedMessage(to, session.spelling, mid, content, now if stamp is None else stamp, now)
            targets = self.routes.ready_sessions(to)
            pipeline = self._pipelines.get(session)
            if targets and not (pipeline and pipeline.in_flight) and not any(s.ack for s in targets):
                data = message_text(msg.sender, content, mid, msg.timestamp, queued=False)
                if sum(s.push(data, msg) for s in targets):
                    self.metrics.routed_live.inc()
                    answer = "delivered"
            if answer is None:
                await self._store_then_answer(session, ident, msg)
                return
            self._remember(ident, answer)
        session.send({"type": answer, "messageId": mid, "to": to, "timestamp": wall_ms(self.clock)})

    async def _store_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage) -> None:
        """Start storing ``msg`` and return; the answer goes out once the store has committed it.

        Past ``MAX_IN_FLIGHT`` unanswered writes (or ``MAX_IN_FLIGHT_BYTES``)
        the sender waits for its oldest, which bounds what one connection pins.
        """
        try:
            self._spend_new_queue(session, msg.recipient, msg.message_id)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            raise
        pipeline = self._pipelines.get(session)
        if pipeline is None:
            pipeline = self._pipelines[session] = _Pipeline()
        while ((pipeline.in_flight >= MAX_IN_FLIGHT or pipeline.bytes >= MAX_IN_FLIGHT_BYTES)
               and pipeline.tail is not None and not pipeline.tail.done()):
            await asyncio.wait([pipeline.tail])
        size = len(msg.content)
        pipeline.in_flight += 1
        pipeline.bytes += size
        session.outbox.hold(size)
        task = asyncio.ensure_future(self._store_and_answer(session, pipeline, ident, msg, size))
        pipeline.tail = task
        self._track(task)

    async def _store_and_answer(self, session: Session, pipeline: _Pipeline, ident: Ident,
                                msg: QueuedMessage, size: int) -> None:
        try:
            try:
                result = await self.store.enqueue(msg, self.limits)
            except StorageUnavailable:
                raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=msg.message_id) from None
            if result is EnqueueResult.FULL:
                raise RelayError(ErrorCode.QUEUE_FULL, message_id=msg.message_id)
            if result is EnqueueResult.NO_SPACE:
                raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "The relay's storage budget is used up; "
                                 "nothing was queued, retry later", message_id=msg.message_id)
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
            pipeline.bytes -= size
            session.outbox.hold(-size)
        self._remember(ident, answer)
        session.send({"type": answer, "messageId": msg.message_id, "to": msg.recipient,
                      "timestamp": wall_ms(self.clock)})

    async def _deliver_stored(self, msg: QueuedMessage) -> str:
        """Push a just-committed message to whoever became ready meanwhile.

        Ack sessions keep it stored until they ack; if only plain sessions
        took it, it leaves the store (and comes back if their bytes are lost).
        """
        targets = self.routes.ready_sessions(msg.recipient)
        taken: list[Session] = []
        if targets:
            data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
            taken = [s for s in targets if s.push(data, None if s.ack else msg)]
        if not taken:
            self.metrics.queued.inc()
            self.on_stored(msg.recipient)
            return "queued"
        self.metrics.routed_live.inc()
        if not any(s.ack for s in taken):
            try:
                await self.store.remove(msg.recipient, [msg.seq])
            except StorageUnavailable as exc:
                log.error("cannot remove a delivered message: %s", exc)
        return "delivered"

    def undelivered(self, session: Session, messages: list[QueuedMessage]) -> None:
        """A plain session's connection ended before these messages' bytes reached its peer: store them again."""
        self.metrics.restored.inc(len(messages))
        log.debug("keeping %d messages a closed connection never received", len(messages))
        task = asyncio.ensure_future(self._restore(messages))
        self.writes.note(messages[0].recipient, task)
        self._track(task)

    async def _restore(self, messages: list[QueuedMessage]) -> None:
        try:
            await self.store.restore(messages)
        except StorageUnavailable as exc:
            log.error("cannot keep %d undelivered messages: %s", len(messages), exc)

    def _spend_new_queue(self, session: Session, to: str, mid: str) -> None:
        """Bound how many distinct offline recipients one sender, and one client IP, may queue for per hour,
        so random ``to`` or sender addresses cannot fill the disk."""
        if not (self.new_queue_budget or self.new_queue_budget_per_ip):
            return
        now = self.clock.monotonic()
        if now - self._new_queues_since >= NEW_QUEUE_WINDOW_S:
            self._new_queues.clear()
            self._new_queues_since = now
        assert session.address is not None
        for key, budget in ((session.address, self.new_queue_budget),
                            ("ip " + limit_key(session.ip), self.new_queue_budget_per_ip)):
            recipients = self._new_queues.get(key)
            if budget and recipients is not None and to not in recipients and len(recipients) >= budget:
                self.metrics.rate_limited.labels(limit="new_queues").inc()
                raise RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour",
                                 message_id=mid)
        for key, budget in ((session.address, self.new_queue_budget),
                            ("ip " + limit_key(session.ip), self.new_queue_budget_per_ip)):
            if budget:
                self._new_queues.setdefault(key, set()).add(to)

    def _remember(self, ident: Ident, answer: str) -> None:
        recent = self._recent
        recent[ident] = answer
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)

    # Read receipts

    def read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        """Forward a read receipt to the sender's ready sessions, or store it (in a batch) for its next one."""
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        stamp = wall_ms(self.clock)
        if self.forward({"type": "read", "from": session.spelling, "messageId": mid, "timestamp": stamp}, to):
            return
        if not self._receipts:
            asyncio.get_running_loop().call_soon(self._store_receipts)
        self._receipts.append((session, Receipt(to, session.spelling, mid, stamp)))

    def _store_receipts(self) -> None:
        batch, self._receipts = self._receipts, []
        if batch:
            task = asyncio.ensure_future(self._store_receipt_batch(batch))
            for recipient in {r.recipient for _, r in batch}:
                self.writes.note(recipient, task)
            self._track(task)

    async def _store_receipt_batch(self, batch: list[tuple[Session, Receipt]]) -> None:
        try:
            dropped = await self.store.add_receipts([r for _, r in batch], self.max_receipts)
        except StorageUnavailable:
            for session, receipt in batch:
                session.send(RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Storage is unavailable; the receipt "
                                        "was not stored", message_id=receipt.message_id).frame())
            return
        self.metrics.receipts_stored.inc(len(batch))
        if dropped:
            self.metrics.receipts_dropped.inc(dropped)

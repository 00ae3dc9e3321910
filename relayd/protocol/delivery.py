"""Getting messages and receipts to their recipients: live when a ready session takes them, else stored.

A message to a recipient with a ready session is pushed and answered
``delivered`` at once; if that session's connection then ends before the
frame's bytes reached its peer, the message is stored after all
(``undelivered``). Otherwise it is stored, and the sender is answered
``queued`` only after the store has committed it; meanwhile the sender's
connection reads on (up to ``MAX_IN_FLIGHT`` writes or ``MAX_IN_FLIGHT_BYTES``),
and its later messages follow the same path so that none overtakes an
earlier one. The messages to store are written in batches, one store call
per loop iteration. Receipts live in ``receipts``, the hourly bound on new
offline queues in ``new_queues``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..clock import Clock, wall_ms
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import answer_text, encode, field_address, field_message_id, field_str, field_timestamp, message_text
from .budgets import NewQueueBudget
from ..ops.metrics import RelayMetrics
from .presence import Routes
from .receipts import Receipts
from .session import Session
from ..storage.store import (
    EnqueueResult,
    QueuedMessage,
    QueueLimits,
    StorageUnavailable,
    Store,
)
from .writes import AddressWrites

log = logging.getLogger("relayd.protocol.router")

RECENT_IDS = 16384
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 1 << 20

Ident = tuple[str, str, str]
"""(sender, recipient, messageId), addresses lower-cased: what makes a message the same message."""


class Pipeline:
    """One sender's stored-but-unanswered messages: how many, how large, and when the last one is answered."""

    __slots__ = ("in_flight", "bytes", "tail")

    def __init__(self) -> None:
        self.in_flight = 0
        self.bytes = 0
        self.tail: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Storing:
    """A message on its way to the store, with what its answer needs."""

    session: Session
    pipeline: Pipeline
    ident: Ident
    msg: QueuedMessage
    size: int


_REFUSALS = {
    EnqueueResult.FULL: RelayError(ErrorCode.QUEUE_FULL),
    EnqueueResult.NO_SPACE: RelayError(ErrorCode.STORAGE_UNAVAILABLE, "The relay's storage budget is used up; "
                                       "nothing was queued, retry later"),
}


def refusal_of(result: EnqueueResult | None) -> RelayError | None:
    """The error a sender gets for a store result that is a refusal (its code and message), else None."""
    return _REFUSALS.get(result) if result is not None else None


class Delivery:
    """The message path of the protocol: live routing, storing and answering (receipts in ``receipts``)."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock,
                 writes: AddressWrites) -> None:
        self.routes = routes
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.writes = writes
        self._recent: OrderedDict[Ident, str] = OrderedDict()
        self._pipelines: dict[Session, Pipeline] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self.new_queues = NewQueueBudget(config, clock.monotonic())
        self.receipts = Receipts(config, self.forward, store, metrics, clock, writes, self._track)
        self._to_store: list[_Storing] = []
        self._stored: asyncio.Future[None] | None = None
        self.storage_budget = 0
        """The store-wide byte budget when ``[storage] max_bytes`` is auto, as the server measured it."""
        self.on_stored: Callable[[str], None] = lambda recipient: None
        """Told the recipient of each message stored because none of its sessions was ready."""
        self.configure(config)

    def configure(self, config: Config) -> None:
        limits = config.limits
        self.max_content = limits.max_message_bytes
        q = config.queue
        budget = config.storage.max_bytes if config.storage.max_bytes >= 0 else self.storage_budget
        self.limits = QueueLimits(q.max_offline_messages, q.max_offline_bytes, q.overflow == "drop_oldest", budget)
        self.new_queues.configure(config)
        self.receipts.configure(config)

    def in_flight(self, session: Session) -> int:
        """How many of ``session``'s messages are being stored and not yet answered."""
        pipeline = self._pipelines.get(session)
        return pipeline.in_flight if pipeline else 0

    def closed(self, session: Session) -> None:
        """Forget a closed sender's pipeline; its writes still finish and are answered into the void."""
        self._pipelines.pop(session, None)

    async def settle(self) -> None:
        """Wait for every message and receipt still being stored (tests, shutdown)."""
        self.receipts.store_waiting()
        if self._to_store:
            self._store_batch()
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

    def message(self, session: Session, frame: dict[str, Any]) -> Awaitable[None] | None:
        """Route one ``message`` frame; answer ``delivered``, ``queued`` or an error, in send order.

        A live delivery or a repeated ``messageId`` is answered at once. A
        message to store goes into the sender's write pipeline and is
        answered once committed; the return value is then None, or, while
        the pipeline is full, an awaitable that resolves once the message
        has found room (the caller reads the sender's next frame after it).
        Raises ``RelayError`` for a frame that cannot be routed.
        """
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        content = field_str(frame, "content", max_len=self.max_content, message_id=mid)
        stamp = field_timestamp(frame, "timestamp", message_id=mid)
        sender = session.address
        assert sender is not None and content is not None
        ident = (sender, to, mid)
        answer = self._recent.get(ident)
        now = wall_ms(self.clock)
        if answer is not None:
            session.push(answer_text(answer, mid, to, now))
            return None
        msg = QueuedMessage(to, session.spelling, mid, content, now if stamp is None else stamp, now)
        return self._route(session, ident, msg)

    def _route(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """A new message: live when a ready session here takes it, else stored (see ``message``)."""
        targets = self.routes.ready_sessions(msg.recipient)
        pipeline = self._pipelines.get(session)
        if targets and not (pipeline and pipeline.in_flight) and not any(s.ack for s in targets):
            data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
            pushed = 0
            for target in targets:
                pushed += target.push(data, msg)
            if pushed:
                self.metrics.routed_live.inc()
                self._remember(ident, "delivered")
                session.push(answer_text("delivered", msg.message_id, msg.recipient, msg.queued_at))
                return None
        return self._store_then_answer(session, ident, msg)

    def _store_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """Start storing ``msg``; the answer goes out once the store has committed it.

        Past ``MAX_IN_FLIGHT`` unanswered writes (or ``MAX_IN_FLIGHT_BYTES``)
        the sender waits for its oldest, which bounds what one connection pins.
        """
        try:
            self.new_queues.spend(session.address or "", session.ip, msg.recipient, self.clock.monotonic(),
                                  msg.message_id)
        except RelayError as err:
            self.metrics.rate_limited.labels(limit="new_queues").inc()
            self.metrics.refused.labels(code=err.code.value).inc()
            raise
        pipeline = self._pipelines.get(session)
        if pipeline is None:
            pipeline = self._pipelines[session] = Pipeline()
        if self._pipeline_full(pipeline):
            return self._store_when_room(session, pipeline, ident, msg)
        self._start_storing(session, pipeline, ident, msg)
        return None

    @staticmethod
    def _pipeline_full(pipeline: Pipeline) -> bool:
        return ((pipeline.in_flight >= MAX_IN_FLIGHT or pipeline.bytes >= MAX_IN_FLIGHT_BYTES)
                and pipeline.tail is not None and not pipeline.tail.done())

    async def _store_when_room(self, session: Session, pipeline: Pipeline, ident: Ident,
                               msg: QueuedMessage) -> None:
        while self._pipeline_full(pipeline):
            assert pipeline.tail is not None
            await asyncio.wait([pipeline.tail])
        self._start_storing(session, pipeline, ident, msg)

    def _start_storing(self, session: Session, pipeline: Pipeline, ident: Ident, msg: QueuedMessage) -> None:
        """Add ``msg`` to the batch stored at the end of this loop iteration (one write for all of them)."""
        size = len(msg.content)
        pipeline.in_flight += 1
        pipeline.bytes += size
        session.outbox.hold(size)
        if not self._to_store:
            self._stored = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._store_batch)
        self._to_store.append(_Storing(session, pipeline, ident, msg, size))
        pipeline.tail = self._stored

    def _store_batch(self) -> None:
        if not self._to_store:  # settle() took it already
            return
        batch, self._to_store = self._to_store, []
        stored, self._stored = self._stored, None
        task = asyncio.ensure_future(self._store_and_answer(batch))
        if stored is not None:
            task.add_done_callback(lambda _: stored.done() or stored.set_result(None))
        self._track(task)

    async def _store_and_answer(self, batch: list[_Storing]) -> None:
        """Store a batch, then answer each message in order: ``queued``, ``delivered`` or an error."""
        refusal: RelayError | None = None
        try:
            results = await self.store.enqueue_many([item.msg for item in batch], self.limits)
        except StorageUnavailable:
            results, refusal = [], RelayError(ErrorCode.STORAGE_UNAVAILABLE)
        except Exception:
            log.exception("internal error storing messages")
            results, refusal = [], RelayError(ErrorCode.INTERNAL_ERROR)
        for i, item in enumerate(batch):
            item.pipeline.in_flight -= 1
            item.pipeline.bytes -= item.size
            item.session.outbox.hold(-item.size)
            result = results[i] if refusal is None else None
            err = refusal or refusal_of(result)
            if err is not None:
                self.metrics.refused.labels(code=err.code.value).inc()
                item.session.send(RelayError(err.code, err.message, message_id=item.msg.message_id).frame())
                continue
            answer = "queued" if result is EnqueueResult.DUPLICATE else self._deliver_stored(item.msg)
            self._remember(item.ident, answer)
            item.session.push(answer_text(answer, item.msg.message_id, item.msg.recipient, wall_ms(self.clock)))

    def _deliver_stored(self, msg: QueuedMessage) -> str:
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
            self._remove_soon(msg)
        return "delivered"

    def _remove_soon(self, msg: QueuedMessage) -> None:
        """Remove a stored message that only plain sessions took (it comes back if their bytes are lost)."""
        task = asyncio.ensure_future(self._remove_delivered(msg))
        self.writes.note(msg.recipient, task)
        self._track(task)

    async def _remove_delivered(self, msg: QueuedMessage) -> None:
        try:
            await self.store.remove(msg.recipient, [msg.seq])
        except StorageUnavailable as exc:
            log.error("cannot remove a delivered message: %s", exc)

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

    def _remember(self, ident: Ident, answer: str) -> None:
        recent = self._recent
        recent[ident] = answer
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)

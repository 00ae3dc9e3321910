"""Getting messages to their recipients on one instance: live when a ready session takes them, else stored.

A message to a recipient with a ready session is pushed and answered
``delivered`` at once; if that session's connection then ends before the
frame's bytes reached its peer, the message is stored after all
(``undelivered``). Otherwise it is stored, and the sender is answered
``queued`` only after the store has committed it; meanwhile the sender's
connection reads on (within its ``senders.Pipeline``), and its later messages
follow the same path so that none overtakes an earlier one. The messages to
store are written in batches, one store call per loop iteration. A messageId
seen again is answered as the first one was, from memory or from the store
(which remembers delivered messages for the retention period). Receipts live
in ``receipts``, the hourly bound on new offline queues in ``budgets``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..clock import Clock, wall_ms
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import (
    answer_text,
    encode,
    field_address,
    field_message_id,
    field_str,
    field_timestamp,
    message_text,
    utf8_len,
)
from ..ops.metrics import RelayMetrics
from ..storage.store import (
    EnqueueResult,
    QueuedMessage,
    QueueLimits,
    StorageOutcomeUnknown,
    StorageUnavailable,
    Store,
)
from ..tasks import TaskSet
from .budgets import NewQueueBudget, OfflineBytes, low_room
from .receipts import Receipts
from .seams import Routes
from .senders import Answers, Ident, Pipeline, Pipelines, ident_of
from .session import Session
from .writes import AddressWrites

log = logging.getLogger("relayd.protocol.delivery")

REMOVE_RETRY_S = (0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""When a delivered message could not be removed, it is tried again after these pauses (about 7 s in all); the
recipient's next backlog read waits for that, as for any pending write of its address."""
RECORD_DELAY_S = 0.005
"""Live deliveries are recorded in the store in batches this far apart at most: messages that come one at a time
then cost one write per batch, not one (and a task) each; a resend before it is answered from ``Answers``."""


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


def storage_error(exc: StorageUnavailable, message_id: str | None = None) -> RelayError:
    """What a sender is told when storing failed: nothing stored, or (a write sent but not confirmed) maybe
    stored, resend the same messageId."""
    code = ErrorCode.STORAGE_TIMEOUT if isinstance(exc, StorageOutcomeUnknown) else ErrorCode.STORAGE_UNAVAILABLE
    return RelayError(code, message_id=message_id)


class Delivery:
    """The message path of one instance (``seams.MessagePath``); ``relayd.cluster`` builds on its parts."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock,
                 writes: AddressWrites) -> None:
        self.routes = routes
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.writes = writes
        self.answers = Answers()
        self.pipelines = Pipelines()
        self.tasks = TaskSet()
        self.retries = TaskSet()
        """Removals tried again while the store refuses them: not waited for by ``settle`` (a stop does not
        wait for storage to come back)."""
        self.new_queues = NewQueueBudget(config, clock.monotonic())
        self.offline_bytes = OfflineBytes(config, clock.monotonic())
        self.limits = QueueLimits(0, 0, False)
        self.receipts = Receipts(config, self.forward, store, metrics, clock, writes, self.tasks, self.offline_bytes,
                                 lambda: self.limits.max_total_bytes)
        self._to_store: list[_Storing] = []
        self._stored: asyncio.Future[None] | None = None
        self._delivered: list[QueuedMessage] = []
        self.storage_budget = 0
        self.on_stored: Callable[[str], None] = lambda recipient: None
        self.max_content = 0
        self.configure(config)

    def configure(self, config: Config) -> None:
        limits = config.limits
        self.max_content = limits.max_message_bytes
        q = config.queue
        budget = config.storage.max_bytes if config.storage.max_bytes >= 0 else self.storage_budget
        self.limits = QueueLimits(q.max_offline_messages, q.max_offline_bytes, q.overflow == "drop_oldest", budget)
        self.new_queues.configure(config)
        self.offline_bytes.configure(config)
        self.receipts.configure(config)

    def in_flight(self, session: Session) -> int:
        return self.pipelines.in_flight(session)

    def closed(self, session: Session) -> None:
        self.pipelines.closed(session)

    async def settle(self) -> None:
        self.receipts.store_waiting()
        if self._to_store:
            self._store_batch()
        self._record_delivered()
        await self.tasks.settle()

    def forward(self, frame: dict[str, Any], to: str) -> int:
        """Push a frame that is never stored to every ready session of ``to``; how many took it."""
        targets = self.routes.ready_sessions(to)
        if not targets:
            return 0
        data = encode(frame)
        return sum(s.push(data) for s in targets)

    def typing(self, frame: dict[str, Any], to: str) -> None:
        self.forward(frame, to)

    def read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        self.receipts.read_receipt(session, frame)

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
        accepted = self.accept(session, frame)
        if accepted is None:
            return None
        ident, msg = accepted
        targets = self.routes.ready_sessions(msg.recipient)
        pipeline = self.pipelines.get(session)
        if targets and not (pipeline and pipeline.in_flight) and not any_ack(targets) and not self.answers.unsure(ident):
            if self.push_live(targets, msg):
                self.answer(session, ident, msg, "delivered")
                return None
        return self._store_then_answer(session, ident, msg)

    def accept(self, session: Session, frame: dict[str, Any]) -> tuple[Ident, QueuedMessage] | None:
        """Validate a ``message`` frame into the message to route; None when its messageId was answered recently
        (answered again here, the same way). Raises ``RelayError``."""
        mid = field_message_id(frame)
        to = field_address(frame, "to", message_id=mid)
        content = field_str(frame, "content", max_len=self.max_content, message_id=mid)
        stamp = field_timestamp(frame, "timestamp", message_id=mid)
        sender = session.address
        assert sender is not None and content is not None
        ident = (sender, to, mid)
        answer = self.answers.get(ident)
        now = wall_ms(self.clock)
        if answer is not None:
            session.push(answer_text(answer, mid, to, now))
            return None
        return ident, QueuedMessage(to, session.spelling, mid, content, now if stamp is None else stamp, now)

    def answer(self, session: Session, ident: Ident, msg: QueuedMessage, answer: str) -> None:
        """Remember ``answer`` for the message and send it to the sender."""
        session.push(self.answer_text(ident, msg, answer))

    def answer_text(self, ident: Ident, msg: QueuedMessage, answer: str) -> str:
        """Remember ``answer`` for the message; the frame to send (for a caller that sends it later)."""
        self.answers.remember(ident, answer)
        return answer_text(answer, msg.message_id, msg.recipient, msg.queued_at)

    def push_live(self, targets: tuple[Session, ...], msg: QueuedMessage) -> int:
        """Push a message that is not stored to ``targets``; how many took it (then it counts as delivered)."""
        data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
        pushed = 0
        for target in targets:
            pushed += target.push(data, msg)
        if pushed:
            self.metrics.routed_live.inc()
            self.delivered_live(msg)
        return pushed

    def delivered_live(self, msg: QueuedMessage) -> None:
        """Record a message delivered without being stored, so a resend within the retention period is answered
        ``delivered`` by the store too (one write per batch, within ``RECORD_DELAY_S`` after the answer)."""
        if not self._delivered:
            asyncio.get_running_loop().call_later(RECORD_DELAY_S, self._record_delivered)
        self._delivered.append(msg)

    def _record_delivered(self) -> None:
        batch, self._delivered = self._delivered, []
        if batch:
            self.tasks.spawn(self._write_delivered(batch))

    async def _write_delivered(self, batch: list[QueuedMessage]) -> None:
        try:
            await self.store.record_delivered(batch)
        except StorageUnavailable as exc:  # the in-memory answers still catch a prompt resend
            log.warning("cannot record %d delivered messageIds: %s", len(batch), exc)

    def spend_new_queue(self, session: Session, msg: QueuedMessage) -> None:
        """Count a message for an offline recipient in the hourly budgets (recipients, bytes); raises
        ``RATE_LIMITED``."""
        now, sender, size = self.clock.monotonic(), session.address or "", utf8_len(msg.content)
        limit = "offline_bytes"
        try:
            room = low_room(self.limits.max_total_bytes, self.store.stored_bytes())
            keys = self.offline_bytes.check(sender, session.ip, size, now, msg.message_id, room)
            limit = "new_queues"
            self.new_queues.spend(sender, session.ip, msg.recipient, now, msg.message_id)
            self.offline_bytes.add(keys, size)
        except RelayError as err:
            self.metrics.rate_limited.labels(limit=limit).inc()
            self.metrics.refused.labels(code=err.code.value).inc()
            raise

    def _store_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """Start storing ``msg``; the answer goes out once the store has committed it."""
        self.spend_new_queue(session, msg)
        pipeline = self.pipelines.of(session)
        if pipeline.full:
            return self._store_when_room(session, pipeline, ident, msg)
        self._start_storing(session, pipeline, ident, msg)
        return None

    async def _store_when_room(self, session: Session, pipeline: Pipeline, ident: Ident,
                               msg: QueuedMessage) -> None:
        await pipeline.room()
        self._start_storing(session, pipeline, ident, msg)

    def _start_storing(self, session: Session, pipeline: Pipeline, ident: Ident, msg: QueuedMessage) -> None:
        """Add ``msg`` to the batch stored at the end of this loop iteration (one write for all of them)."""
        size = len(msg.content)
        pipeline.hold(session, size)
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
        task = self.tasks.spawn(self._store_and_answer(batch))
        if stored is not None:
            task.add_done_callback(lambda _: _resolve(stored))

    async def _store_and_answer(self, batch: list[_Storing]) -> None:
        """Store a batch, then answer each message in order: ``queued``, ``delivered`` or an error."""
        refusal: RelayError | None = None
        try:
            results = await self.store.enqueue_many([item.msg for item in batch], self.limits)
        except StorageUnavailable as exc:
            results, refusal = [], storage_error(exc)
            if isinstance(exc, StorageOutcomeUnknown):
                for item in batch:
                    self.answers.mark_unsure(item.ident)
        except Exception:
            log.exception("internal error storing messages")
            results, refusal = [], RelayError(ErrorCode.INTERNAL_ERROR)
        now = wall_ms(self.clock)  # one answer time for the batch: it was committed at once
        for i, item in enumerate(batch):
            item.pipeline.release(item.session, item.size)
            result = results[i] if refusal is None else None
            err = refusal or refusal_of(result)
            if err is not None:
                self.metrics.refused.labels(code=err.code.value).inc()
                item.session.send(RelayError(err.code, err.message, message_id=item.msg.message_id).frame())
                continue
            if result is EnqueueResult.DUPLICATE:
                answer = "queued"
            elif result is EnqueueResult.DELIVERED:
                answer = "delivered"
            else:
                answer = self._deliver_stored(item.msg)
            self.answers.remember(item.ident, answer)
            item.session.push(answer_text(answer, item.msg.message_id, item.msg.recipient, now))

    def _deliver_stored(self, msg: QueuedMessage) -> str:
        """Push a just-committed message to whoever became ready meanwhile.

        Ack sessions keep it stored until they ack; if only plain sessions
        took it, it leaves the store (and comes back if their bytes are lost).
        """
        taken = self.push_stored(self.routes.ready_sessions(msg.recipient), msg)
        if not taken:
            self.metrics.queued.inc()
            self.on_stored(msg.recipient)
            return "queued"
        self.metrics.routed_live.inc()
        if not any(s.ack for s in taken):
            self.remove_soon(msg)
        return "delivered"

    @staticmethod
    def push_stored(targets: tuple[Session, ...], msg: QueuedMessage) -> list[Session]:
        """Push a committed message to ``targets``: the sessions that took it (plain ones hand it back through
        ``undelivered`` if their connection ends first)."""
        if not targets:
            return []
        data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
        return [s for s in targets if s.push(data, None if s.ack else msg)]

    def remove_soon(self, msg: QueuedMessage) -> None:
        """Remove a stored message that only plain sessions took (it comes back if their bytes are lost)."""
        self.remove_delivered(msg.recipient, [msg.seq])

    def remove_delivered(self, recipient: str, seqs: list[int]) -> None:
        """Remove stored messages that plain sessions took; a removal the store refused is tried again for a
        while (else the recipient's next session would get them a second time)."""
        task = self.tasks.spawn(self._remove_delivered(recipient, seqs))
        self.writes.note(recipient, task)

    async def _remove_delivered(self, recipient: str, seqs: list[int]) -> None:
        try:
            await self.store.remove(recipient, seqs)
        except StorageUnavailable as exc:
            log.warning("cannot remove %d delivered messages yet (%s); trying again", len(seqs), exc)
            self.writes.note(recipient, self.retries.spawn(self._remove_later(recipient, seqs)))

    async def _remove_later(self, recipient: str, seqs: list[int]) -> None:
        for pause in REMOVE_RETRY_S:
            await asyncio.sleep(pause)
            try:
                await self.store.remove(recipient, seqs)
                return
            except StorageUnavailable:
                continue
        log.error("could not remove %d delivered messages; the recipient's next session may get them again",
                  len(seqs))

    def undelivered(self, session: Session, messages: list[QueuedMessage]) -> None:
        """A plain session's connection ended before these messages' bytes reached its peer: store them again."""
        self.stored_again(messages)
        self.metrics.restored.inc(len(messages))
        log.debug("keeping %d messages a closed connection never received", len(messages))
        task = self.tasks.spawn(self._restore(messages))
        self.writes.note(messages[0].recipient, task)

    def stored_again(self, messages: list[QueuedMessage]) -> None:
        """Remember messages that are stored again as ``queued``: remembered as ``delivered``, a read of the queue
        or an offer here would take them for copies already delivered and drop them."""
        remember = self.answers.remember
        for msg in messages:
            remember(ident_of(msg), "queued")

    async def _restore(self, messages: list[QueuedMessage]) -> None:
        await keep_trying(lambda: self.store.restore(messages), f"keep {len(messages)} undelivered messages")


async def keep_trying(write: Callable[[], Awaitable[Any]], what: str) -> bool:
    """Run an idempotent ``write`` until the store takes it, pausing as ``REMOVE_RETRY_S`` says; whether it
    did (a message put back must not be lost to a Redis blip)."""
    for pause in (0.0, *REMOVE_RETRY_S):
        if pause:
            await asyncio.sleep(pause)
        try:
            await write()
            return True
        except StorageUnavailable as exc:
            problem = exc
    log.error("could not %s: %s", what, problem)
    return False


def any_ack(targets: tuple[Session, ...]) -> bool:
    """Whether any target acks what it gets (a loop: ``any()`` over a generator costs more on every message)."""
    for target in targets:
        if target.ack:
            return True
    return False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

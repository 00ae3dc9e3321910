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

With other instances on the same Redis (``far``, a ``presence.Elsewhere``),
the recipient's sessions there count too: a message is offered to them and
answered ``delivered`` if any session anywhere took it, else stored and
answered ``queued``; a message stored while the recipient has sessions
elsewhere is offered to them once committed. A sender's later messages wait
behind an offer still unanswered, and answers go out in send order.
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
from .presence import NOWHERE, Elsewhere, Remote, Routes, Taken
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
REFUSAL_HOLD_S = 1.0
"""After refusing an offer from a sender for a recipient, later unstored offers of that pair are refused this
long (they are stored behind the refused one instead of overtaking it)."""
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 1 << 20
NEW_QUEUE_WINDOW_S = 3600.0

Ident = tuple[str, str, str]
"""(sender, recipient, messageId), addresses lower-cased: what makes a message the same message."""


async def _answer_after(session: Session, answer: dict[str, Any], previous: asyncio.Future[None],
                        answered: asyncio.Future[None]) -> None:
    """Send ``answer`` once the previous answer to the same sender went out (that one is bounded in time)."""
    try:
        await asyncio.wait([previous])
        session.send(answer)
    finally:
        answered.set_result(None)


def message_text(sender: str, content: str, message_id: str, timestamp: int, *, queued: bool) -> str:
    """The encoded ``message`` frame a recipient gets, live or from its queue."""
    return encode({"type": "message", "from": sender, "content": content, "messageId": message_id,
                   "timestamp": timestamp, "queued": queued})


class _Pipeline:
    """One sender's stored-but-unanswered messages: how many, how large, and the last one's task.

    With other instances: ``stores`` counts the messages being stored (not offered), ``offer`` is the task of
    the last message offered to other instances (a message stored after it waits for it, so an offer that
    falls back to storing keeps its place), ``answered`` the future of the last answer (answers keep send order).
    """

    __slots__ = ("in_flight", "bytes", "tail", "stores", "offer", "answered")

    def __init__(self) -> None:
        self.in_flight = 0
        self.bytes = 0
        self.tail: asyncio.Future[None] | None = None
        self.stores = 0
        self.offer: asyncio.Future[None] | None = None
        self.answered: asyncio.Future[None] | None = None


class Delivery:
    """The message path of the protocol: live routing, storing and answering, receipts."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock,
                 writes: AddressWrites, far: Elsewhere | None = None) -> None:
        self.routes = routes
        self.far = far
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
        self._refused: dict[tuple[str, str], float] = {}
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
            if self.far is not None:
                await self._message_far(session, ident, msg, targets, pipeline)
                return
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

    async def _message_far(self, session: Session, ident: Ident, msg: QueuedMessage, targets: tuple[Session, ...],
                           pipeline: _Pipeline | None) -> None:
        """The message path with other instances: as ``message``, counting the recipient's sessions there.

        Live here when a ready session here takes it (a copy goes to the
        recipient's other instances); else offered to those instances first
        (stored if none takes it); else stored, then offered to whoever holds
        the recipient once committed. Ack sessions anywhere, or unanswered
        messages of this sender, mean storing first, as in a single instance.
        A recipient not known here is stored at once: the write reads (and
        watches) its presence, so no separate lookup is needed.
        """
        assert self.far is not None
        remote = self.far.cached(msg.recipient)
        if remote is None and not targets:
            await self._store_then_answer(session, ident, msg)  # the store says where the recipient is
            return
        if remote is None:
            try:
                remote = await self.far.lookup(msg.recipient)
            except StorageUnavailable:
                remote = NOWHERE  # live delivery here still works; storing will say what Redis says
        if not (pipeline and pipeline.stores) and not remote.ack and not any(s.ack for s in targets):
            if targets:
                data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
                if sum(s.push(data, msg) for s in targets):
                    if remote.instances:
                        self.far.push(remote, msg)
                    self.metrics.routed_live.inc()
                    answer = self._answered(ident, msg, "delivered")
                    previous = pipeline.answered if pipeline is not None else None
                    if previous is None or previous.done():
                        session.send(answer)
                    else:  # after the answers to this sender's earlier messages, still on their way
                        pipeline.answered = asyncio.get_running_loop().create_future()
                        self._track(asyncio.ensure_future(_answer_after(session, answer, previous,
                                                                        pipeline.answered)))
                    return
            if remote.instances:
                await self._offer_then_answer(session, ident, msg, remote)
                return
        await self._store_then_answer(session, ident, msg)

    async def _in_flight(self, session: Session, msg: QueuedMessage) -> tuple[_Pipeline, int]:
        """Count ``msg`` in its sender's pipeline, first waiting (for the oldest) while the pipeline is full."""
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
        return pipeline, size

    def _out_of_flight(self, session: Session, pipeline: _Pipeline, size: int) -> None:
        pipeline.in_flight -= 1
        pipeline.bytes -= size
        session.outbox.hold(-size)

    async def _offer_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage, remote: Remote) -> None:
        """Offer ``msg`` to the recipient's sessions on other instances and return; answered ``delivered`` when
        one took it, else stored (after this sender's earlier offers settled) and answered then.

        Callbacks rather than a task: this is the cluster's common live path.
        """
        assert self.far is not None
        pipeline, size = await self._in_flight(session, msg)
        loop = asyncio.get_running_loop()
        barrier = pipeline.offer if pipeline.offer is not None and not pipeline.offer.done() else None
        previous, answered = pipeline.answered, loop.create_future()
        settled: asyncio.Future[None] = loop.create_future()
        pipeline.answered = answered
        pipeline.offer = pipeline.tail = settled

        def done(taken: Taken) -> None:
            if not taken.count:  # nobody took it: store it, in its place, and answer then
                task = asyncio.ensure_future(self._far_store_and_answer(
                    session, pipeline, ident, msg, size, barrier, previous, answered, silent=taken.silent))
                task.add_done_callback(lambda _: settled.set_result(None))
                self._track(task)
                return
            self._out_of_flight(session, pipeline, size)
            self.metrics.routed_live.inc()
            answer = self._answered(ident, msg, "delivered")
            settled.set_result(None)
            if previous is None or previous.done():
                session.send(answer)
                answered.set_result(None)
            else:
                self._track(asyncio.ensure_future(_answer_after(session, answer, previous, answered)))
        self.far.offer_soon(remote, msg, done)

    async def _store_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage) -> None:
        """Start storing ``msg`` and return; the answer goes out once the store has committed it.

        Past ``MAX_IN_FLIGHT`` unanswered writes (or ``MAX_IN_FLIGHT_BYTES``)
        the sender waits for its oldest, which bounds what one connection pins.
        """
        if self.far is None:
            try:
                self._spend_new_queue(session, msg.recipient, msg.message_id)
            except RelayError as err:
                self.metrics.refused.labels(code=err.code.value).inc()
                raise
        pipeline, size = await self._in_flight(session, msg)
        if self.far is None:
            task = asyncio.ensure_future(self._store_and_answer(session, pipeline, ident, msg, size))
        else:
            barrier = pipeline.offer if pipeline.offer is not None and not pipeline.offer.done() else None
            previous, pipeline.answered = pipeline.answered, asyncio.get_running_loop().create_future()
            pipeline.stores += 1
            task = asyncio.ensure_future(self._far_store_and_answer(
                session, pipeline, ident, msg, size, barrier, previous, pipeline.answered, store=True))
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
            self._out_of_flight(session, pipeline, size)
        self._remember(ident, answer)
        session.send({"type": answer, "messageId": msg.message_id, "to": msg.recipient,
                      "timestamp": wall_ms(self.clock)})

    async def _far_store_and_answer(self, session: Session, pipeline: _Pipeline, ident: Ident, msg: QueuedMessage,
                                    size: int, barrier: asyncio.Future[None] | None,
                                    previous: asyncio.Future[None] | None, answered: asyncio.Future[None], *,
                                    store: bool = False, silent: tuple[str, ...] = ()) -> None:
        """``_store_and_answer`` with other instances: after the sender's previous offer settled, the
        cluster-wide new-queue budget, the store (which also says where the recipient is now, ``silent``
        instances left out), then the answer after the previous message's (each step is bounded, so these
        waits are too). ``store``: counted as a store (not an offer that fell back to storing)."""
        answer: dict[str, Any] | None = None
        try:
            answer = await self._far_deliver(session, ident, msg, barrier, silent)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            answer = err.frame()
        except Exception:
            log.exception("internal error storing a message")
            answer = RelayError(ErrorCode.INTERNAL_ERROR, message_id=msg.message_id).frame()
        finally:
            self._out_of_flight(session, pipeline, size)
            if store:
                pipeline.stores -= 1
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if answer is not None:
                session.send(answer)
            answered.set_result(None)

    async def _far_deliver(self, session: Session, ident: Ident, msg: QueuedMessage,
                           barrier: asyncio.Future[None] | None, silent: tuple[str, ...]) -> dict[str, Any]:
        """Store, then offer to whoever holds the recipient; returns the answer frame. Raises RelayError for
        refusals. Offers of one sender go out back to back (the channel keeps their order); storing waits for
        the sender's previous offer to be settled, so a message that falls back to storing is stored before
        later ones."""
        assert self.far is not None
        if barrier is not None and not barrier.done():
            await asyncio.wait([barrier])
        await self._spend_far(session, msg.recipient, msg.message_id)
        try:
            result, remote = await self.far.enqueue(msg, self.limits)
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=msg.message_id) from None
        if result is EnqueueResult.FULL:
            raise RelayError(ErrorCode.QUEUE_FULL, message_id=msg.message_id)
        if result is EnqueueResult.NO_SPACE:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "The relay's storage budget is used up; "
                             "nothing was queued, retry later", message_id=msg.message_id)
        if result is EnqueueResult.DUPLICATE:
            return self._answered(ident, msg, "queued")
        remote = Remote(tuple(i for i in remote.instances if i not in silent), remote.ack)
        return self._answered(ident, msg, await self._deliver_stored(msg, remote))

    def _answered(self, ident: Ident, msg: QueuedMessage, answer: str) -> dict[str, Any]:
        self._remember(ident, answer)
        return {"type": answer, "messageId": msg.message_id, "to": msg.recipient, "timestamp": wall_ms(self.clock)}

    async def _spend_far(self, session: Session, to: str, mid: str) -> None:
        """The new-queue budgets for the whole cluster: recipients seen this hour here need no Redis call."""
        assert self.far is not None and session.address is not None
        if not (self.new_queue_budget or self.new_queue_budget_per_ip):
            return
        now = self.clock.monotonic()
        if now - self._new_queues_since >= NEW_QUEUE_WINDOW_S:
            self._new_queues.clear()
            self._new_queues_since = now
        spends = [(key, budget) for key, budget in ((session.address, self.new_queue_budget),
                                                    ("ip " + limit_key(session.ip), self.new_queue_budget_per_ip))
                  if budget and to not in self._new_queues.get(key, ())]
        if not spends:
            return
        try:  # together: one round trip
            allowed = await asyncio.gather(*(self.far.spend(key, to, budget) for key, budget in spends))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=mid) from None
        if not all(allowed):
            self.metrics.rate_limited.labels(limit="new_queues").inc()
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour",
                             message_id=mid)
        for key, _ in spends:
            self._new_queues.setdefault(key, set()).add(to)

    def offered(self, msg: QueuedMessage, *, stored: bool) -> tuple[int, bool]:
        """Another instance offers a message for a recipient with sessions here: (sessions that took it, whether
        one of them acks). Unstored, it is refused when a session acks (it must be stored first); a messageId
        already delivered here counts as taken (the sender resent it through another instance)."""
        ident = (msg.sender.lower(), msg.recipient, msg.message_id)
        if not stored and self._recent.get(ident) == "delivered":
            return 1, False
        targets = self.routes.ready_sessions(msg.recipient)
        ack = any(s.ack for s in targets)
        if not stored:
            refused = self._refused.get(ident[:2])
            if refused is not None and self.clock.monotonic() - refused < REFUSAL_HOLD_S:
                return 0, ack
            if ack:
                return self._refuse_offer(ident, ack)
        data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
        taken = [s for s in targets if s.push(data, None if s.ack else msg)]
        if taken:
            self.metrics.routed_live.inc()
            self._remember(ident, "delivered")
        elif stored:
            self.on_stored(msg.recipient)
        else:
            return self._refuse_offer(ident, ack)
        return len(taken), any(s.ack for s in taken)

    def _refuse_offer(self, ident: Ident, ack: bool) -> tuple[int, bool]:
        """Refuse an unstored offer, and the same sender's next ones for this recipient for a while."""
        now = self.clock.monotonic()
        if len(self._refused) >= RECENT_IDS:
            self._refused = {k: t for k, t in self._refused.items() if now - t < REFUSAL_HOLD_S}
        self._refused[ident[:2]] = now
        return 0, ack

    async def _deliver_stored(self, msg: QueuedMessage, remote: Remote | None = None) -> str:
        """Push a just-committed message to whoever became ready meanwhile.

        Ack sessions keep it stored until they ack; if only plain sessions
        took it, it leaves the store (and comes back if their bytes are lost).
        """
        targets = self.routes.ready_sessions(msg.recipient)
        taken: list[Session] = []
        if targets:
            data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
            taken = [s for s in targets if s.push(data, None if s.ack else msg)]
        far = Taken()
        if remote is not None and remote.instances and self.far is not None:
            far = await self.far.offer(remote, msg, stored=True)
        if not taken and not far.count:
            self.metrics.queued.inc()
            self.on_stored(msg.recipient)
            return "queued"
        self.metrics.routed_live.inc()
        if not any(s.ack for s in taken) and not far.ack and not (remote is not None and remote.ack):
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
            if self.far is None:
                await self.store.restore(messages)
            else:
                await self.far.restore(messages)
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
        read = {"type": "read", "from": session.spelling, "messageId": mid, "timestamp": stamp}
        if self.far is not None:
            self._track(asyncio.ensure_future(self._receipt_far(session, to, read)))
            return
        if self.forward(read, to):
            return
        self._store_receipt(session, to, read)

    def _store_receipt(self, session: Session, to: str, read: dict[str, Any]) -> None:
        if not self._receipts:
            asyncio.get_running_loop().call_soon(self._store_receipts)
        self._receipts.append((session, Receipt(to, session.spelling, read["messageId"], read["timestamp"])))

    async def _receipt_far(self, session: Session, to: str, read: dict[str, Any]) -> None:
        """A read receipt with other instances: to the sender's ready sessions here and there, else stored."""
        assert self.far is not None
        here = self.forward(read, to)
        remote = self.far.cached(to)
        if remote is None:
            try:
                remote = await self.far.lookup(to)
            except StorageUnavailable:
                remote = NOWHERE
        if here:
            if remote.instances:
                self.far.forward(remote, to, read)
            return
        if remote.instances and (await self.far.relay_frame(remote, to, read)).count:
            return
        self._store_receipt(session, to, read)

    def forward_far(self, frame: dict[str, Any], to: str) -> None:
        """Push a frame that is never stored (typing) to the ready sessions of ``to`` on other instances."""
        assert self.far is not None
        remote = self.far.cached(to)
        if remote is not None:
            if remote.instances:
                self.far.forward(remote, to, frame)
            return
        self._track(asyncio.ensure_future(self._forward_far(frame, to)))

    async def _forward_far(self, frame: dict[str, Any], to: str) -> None:
        assert self.far is not None
        try:
            remote = await self.far.lookup(to)
        except StorageUnavailable:
            return
        if remote.instances:
            self.far.forward(remote, to, frame)

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

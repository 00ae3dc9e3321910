"""The message path with other instances on the same Redis (``relayd.cluster``): their sessions count too.

A message is offered to the recipient's sessions on other instances and
answered ``delivered`` if any session anywhere took it, else stored and
answered ``queued``; a message stored while the recipient has sessions
elsewhere is offered to them once committed. A sender's later messages wait
behind an offer still unanswered and behind one that fell back to storing, and
answers go out in send order. Storing goes one message at a time through
``Elsewhere.enqueue``, which also says where the recipient is now. Everything
else is ``Delivery``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..clock import Clock
from ..config import Config
from ..protocol.delivery import Delivery, Ident, Pipeline, refusal_of
from ..errors import ErrorCode, RelayError
from .offers import FarOffers
from ..frames import answer_text, encode, message_text
from ..protocol.budgets import SharedNewQueueBudget
from ..ops.metrics import RelayMetrics
from ..protocol.presence import NOWHERE, Elsewhere, Remote, Routes, Taken
from ..protocol.receipts import FarReceipts
from ..protocol.session import Session
from ..storage.store import EnqueueResult, QueuedMessage, StorageUnavailable, Store
from ..protocol.writes import AddressWrites

log = logging.getLogger("relayd.protocol.router")


class _FarPipeline(Pipeline):
    """A sender's pipeline with other instances: ``stores`` counts the messages being stored (offers that fell
    back to storing too: while any is, later messages are stored behind them rather than offered past them),
    ``offer`` is the last message offered to other instances (a message stored after it waits for it, so an
    offer that falls back to storing keeps its place), ``answered`` the last answer (answers keep send order)."""

    __slots__ = ("answered", "offer", "stores")

    def __init__(self) -> None:
        super().__init__()
        self.stores = 0
        self.offer: asyncio.Future[None] | None = None
        self.answered: asyncio.Future[None] | None = None


async def _answer_after(session: Session, answer: str, previous: asyncio.Future[None],
                        answered: asyncio.Future[None]) -> None:
    """Send ``answer`` once the previous answer to the same sender went out (that one is bounded in time)."""
    try:
        await asyncio.wait([previous])
        session.push(answer)
    finally:
        answered.set_result(None)


class FarDelivery(FarOffers, Delivery):
    """``Delivery`` across instances; ``far`` reaches the others (``presence.Elsewhere``)."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock,
                 writes: AddressWrites, far: Elsewhere) -> None:
        super().__init__(config, routes, store, metrics, clock, writes)
        self.far = far
        self.receipts = FarReceipts(config, self.forward, store, metrics, clock, writes, self._track, far)
        self._refused: dict[tuple[str, str], float] = {}
        self.new_queues: SharedNewQueueBudget = SharedNewQueueBudget(config, clock.monotonic(), far.spend)

    # Messages from this instance's senders

    def _route(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """Live here when a ready session here takes it (a copy goes to the recipient's other instances); else
        offered to those instances first (stored if none takes it); else stored, then offered to whoever holds
        the recipient once committed. Ack sessions anywhere, or unanswered messages of this sender, mean
        storing first, as in a single instance. A recipient not known here is stored at once: the write reads
        (and watches) its presence, so no separate lookup is needed. Synchronous (no task per message) unless
        the recipient must be looked up or the sender's pipeline is full."""
        targets = self.routes.ready_sessions(msg.recipient)
        remote = self.far.cached(msg.recipient)
        if remote is None and not targets:
            return self._store_far(session, ident, msg)
        if remote is None:
            return self._route_after_lookup(session, ident, msg, targets)
        return self._route_known(session, ident, msg, targets, remote)

    async def _route_after_lookup(self, session: Session, ident: Ident, msg: QueuedMessage,
                                  targets: tuple[Session, ...]) -> None:
        try:
            remote = await self.far.lookup(msg.recipient)
        except StorageUnavailable:
            remote = NOWHERE  # live delivery here still works; storing will say what Redis says
        pending = self._route_known(session, ident, msg, targets, remote)
        if pending is not None:
            await pending

    def _route_known(self, session: Session, ident: Ident, msg: QueuedMessage, targets: tuple[Session, ...],
                     remote: Remote) -> Awaitable[None] | None:
        pipeline = self._pipelines.get(session)
        stores = isinstance(pipeline, _FarPipeline) and pipeline.stores
        if not stores and not remote.ack and not any(s.ack for s in targets):
            if targets:
                data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
                if sum(s.push(data, msg) for s in targets):
                    if remote.instances:
                        self.far.push(remote, msg)
                    self.metrics.routed_live.inc()
                    answer = self._answered(ident, msg, "delivered")
                    previous = pipeline.answered if isinstance(pipeline, _FarPipeline) else None
                    if previous is None or previous.done():
                        session.push(answer)
                    else:  # after the answers to this sender's earlier messages, still on their way
                        assert isinstance(pipeline, _FarPipeline)
                        pipeline.answered = asyncio.get_running_loop().create_future()
                        self._track(asyncio.ensure_future(_answer_after(session, answer, previous,
                                                                        pipeline.answered)))
                    return None
            if remote.instances:
                return self._offer_then_answer(session, ident, msg, remote)
        return self._store_far(session, ident, msg)

    def _far_pipeline(self, session: Session) -> _FarPipeline:
        pipeline = self._pipelines.get(session)
        if not isinstance(pipeline, _FarPipeline):
            pipeline = self._pipelines[session] = _FarPipeline()
        return pipeline

    async def _when_room(self, pipeline: _FarPipeline, then: Callable[[], Awaitable[None] | None]) -> None:
        """Wait (for the oldest) while the sender's pipeline is full, then go on."""
        while self._pipeline_full(pipeline):
            assert pipeline.tail is not None
            await asyncio.wait([pipeline.tail])
        pending = then()
        if pending is not None:
            await pending

    @staticmethod
    def _in_flight(session: Session, pipeline: _FarPipeline, msg: QueuedMessage) -> int:
        """Count ``msg`` in its sender's pipeline (which has room); returns its size."""
        size = len(msg.content)
        pipeline.in_flight += 1
        pipeline.bytes += size
        session.outbox.hold(size)
        return size

    @staticmethod
    def _out_of_flight(session: Session, pipeline: Pipeline, size: int) -> None:
        pipeline.in_flight -= 1
        pipeline.bytes -= size
        session.outbox.hold(-size)

    def _offer_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage,
                           remote: Remote) -> Awaitable[None] | None:
        """Offer ``msg`` to the recipient's sessions on other instances and return; answered ``delivered`` when
        one took it, else stored (after this sender's earlier offers settled) and answered then.

        Callbacks rather than a task: this is the cluster's common live path.
        """
        pipeline = self._far_pipeline(session)
        if self._pipeline_full(pipeline):
            return self._when_room(pipeline, lambda: self._offer_then_answer(session, ident, msg, remote))
        size = self._in_flight(session, pipeline, msg)
        loop = asyncio.get_running_loop()
        barrier = pipeline.offer if pipeline.offer is not None and not pipeline.offer.done() else None
        previous, answered = pipeline.answered, loop.create_future()
        settled: asyncio.Future[None] = loop.create_future()
        pipeline.answered = answered
        pipeline.offer = pipeline.tail = settled

        def done(taken: Taken) -> None:
            if not taken.count:  # nobody took it: store it, in its place, and answer then
                pipeline.stores += 1  # the sender's next messages are stored behind it, not offered past it
                task = asyncio.ensure_future(self._store_and_answer_far(
                    session, pipeline, ident, msg, size, barrier, previous, answered, silent=taken.silent))
                task.add_done_callback(lambda _: settled.set_result(None))
                self._track(task)
                return
            self._out_of_flight(session, pipeline, size)
            self.metrics.routed_live.inc()
            answer = self._answered(ident, msg, "delivered")
            settled.set_result(None)
            if previous is None or previous.done():
                session.push(answer)
                answered.set_result(None)
            else:
                self._track(asyncio.ensure_future(_answer_after(session, answer, previous, answered)))
        self.far.offer_soon(remote, msg, done)
        return None

    def _store_far(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """Start storing ``msg`` and return (a wait first while the sender's pipeline is full)."""
        pipeline = self._far_pipeline(session)
        if self._pipeline_full(pipeline):
            return self._when_room(pipeline, lambda: self._store_far(session, ident, msg))
        size = self._in_flight(session, pipeline, msg)
        barrier = pipeline.offer if pipeline.offer is not None and not pipeline.offer.done() else None
        previous, pipeline.answered = pipeline.answered, asyncio.get_running_loop().create_future()
        pipeline.stores += 1
        task = asyncio.ensure_future(self._store_and_answer_far(
            session, pipeline, ident, msg, size, barrier, previous, pipeline.answered))
        pipeline.tail = task
        self._track(task)
        return None

    async def _store_and_answer_far(self, session: Session, pipeline: _FarPipeline, ident: Ident,
                                    msg: QueuedMessage, size: int, barrier: asyncio.Future[None] | None,
                                    previous: asyncio.Future[None] | None, answered: asyncio.Future[None], *,
                                    silent: tuple[str, ...] = ()) -> None:
        """After the sender's previous offer settled: the cluster-wide new-queue budget, the store (which also
        says where the recipient is now, ``silent`` instances left out), then the answer after the previous
        message's (each step is bounded, so these waits are too). The caller counted it in ``stores``."""
        answer: str | None = None
        try:
            answer = await self._deliver_far(session, ident, msg, barrier, silent)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            answer = encode(err.frame())
        except Exception:
            log.exception("internal error storing a message")
            answer = encode(RelayError(ErrorCode.INTERNAL_ERROR, message_id=msg.message_id).frame())
        finally:
            self._out_of_flight(session, pipeline, size)
            pipeline.stores -= 1
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if answer is not None:
                session.push(answer)
            answered.set_result(None)

    async def _deliver_far(self, session: Session, ident: Ident, msg: QueuedMessage,
                           barrier: asyncio.Future[None] | None, silent: tuple[str, ...]) -> str:
        """Store, then offer to whoever holds the recipient; returns the answer frame. Raises RelayError for
        refusals. Offers of one sender go out back to back (the channel keeps their order); storing waits for
        the sender's previous offer to be settled, so a message that falls back to storing is stored before
        later ones."""
        if barrier is not None and not barrier.done():
            await asyncio.wait([barrier])
        try:
            await self.new_queues.spend_shared(session.address or "", session.ip, msg.recipient,
                                               self.clock.monotonic(), msg.message_id)
        except RelayError as err:
            if err.code is ErrorCode.RATE_LIMITED:
                self.metrics.rate_limited.labels(limit="new_queues").inc()
            raise
        try:
            result, remote = await self.far.enqueue(msg, self.limits)
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=msg.message_id) from None
        refusal = refusal_of(result)
        if refusal is not None:
            raise RelayError(refusal.code, refusal.message, message_id=msg.message_id)
        if result is EnqueueResult.DUPLICATE:
            return self._answered(ident, msg, "queued")
        remote = Remote(tuple(i for i in remote.instances if i not in silent), remote.ack)
        return self._answered(ident, msg, await self._deliver_stored_far(msg, remote))

    def _answered(self, ident: Ident, msg: QueuedMessage, answer: str) -> str:
        self._remember(ident, answer)
        return answer_text(answer, msg.message_id, msg.recipient, msg.queued_at)

    async def _deliver_stored_far(self, msg: QueuedMessage, remote: Remote) -> str:
        """``_deliver_stored``, offering the committed message to the recipient's other instances too."""
        targets = self.routes.ready_sessions(msg.recipient)
        taken: list[Session] = []
        if targets:
            data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
            taken = [s for s in targets if s.push(data, None if s.ack else msg)]
        far = Taken()
        if remote.instances:
            far = await self.far.offer(remote, msg, stored=True)
        if not taken and not far.count:
            self.metrics.queued.inc()
            self.on_stored(msg.recipient)
            return "queued"
        self.metrics.routed_live.inc()
        if not any(s.ack for s in taken) and not far.ack and not remote.ack:
            self._remove_soon(msg)
        return "delivered"

    async def _restore(self, messages: list[QueuedMessage]) -> None:
        try:
            await self.far.restore(messages)
        except StorageUnavailable as exc:
            log.error("cannot keep %d undelivered messages: %s", len(messages), exc)

    def forward_far(self, frame: dict[str, Any], to: str) -> None:
        """Push a frame that is never stored (typing) to the ready sessions of ``to`` on other instances."""
        remote = self.far.cached(to)
        if remote is not None:
            if remote.instances:
                self.far.forward(remote, to, frame)
            return
        self._track(asyncio.ensure_future(self._forward_far(frame, to)))

    async def _forward_far(self, frame: dict[str, Any], to: str) -> None:
        try:
            remote = await self.far.lookup(to)
        except StorageUnavailable:
            return
        if remote.instances:
            self.far.forward(remote, to, frame)

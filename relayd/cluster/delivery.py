"""The message path with peers (``seams.MessagePath`` for several instances): their sessions count too.

A message is pushed to the recipient's ready sessions here, or offered to
its sessions on peers and answered ``delivered`` if any session anywhere
took it, else stored and answered ``queued``; a message stored while the
recipient has sessions on peers is offered to them once committed, and
every offer names the sender's previous stored message to that recipient
(``offers``, rule 3), so a peer that missed it reads its queue first. A
sender's later messages wait behind an offer still unanswered and behind one
that fell back to storing, and answers go out in send order. Storing goes one
message at a time through ``PeerLink.enqueue``, which also says where the
recipient is now. Validation, answers, pipelines and the local pushes are
``protocol.delivery.Delivery``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import encode, utf8_len
from ..protocol.budgets import low_room
from ..protocol.delivery import Delivery, any_ack, keep_trying, refusal_of, storage_error
from ..protocol.senders import Ident, Pipeline, WriteTurn
from ..protocol.session import Session
from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits, StorageUnavailable
from .budgets import ClusterBudget
from .deadlines import Deadlines
from .bus import Taken
from .peers import PeerLink
from .presence import NO_PEER_SESSIONS, PeerSessions
from .receipts import ClusterReceipts
from .refresh import Refresh

log = logging.getLogger("relayd.cluster")

MAX_TAILS = 100_000
"""(sender, recipient) pairs whose last stored seq is remembered for offers' ``after``."""
NOT_OFFERED = Taken()
"""What a stored message offered to no peer was taken by (read only, shared)."""


def _keep_recent(table: OrderedDict[tuple[str, str], int], key: tuple[str, str], value: int) -> None:
    """Set ``table[key]`` as its newest entry, forgetting the oldest past ``MAX_TAILS`` pairs. Taken out and put
    back (cheaper than a set and ``move_to_end``); an OrderedDict, since a plain dict finds its oldest entry by
    walking past every one deleted since it last grew (7.6 us a time at 16,384 entries)."""
    table.pop(key, None)
    table[key] = value
    if len(table) > MAX_TAILS:
        table.popitem(last=False)


async def _answer_after(session: Session, answer: str, previous: asyncio.Future[None],
                        answered: asyncio.Future[None]) -> None:
    """Send ``answer`` once the previous answer to the same sender went out (that one is bounded in time)."""
    try:
        await asyncio.wait([previous])
        session.push(answer)
    finally:
        answered.set_result(None)


class ClusterDelivery:
    """``seams.MessagePath`` across instances (see the module docstring)."""

    def __init__(self, config: Config, local: Delivery, peers: PeerLink, refresh: Refresh, clock: Clock) -> None:
        self.answer_within = Deadlines(config.redis.socket_timeout_s)
        """Storing answers within this long, even while the backplane hangs (a hang also makes storage unhealthy
        within about a second, and then a message is answered at once)."""
        self.local = local
        self.peers = peers
        self.refresh = refresh
        self.routes = local.routes
        self.metrics = local.metrics
        self.clock = clock
        self.budget = ClusterBudget(config, clock, local.metrics, peers.spend, local.offline_bytes)
        self.receipts = ClusterReceipts(local.receipts, peers, local.tasks)
        self._tails: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._offers: OrderedDict[tuple[str, str], int] = OrderedDict()

    # The parts of MessagePath that are the local path's

    @property
    def limits(self) -> QueueLimits:
        return self.local.limits

    @limits.setter
    def limits(self, limits: QueueLimits) -> None:
        self.local.limits = limits

    @property
    def storage_budget(self) -> int:
        return self.local.storage_budget

    @storage_budget.setter
    def storage_budget(self, budget: int) -> None:
        self.local.storage_budget = budget

    @property
    def on_stored(self) -> Callable[[str], None]:
        return self.local.on_stored

    @on_stored.setter
    def on_stored(self, callback: Callable[[str], None]) -> None:
        self.local.on_stored = callback

    def configure(self, config: Config) -> None:
        self.local.configure(config)
        self.budget.configure(config)

    def in_flight(self, session: Session) -> int:
        return self.local.in_flight(session)

    def closed(self, session: Session) -> None:
        self.local.closed(session)
        address = session.address
        if address is not None and all(s.closed for s in self.routes.sessions(address)):
            self.refresh.gone(address)

    async def settle(self) -> None:
        await self.local.settle()
        await self.refresh.settle()

    def read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        self.receipts.read_receipt(session, frame)

    def typing(self, frame: dict[str, Any], to: str) -> None:
        self.local.forward(frame, to)
        where = self.peers.cached(to)
        if where is None:
            self.local.tasks.spawn(self._typing_after_lookup(frame, to))
        elif where.instances:
            self.peers.forward(where, to, frame)

    async def _typing_after_lookup(self, frame: dict[str, Any], to: str) -> None:
        try:
            where = await self.peers.lookup(to)
        except StorageUnavailable:
            return
        if where.instances:
            self.peers.forward(where, to, frame)

    def undelivered(self, session: Session, messages: list[QueuedMessage]) -> None:
        """A plain session's connection ended before these messages' bytes reached its peer: store them again,
        and have the recipients' sessions here and on peers read them."""
        self.local.stored_again(messages)
        self.metrics.restored.inc(len(messages))
        task = self.local.tasks.spawn(self._restore(messages))
        self.local.writes.note(messages[0].recipient, task)

    async def _restore(self, messages: list[QueuedMessage]) -> None:
        if not await keep_trying(lambda: self.peers.restore(messages), f"keep {len(messages)} undelivered messages"):
            return
        for recipient in {m.recipient for m in messages}:
            seqs = tuple(m.seq for m in messages if m.recipient == recipient and m.seq > 0)
            self.refresh.request(recipient, min(seqs) - 1 if seqs else -1, seqs)

    # Messages from this instance's senders

    def _next_offer(self, ident: Ident) -> tuple[int, int]:
        """(The seq of the sender's last message to this recipient stored from here, 0: none known; this
        instance's number for its next unstored offer of the pair, from 1)."""
        key = ident[0], ident[1]
        number = self._offers.get(key, 0) + 1
        _keep_recent(self._offers, key, number)
        return self._tails.get(key, 0), number

    def _stored(self, msg: QueuedMessage) -> int:
        """Remember ``msg`` as the sender's last message to its recipient stored from here; the seq of the one
        before it (0: none known)."""
        key = (msg.sender.lower(), msg.recipient)
        before = self._tails.get(key, 0)
        if msg.seq > before:
            _keep_recent(self._tails, key, msg.seq)
        return before

    def message(self, session: Session, frame: dict[str, Any]) -> Awaitable[None] | None:
        """Route one ``message`` frame (``Delivery.message``'s contract). Synchronous (no task per message)
        unless the recipient must be looked up or the sender's pipeline is full."""
        accepted = self.local.accept(session, frame)
        if accepted is None:
            return None
        ident, msg = accepted
        pipeline = self.local.pipelines.get(session)
        if pipeline is not None and pipeline.deferred:
            return self._defer(session, pipeline, ident, msg)
        return self._route(session, ident, msg)

    def _route(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        if self.local.answers.unsure(ident):  # answered storage_timeout here: the store says whether it landed
            return self._store(session, ident, msg)
        targets = self.routes.ready_sessions(msg.recipient)
        where = self.peers.cached(msg.recipient)
        if where is None and not targets:
            return self._store(session, ident, msg)  # the write reads (and watches) its presence
        if where is None:
            return self._route_after_lookup(session, ident, msg, targets)
        return self._route_known(session, ident, msg, targets, where)

    async def _route_after_lookup(self, session: Session, ident: Ident, msg: QueuedMessage,
                                  targets: tuple[Session, ...]) -> None:
        try:
            where = await self.peers.lookup(msg.recipient)
        except StorageUnavailable:
            where = NO_PEER_SESSIONS  # live delivery here still works; storing will say what the backplane says
        pending = self._route_known(session, ident, msg, targets, where)
        if pending is not None:
            await pending

    def _route_known(self, session: Session, ident: Ident, msg: QueuedMessage, targets: tuple[Session, ...],
                     where: PeerSessions) -> Awaitable[None] | None:
        """Live here when a ready session here takes it (a copy goes to the recipient's peers); else offered to
        those peers first (stored if none takes it); else stored. Ack sessions anywhere mean storing first;
        messages of this sender being stored mean waiting for them before trying the live path."""
        pipeline = self.local.pipelines.get(session)
        if not where.ack and not any_ack(targets) and (targets or where.instances):
            if pipeline is not None and pipeline.stores:
                return self._defer(session, pipeline, ident, msg)
            if targets and not self.refresh.reading(msg.recipient) and self.local.push_live(targets, msg):
                if where.instances:
                    self.peers.push(where, msg)
                self._answer_in_order(session, pipeline, self.local.answer_text(ident, msg, "delivered"))
                return None
            if where.instances:
                return self._offer_then_answer(session, ident, msg, where)
        return self._store(session, ident, msg)

    def _defer(self, session: Session, pipeline: Pipeline, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """Hold ``msg``, behind the sender's other held ones, until none of its messages is being stored, then
        route it. Storing it instead (as before) kept a sender that sends faster than a store takes on the
        storage path for good: each new message found the previous one still being stored."""
        if pipeline.full:
            return self._when_room(pipeline, lambda: self._defer(session, pipeline, ident, msg))
        pipeline.hold(session, len(msg.content))
        if pipeline.deferred is None:
            pipeline.deferred = deque()
        pipeline.deferred.append((ident, msg))
        if pipeline.draining is None or pipeline.draining.done():
            pipeline.draining = self.local.tasks.spawn(self._drain(session, pipeline))
        pipeline.tail = pipeline.draining
        return None

    async def _drain(self, session: Session, pipeline: Pipeline) -> None:
        deferred = pipeline.deferred
        assert deferred is not None
        while deferred:
            await pipeline.no_stores()
            ident, msg = deferred.popleft()
            pipeline.release(session, len(msg.content))
            try:
                pending = self._route(session, ident, msg)
                if pending is not None:
                    await pending
            except Exception:
                log.exception("internal error routing a message")
                self._answer_in_order(session, pipeline, encode(RelayError(
                    ErrorCode.INTERNAL_ERROR, message_id=msg.message_id).frame()))
        pipeline.deferred = None

    def _answer_in_order(self, session: Session, pipeline: Pipeline | None, answer: str) -> None:
        """Send an answer now, or after the answers to this sender's earlier messages still on their way."""
        previous = pipeline.answered if pipeline is not None else None
        if previous is None or previous.done():
            session.push(answer)
            return
        assert pipeline is not None
        pipeline.answered = asyncio.get_running_loop().create_future()
        self.local.tasks.spawn(_answer_after(session, answer, previous, pipeline.answered))

    async def _when_room(self, pipeline: Pipeline, then: Callable[[], Awaitable[None] | None]) -> None:
        await pipeline.room()
        pending = then()
        if pending is not None:
            await pending

    def _offer_then_answer(self, session: Session, ident: Ident, msg: QueuedMessage,
                           where: PeerSessions) -> Awaitable[None] | None:
        """Offer ``msg`` to the recipient's sessions on peers and return; answered ``delivered`` when one took
        it, else stored (after this sender's earlier offers settled) and answered then. Callbacks rather than a
        task: this is the cluster's common live path."""
        pipeline = self.local.pipelines.of(session)
        if pipeline.full:
            return self._when_room(pipeline, lambda: self._offer_then_answer(session, ident, msg, where))
        offer = _LiveOffer(self, session, pipeline, ident, msg)
        self.peers.offer_soon(where, msg, *self._next_offer(ident), offer.done)
        return None

    def _store(self, session: Session, ident: Ident, msg: QueuedMessage) -> Awaitable[None] | None:
        """Start storing ``msg`` and return (a wait first while the sender's pipeline is full)."""
        pipeline = self.local.pipelines.of(session)
        if pipeline.full:
            return self._when_room(pipeline, lambda: self._store(session, ident, msg))
        size = len(msg.content)
        pipeline.hold(session, size)
        barrier = pipeline.offer if pipeline.offer is not None and not pipeline.offer.done() else None
        previous, pipeline.answered = pipeline.answered, asyncio.get_running_loop().create_future()
        pipeline.store_started()
        task = self.local.tasks.spawn(self._store_and_answer(
            session, pipeline, ident, msg, size, barrier, pipeline.write_turn(), previous, pipeline.answered))
        pipeline.tail = task
        return None

    async def _store_and_answer(self, session: Session, pipeline: Pipeline, ident: Ident, msg: QueuedMessage,
                                size: int, barrier: asyncio.Future[None] | None, turn: WriteTurn,
                                previous: asyncio.Future[None] | None, answered: asyncio.Future[None], *,
                                silent: tuple[str, ...] = ()) -> None:
        """After the sender's previous offer settled: the cluster-wide new-queue budget, the store in ``turn``
        (which also says where the recipient is now, ``silent`` peers left out), then the answer after the
        previous message's (each step is bounded, so these waits are too). The caller counted it in
        ``stores``."""
        answer: str | None = None
        try:
            answer = await self._deliver(session, ident, msg, barrier, turn, silent)
        except RelayError as err:
            self.metrics.refused.labels(code=err.code.value).inc()
            if err.code is ErrorCode.STORAGE_TIMEOUT:
                self.local.answers.mark_unsure(ident)
            answer = encode(err.frame())
        except Exception:
            log.exception("internal error storing a message")
            answer = encode(RelayError(ErrorCode.INTERNAL_ERROR, message_id=msg.message_id).frame())
        finally:
            turn.release()
            pipeline.release(session, size)
            pipeline.store_ended()
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if answer is not None:
                session.push(answer)
            answered.set_result(None)

    async def _deliver(self, session: Session, ident: Ident, msg: QueuedMessage,
                       barrier: asyncio.Future[None] | None, turn: WriteTurn, silent: tuple[str, ...]) -> str:
        """Store, then offer to whoever holds the recipient; returns the answer frame. Raises RelayError for
        refusals. Storing waits for the sender's previous offer to be settled, so a message that falls back to
        storing is stored before later ones, and for its write turn, so stores keep send order."""
        if barrier is not None and not barrier.done():
            await asyncio.wait([barrier])
        sent = False
        try:
            if not self.local.store.healthy:  # answer now rather than after another timeout
                raise StorageUnavailable(self.local.store.problem or "storage is unavailable")
            with self.answer_within.limit():
                spending = self.budget.spend(session.address or "", session.ip, msg.recipient, utf8_len(msg.content),
                                             msg.message_id, low_room(self.local.limits.max_total_bytes,
                                                                      self.local.store.stored_bytes()))
                if spending is not None:
                    await spending
                await turn.wait()
                sent = True
                turn.release()
                result, where = await self.peers.enqueue(msg, self.local.limits)
        except (StorageUnavailable, TimeoutError) as exc:
            if silent or (sent and not isinstance(exc, StorageUnavailable)):
                # a peer that did not answer the offer may have taken it; a store cut short may have landed
                raise RelayError(ErrorCode.STORAGE_TIMEOUT, message_id=msg.message_id) from None
            if isinstance(exc, StorageUnavailable):
                raise storage_error(exc, msg.message_id) from None
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=msg.message_id) from None
        refusal = refusal_of(result)
        if refusal is not None:
            raise RelayError(refusal.code, refusal.message, message_id=msg.message_id)
        if result is EnqueueResult.DELIVERED:
            return self.local.answer_text(ident, msg, "delivered")
        after = self._stored(msg)
        if result is EnqueueResult.DUPLICATE:
            # A resend of a stored message: its first notice may be lost (its instance died after the write).
            self.refresh.request(msg.recipient)
            if where.instances:
                self.peers.hint(where, msg.recipient)
            return self.local.answer_text(ident, msg, "queued")
        if silent:  # they did not answer the unstored offer (it may be lost): they read the queue instead
            self.peers.hint(PeerSessions(silent), msg.recipient)
            where = PeerSessions(tuple(i for i in where.instances if i not in silent), where.ack)
        return self.local.answer_text(ident, msg, await self._deliver_stored(msg, where, after))

    async def _deliver_stored(self, msg: QueuedMessage, where: PeerSessions, after: int) -> str:
        """Push a committed message to the recipient's ready sessions here and offer it to its peers."""
        targets = self.routes.ready_sessions(msg.recipient)
        if targets and self.refresh.reading(msg.recipient):
            taken = await self._pushed_by_a_read(msg)
        elif self.refresh.caught_up(msg.recipient, msg.seq):
            taken = list(targets)  # a read of the queue here pushed it already
        else:
            taken = self.local.push_stored(targets, msg)
            if taken:
                self.refresh.pushed(msg.recipient, msg.seq)
        keep = where.ack or any(s.ack for s in taken)
        far = NOT_OFFERED
        if where.instances:
            far = await self.peers.offer(where, msg, stored=True, after=after, keep=keep)
            if far.silent:  # the offer or its answer was lost: make sure those sessions' instances read the queue
                self.peers.hint(PeerSessions(far.silent), msg.recipient)
        if not taken and not far.count:
            self.metrics.queued.inc()
            self.local.on_stored(msg.recipient)
            return "queued"
        self.metrics.routed_live.inc()
        if taken and not keep and not far.ack:  # a peer removes what only its plain sessions took
            self.local.remove_soon(msg)
        return "delivered"

    async def _pushed_by_a_read(self, msg: QueuedMessage) -> list[Session]:
        """A read of the recipient's queue is under way here (after a blip, a lapse or a hint): it may find stored
        messages of this sender whose notices were lost, so this one is left to the next read, which pushes it
        after them, in seq order (rule 3 of ``offers``). The sessions that took it; none when the read did not
        end within ``answer_within``'s time (it is stored, and that read delivers it)."""
        try:
            with self.answer_within.limit():
                await self.refresh.read(msg.recipient, seen=msg.seq)
        except TimeoutError:
            return []
        targets = self.routes.ready_sessions(msg.recipient)
        return list(targets) if self.refresh.caught_up(msg.recipient, msg.seq) else []


class _LiveOffer:
    """An unstored message offered to peers (``ClusterDelivery._offer_then_answer``), until they answer: counted
    in its sender's pipeline, which waits for it (``settled``), with the answers before and after it and its write
    turn, kept for its fallback store. An object with a method rather than a closure over eleven variables: this is
    the cluster's most frequent allocation, and each closed-over variable is an object the collector tracks."""

    __slots__ = ("delivery", "session", "pipeline", "ident", "msg", "size", "barrier", "turn", "previous",
                 "answered", "settled")

    def __init__(self, delivery: ClusterDelivery, session: Session, pipeline: Pipeline, ident: Ident,
                 msg: QueuedMessage) -> None:
        self.delivery = delivery
        self.session = session
        self.pipeline = pipeline
        self.ident = ident
        self.msg = msg
        self.size = size = len(msg.content)
        pipeline.hold(session, size)
        loop = asyncio.get_running_loop()
        self.barrier = pipeline.offer if pipeline.offer is not None and not pipeline.offer.done() else None
        self.previous, self.answered = pipeline.answered, loop.create_future()
        self.settled: asyncio.Future[None] = loop.create_future()
        pipeline.answered = self.answered
        pipeline.offer = pipeline.tail = self.settled
        self.turn = pipeline.write_turn()  # kept for its fallback store

    def done(self, taken: Taken) -> None:
        """The peers' answer: answered ``delivered`` when a session took it, else stored in its place, and
        answered then."""
        delivery, session, pipeline, answered, settled = (self.delivery, self.session, self.pipeline, self.answered,
                                                          self.settled)
        if not taken.count:
            pipeline.store_started()  # the sender's next messages wait for it, not offered past it
            task = delivery.local.tasks.spawn(delivery._store_and_answer(
                session, pipeline, self.ident, self.msg, self.size, self.barrier, self.turn, self.previous, answered,
                silent=taken.silent))
            task.add_done_callback(lambda _: settled.set_result(None))
            return
        self.turn.release()
        pipeline.release(session, self.size)
        delivery.metrics.routed_live.inc()
        answer = delivery.local.answer_text(self.ident, self.msg, "delivered")
        settled.set_result(None)
        previous = self.previous
        if previous is None or previous.done():
            session.push(answer)
            answered.set_result(None)
        else:
            delivery.local.tasks.spawn(_answer_after(session, answer, previous, answered))

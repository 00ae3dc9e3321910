"""A recipient's stored backlog: sent when its session is listening, acknowledged in batches.

After ``auth_success`` a session is not ``ready``: live messages for it are
stored, so they queue behind the backlog. Ack sessions get the backlog at
once. A plain session gets it once it shows it is listening (the real app
subscribes to messages only after its key upload): at its first frame after
``auth``, shortly after a key upload for its address, or after
``[queue] flush_delay_ms``, whichever comes first. Before reading the store,
the flush waits for writes still landing for the address (acks, receipts,
kept messages) and for the address's other sessions that are closing to
finish the frames they received, so a client that acked and closed never
sees those messages again. The peers (other relayd instances on the same
storage) that hold sessions of the address do the same for theirs before the
read (bounded in time).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import message_text
from ..ops.metrics import RelayMetrics
from .seams import NO_PEERS, Peers, Routes
from .senders import Answers, ident_of
from .session import Session
from ..storage.store import QueuedMessage, StorageOutcomeUnknown, StorageUnavailable, Store
from ..tasks import TaskSet, retrieved
from .writes import AddressWrites

log = logging.getLogger("relayd.protocol.router")

FLUSH_BATCH = 1024
"""Messages of a later page (within ``FLUSH_PAGE_BYTES``): on SQLite a page's removal is one commit, and the index
pages it rewrites are shared by more messages in a larger page (10,000 of one recipient: 0.45 WAL pages per message
in pages of 256, 0.26 in pages of 1,024)."""
FLUSH_FIRST_PAGE = 32
"""Messages of a flush's first page: a short read puts the first message on the wire sooner."""
FLUSH_PAGE_BYTES = 256 * 1024
"""Content read from the store per flush page: what one session may hold beyond its socket's buffers."""
MAX_ACK_IDS = 1000
DRAIN_WAIT_S = 2.0
"""Longest a new session waits for its address's closing sessions to finish their last frames."""


class Backlog:
    """Flushes stored messages and receipts to new sessions; applies acks."""

    def __init__(self, config: Config, routes: Routes, store: Store, metrics: RelayMetrics, clock: Clock,
                 writes: AddressWrites, peers: Peers = NO_PEERS, answers: Answers | None = None) -> None:
        """``answers``: the instance's memory of answered and delivered messageIds (``Delivery.answers``),
        where a flush records what it pushed to a plain session, for peers that offer a resend of it here (None:
        no peers, nothing recorded; the sender's own instance answers its resends)."""
        self.routes = routes
        self.answers = answers
        self.peers = peers
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.writes = writes
        self._waiting: dict[Session, asyncio.Future[None]] = {}
        self._released: dict[Session, asyncio.Future[None]] = {}
        self._stored_meanwhile: dict[Session, bool] = {}
        self._acks: dict[str, list[tuple[Session, list[str]]]] = {}
        self.tasks = TaskSet()
        self.on_flushed: Callable[[Session, int], None] = lambda session, last_seq: None
        """Told when a session has received its whole backlog and is ready, with the last seq it read (0:
        none): from there on, what is stored for it reaches it only live or through ``relayd.cluster``."""
        self.on_unflushed: Callable[[Session, int], None] = lambda session, last_seq: None
        """Told when a session was made ready without (the rest of) its backlog, the store failing, with the last
        seq it was sent (0: none): it takes live messages, so ``relayd.cluster`` must read the queue for it
        before it pushes any past what waits there."""
        self.flush_delay = 0.0
        self.key_upload_margin = 0.0
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.flush_delay = config.queue.flush_delay_ms / 1000
        self.key_upload_margin = config.queue.flush_after_key_upload_ms / 1000

    async def settle(self) -> None:
        self._submit_acks()
        await self.tasks.settle()

    # Session events

    async def prepare(self, session: Session) -> bool:
        """Called during ``auth``, after the session joined its address: is there a backlog?

        First lets the address's closing sessions apply their last frames and
        its pending writes land. With nothing stored the session is ready at
        once (True): a fresh connection takes live messages from its first
        moment. Otherwise ``start`` sends the backlog after ``auth_success``.
        Raises StorageUnavailable (the session is then made ready, for live
        traffic only).
        """
        address = session.address
        assert address is not None
        await self._earlier_sessions_done(session, address)
        await self.writes.landed(address)
        await self.peers.drain(address)
        self._stored_meanwhile[session] = False
        try:
            messages, receipts = await self.store.backlog_size(address)
        except StorageUnavailable:
            session.ready = True
            self.on_unflushed(session, 0)
            raise
        finally:
            stored = self._stored_meanwhile.pop(session)
        session.ready = empty = not (messages or receipts or stored)
        return empty

    def stored(self, recipient: str) -> None:
        """A message for ``recipient`` was stored because no session of it was ready: a preparing one must
        flush, even if its size read came back empty, and a flushing one must read again before it is ready,
        even if its last read came back empty (either read may have been served before the write)."""
        for session in self.routes.sessions(recipient):
            if session in self._stored_meanwhile:
                self._stored_meanwhile[session] = True

    def start(self, session: Session) -> Awaitable[None] | None:
        """The session has a backlog: send it now (ack) or once the session is listening (plain).

        Ack sessions are flushed by a task, so their acks are read while the
        backlog goes out. A plain session with no hold (``flush_delay_ms = 0``)
        is flushed before its next frame is read: the returned awaitable is
        the flush, for the caller to await.
        """
        if not session.ack:
            if not self.flush_delay:
                return self.flush(session)
            self._waiting[session] = asyncio.get_running_loop().create_future()
        self.tasks.spawn(self._flush_when_listening(session))
        return None

    def listening(self, session: Session) -> None:
        """The session sent a frame after ``auth``: it is listening."""
        self._start_waiting(session, 0.0)

    def key_uploaded(self, address: str) -> None:
        """A key was published for ``address``: its app subscribes right after the upload's answer."""
        for session in self.routes.sessions(address):
            self._start_waiting(session, self.key_upload_margin)

    def _start_waiting(self, session: Session, delay: float) -> None:
        waiter = self._waiting.get(session)
        if waiter is None or waiter.done():
            return
        if delay:
            asyncio.get_running_loop().call_later(delay, _resolve, waiter)
        else:
            waiter.set_result(None)

    def closed(self, session: Session) -> None:
        waiter = self._waiting.pop(session, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()
        released = self._released.pop(session, None)
        if released is not None and not released.done():
            released.set_result(None)

    # The flush

    async def _flush_when_listening(self, session: Session) -> None:
        waiter = self._waiting.get(session)
        if waiter is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.flush_delay)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            self._waiting.pop(session, None)
        if session.closed:
            return
        assert session.address is not None
        await self.writes.landed(session.address)
        await self.flush(session)

    async def drained(self, address: str) -> None:
        """Another instance is about to read the address's backlog: return once the address's closing sessions
        here applied their last frames and its pending writes landed (bounded)."""
        await self._earlier_sessions_done(None, address)
        await self.writes.landed(address)

    async def _earlier_sessions_done(self, session: Session | None, address: str) -> None:
        """Wait (boundedly) for the address's sessions whose connection is closing to apply their last frames."""
        loop = asyncio.get_running_loop()
        closing = []
        for other in self.routes.sessions(address):
            if other is not session and not other.closed and other.outbox.closing:
                released = self._released.get(other)
                if released is None:
                    released = self._released[other] = loop.create_future()
                closing.append(released)
        if closing:
            await asyncio.wait(closing, timeout=DRAIN_WAIT_S)
        self._submit_acks()

    async def flush(self, session: Session) -> None:
        """Send the stored backlog in order, then mark the session ready for live traffic.

        Plain sessions have what was written to them removed (and kept again
        if their connection ends before the bytes reached the peer); ack
        sessions keep it until acked and get ``queue_empty`` at the end.
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
        """True once the whole backlog was written and the session is ready. When the store fails, the session is
        made ready for live traffic, and ``on_unflushed`` told how far it got.

        A plain session's page is removed from the store before the next one is read, as one job after the
        other: the read is started just before the removal is submitted, so a store with one writer (SQLite)
        runs both in one batch instead of the removal lingering alone for writes to group with. The next page
        is read only once this one was written, so a flush still holds at most one page.
        """
        after = 0
        reading: asyncio.Future[list[QueuedMessage]] | None = None
        try:
            while not session.closed:
                try:
                    if reading is None:
                        self._stored_meanwhile[session] = False
                        batch = await self.store.pending(address, FLUSH_FIRST_PAGE if not after else FLUSH_BATCH,
                                                         after, FLUSH_PAGE_BYTES)
                    else:
                        batch = await reading
                finally:
                    reading = None
                    stored = self._stored_meanwhile.pop(session, False)
                if not batch:
                    if stored:  # stored while that read ran (on a pool it may have been served before the commit)
                        continue
                    session.ready = True
                    self.on_flushed(session, after)
                    return True
                written = []
                remember = self.answers.remember if self.answers is not None and not session.ack else None
                for msg in batch:
                    waiter = session.outbox.congested()
                    if waiter is not None:
                        await waiter
                    if not session.push(message_text(msg.sender, msg.content, msg.message_id, msg.timestamp,
                                                     queued=True), None if session.ack else msg):
                        break
                    written.append(msg.seq)
                    if remember is not None:  # it leaves the store (an ack session's stays): a resend offered is taken
                        remember(ident_of(msg), "delivered")
                self.metrics.flushed.inc(len(written))
                after = batch[-1].seq
                whole = len(written) == len(batch)
                if not session.ack and written:
                    if whole:
                        reading = self._read_page(session, address, after)
                    await self.store.remove(address, written)  # submitted now, ahead of the read
                if not whole:
                    return False
            return False
        except StorageUnavailable:
            if not session.closed:
                session.ready = True
                self.on_unflushed(session, after)
            raise
        finally:
            self._stored_meanwhile.pop(session, None)
            if reading is not None:  # the removal failed or the session closed: that read is not the flush's
                reading.add_done_callback(retrieved)
                reading.cancel()

    def _read_page(self, session: Session, address: str, after: int) -> asyncio.Future[list[QueuedMessage]]:
        """Start reading the page after seq ``after`` (it goes to the store at the loop's next turn); until it is
        looked at, ``stored`` notes what is stored for the address meanwhile (it may be missing from that page)."""
        self._stored_meanwhile[session] = False
        return asyncio.ensure_future(self.store.pending(address, FLUSH_BATCH, after, FLUSH_PAGE_BYTES))

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

    # Acks

    def ack(self, session: Session, frame: dict[str, Any]) -> None:
        """Queue an ack frame's messageIds; every ack received in one loop iteration is applied in one write."""
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
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._submit_acks)
        self._acks.setdefault(session.address, []).append((session, ids))

    def acks_pending(self, address: str) -> bool:
        """Whether acks of ``address`` (or other writes of it) are still on their way to the store."""
        return address in self._acks or self.writes.pending(address)

    async def acks_written(self, address: str) -> None:
        """Return once every ack received so far for ``address`` was written (or refused, which its session
        was told)."""
        self._submit_acks()
        await self.writes.landed(address)

    def _submit_acks(self) -> None:
        pending, self._acks = self._acks, {}
        for address, acks in pending.items():
            task = self.tasks.spawn(self._apply_acks(address, acks))
            self.writes.note(address, task)

    async def _apply_acks(self, address: str, acks: list[tuple[Session, list[str]]]) -> None:
        ids = [mid for _, batch in acks for mid in batch]
        try:
            removed = await self.store.ack(address, ids)
        except StorageOutcomeUnknown:
            for session in {s for s, _ in acks}:
                session.send(RelayError(ErrorCode.STORAGE_TIMEOUT, "Storage did not confirm the ack in time; "
                                        "it may not be recorded: send it again").frame())
            return
        except StorageUnavailable:
            for session in {s for s, _ in acks}:
                session.send(RelayError(ErrorCode.STORAGE_UNAVAILABLE,
                                        "Storage is unavailable; ack not recorded").frame())
            return
        self.metrics.acked.inc(removed)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

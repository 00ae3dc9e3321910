"""What the relay keeps per sender: its recent answers (so a resent messageId is answered as the first one was)
and its write pipeline (so its stored messages are answered in send order, with a bound on what it pins)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import NamedTuple

from ..storage.store import QueuedMessage
from .session import Session

RECENT_IDS = 16384
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 1 << 20

Ident = tuple[str, str, str]
"""(sender, recipient, messageId), addresses lower-cased: what makes a message the same message."""


def ident_of(msg: QueuedMessage) -> Ident:
    return msg.sender.lower(), msg.recipient, msg.message_id


class Answers:
    """The answers (``delivered``/``queued``) given to the most recent messages, by ``Ident``; and the messages
    answered ``storage_timeout`` (``unsure``): their write may have landed, so a resend of one is stored (the store
    answers it as a duplicate if so), never pushed live beside a stored copy, until an answer is remembered."""

    __slots__ = ("_recent", "_unsure")

    def __init__(self) -> None:
        self._recent: OrderedDict[Ident, str] = OrderedDict()
        self._unsure: OrderedDict[Ident, None] = OrderedDict()

    def get(self, ident: Ident) -> str | None:
        return self._recent.get(ident)

    def remember(self, ident: Ident, answer: str) -> None:
        recent = self._recent
        recent[ident] = answer
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)
        if self._unsure:
            self._unsure.pop(ident, None)

    def mark_unsure(self, ident: Ident) -> None:
        unsure = self._unsure
        unsure[ident] = None
        if len(unsure) > RECENT_IDS:
            unsure.popitem(last=False)

    def unsure(self, ident: Ident) -> bool:
        """Checked on every live message: free while no write is in doubt."""
        return bool(self._unsure) and ident in self._unsure


class WriteTurn(NamedTuple):
    """A message's place among its sender's writes to the store (``Pipeline.write_turn``)."""

    after: asyncio.Future[None] | None
    """Resolved once the sender's previous message was written, or will not be."""
    mine: asyncio.Future[None]

    async def wait(self) -> None:
        if self.after is not None and not self.after.done():
            await asyncio.wait([self.after])

    def release(self) -> None:
        """This message's write is on its way (the store takes writes in the order they come), or will not be."""
        if not self.mine.done():
            self.mine.set_result(None)


class Pipeline:
    """One sender's stored-but-unanswered messages: how many, how large, and when the last one is answered.

    With peers it also counts ``stores`` (messages being stored: later ones that would go live are
    ``deferred`` until none is, rather than offered or pushed past them), the last ``offer`` to peers (a
    message stored after it waits for it, so an offer that falls back to storing keeps its place), the last
    ``answered`` (answers keep send order) and the last write turn taken (writes keep send order)."""

    __slots__ = ("in_flight", "bytes", "tail", "stores", "offer", "answered", "written", "deferred", "draining",
                 "_no_stores")

    def __init__(self) -> None:
        self.in_flight = 0
        self.bytes = 0
        self.tail: asyncio.Future[None] | None = None
        self.stores = 0
        self.offer: asyncio.Future[None] | None = None
        self.answered: asyncio.Future[None] | None = None
        self.written: asyncio.Future[None] | None = None
        self.deferred: deque[tuple[Ident, QueuedMessage]] | None = None
        """Messages held, in send order, until none of the sender's is being stored (counted in flight); made
        only while there are some (an empty deque is 760 bytes, and every sending session has a pipeline)."""
        self.draining: asyncio.Future[None] | None = None
        """The task that routes ``deferred`` messages."""
        self._no_stores: asyncio.Future[None] | None = None

    def store_started(self) -> None:
        self.stores += 1

    def store_ended(self) -> None:
        self.stores -= 1
        if not self.stores and self._no_stores is not None:
            self._no_stores.set_result(None)
            self._no_stores = None

    async def no_stores(self) -> None:
        """Return once none of the sender's messages is being stored."""
        while self.stores:
            if self._no_stores is None:
                self._no_stores = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._no_stores])

    def write_turn(self) -> WriteTurn:
        """The next message's turn to write, taken in send order by every message that may be stored: it writes
        once the previous one's write is on its way, whatever each waited for before (a budget's round trip
        for the first message to a recipient), so the store numbers a sender's messages in send order."""
        after, self.written = self.written, asyncio.get_running_loop().create_future()
        return WriteTurn(after, self.written)

    @property
    def full(self) -> bool:
        """Past ``MAX_IN_FLIGHT`` unanswered writes (or ``MAX_IN_FLIGHT_BYTES``) the sender waits for ``tail``, its
        newest, which bounds what one connection pins. Never for the task asking (the one that routes ``deferred``
        messages, admitted already)."""
        return ((self.in_flight >= MAX_IN_FLIGHT or self.bytes >= MAX_IN_FLIGHT_BYTES)
                and self.tail is not None and not self.tail.done() and self.tail is not asyncio.current_task())

    async def room(self) -> None:
        """Return once the pipeline has room (waiting for its newest write each time: the window drains rather
        than slides)."""
        while self.full:
            assert self.tail is not None
            await asyncio.wait([self.tail])

    def hold(self, session: Session, size: int) -> None:
        """Count one message of ``size`` bytes in flight, and in its connection's budget."""
        self.in_flight += 1
        self.bytes += size
        session.outbox.hold(size)

    def release(self, session: Session, size: int) -> None:
        self.in_flight -= 1
        self.bytes -= size
        session.outbox.hold(-size)


class Pipelines:
    """The pipeline of each sending session."""

    __slots__ = ("_by_session",)

    def __init__(self) -> None:
        self._by_session: dict[Session, Pipeline] = {}

    def get(self, session: Session) -> Pipeline | None:
        return self._by_session.get(session)

    def of(self, session: Session) -> Pipeline:
        pipeline = self._by_session.get(session)
        if pipeline is None:
            pipeline = self._by_session[session] = Pipeline()
        return pipeline

    def in_flight(self, session: Session) -> int:
        pipeline = self._by_session.get(session)
        return pipeline.in_flight if pipeline else 0

    def closed(self, session: Session) -> None:
        """Forget a closed sender's pipeline; its writes still finish and are answered into the void."""
        self._by_session.pop(session, None)

"""Reading an address's stored queue again for its ready sessions here: the one way a stored message reaches a
session that is already open, whatever notices were lost.

A peer that stores a message for an address with sessions here hints this
instance (an offer of the stored message, or a ``pull``). A hint may be lost
(the inbox was resubscribing after a blip of the backplane, the storing peer died between
its write and its hint, heartbeats lapsed), so a hint only saves time: the
queue is read again, in seq order, whenever one may have been missed. That
is, when asked by a peer; when an offer names an earlier stored message of its
sender (``after``) that has not reached the sessions here (``caught_up``);
after the inbox subscribed again; when the link to the backplane recovers from a
failure; and whenever any instance's heartbeat lapsed or came back
(``refresh_all``).

Per address this keeps ``floor`` (every stored message up to that seq has
reached the address's sessions here, or left the store) and ``pushed`` (seqs
above the floor pushed to them since): a read starts at the floor and skips
what was pushed, so an ack session never gets a message twice from here.
Plain sessions have what they took removed from the store, as in a flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..ops.metrics import RelayMetrics
from ..protocol.backlog import FLUSH_BATCH, FLUSH_PAGE_BYTES
from ..protocol.seams import Routes
from ..protocol.senders import Answers, ident_of
from ..protocol.session import Session
from ..protocol.writes import AddressWrites
from ..frames import message_text
from ..storage.store import QueuedMessage, StorageUnavailable, Store
from ..tasks import TaskSet

log = logging.getLogger("relayd.cluster")

MAX_PUSHED = 1024
"""Seqs pushed above the floor before a read is made to raise the floor (and forget them)."""
PARALLEL_READS = 32
"""Addresses read at once by ``refresh_all`` (after a blip every open address is read)."""


class _Address:
    """What this instance knows of one address's stored queue (see the module docstring)."""

    __slots__ = ("floor", "pushed", "running", "unread", "again", "seen", "waiting", "next_waiting")

    def __init__(self) -> None:
        self.floor = 0
        self.pushed: set[int] = set()
        self.running = False
        self.unread = False
        """The last read failed: what it was to find may still wait, so until a read succeeds nothing is pushed
        live past it (the next message for the address is stored and asks for that read)."""
        self.again: int | None = None
        """Another read was asked for while one ran: from this seq (-1: from the floor when it starts)."""
        self.seen = 0
        """The newest seq a request named as stored before it was made: a read that starts after the request
        finds it if it is still stored, so once the read is done the floor may rise to it."""
        self.waiting: list[asyncio.Future[None]] = []
        """Told when the read under way ends."""
        self.next_waiting: list[asyncio.Future[None]] = []
        """Told when the read after it ends (asked for while one ran)."""


class Refresh:
    """Reads stored queues again for the ready sessions of this instance (see the module docstring)."""

    def __init__(self, routes: Routes, online: Callable[[], Iterable[str]], store: Store, writes: AddressWrites,
                 metrics: RelayMetrics, answers: Answers, remove: Callable[[str, list[int]], None]) -> None:
        """``online``: the addresses with sessions here; ``answers``: what was answered to (and so delivered
        live by) this instance, so a stored copy of a message its sessions took live is not sent again;
        ``remove``: removes what plain sessions took (``Delivery.remove_delivered``)."""
        self.routes = routes
        self.remove = remove
        self.answers = answers
        self.online = online
        self.store = store
        self.writes = writes
        self.metrics = metrics
        self.tasks = TaskSet()
        self._addresses: dict[str, _Address] = {}
        self._reads = asyncio.Semaphore(PARALLEL_READS)

    def _of(self, address: str) -> _Address:
        state = self._addresses.get(address)
        if state is None:
            state = self._addresses[address] = _Address()
        return state

    # What happened to the sessions here

    def flushed(self, session: Session, last_seq: int) -> None:
        """A session read its whole backlog, up to ``last_seq``."""
        assert session.address is not None
        state = self._of(session.address)
        if last_seq > state.floor:
            state.floor = last_seq
            state.pushed = {s for s in state.pushed if s > last_seq}

    def unflushed(self, session: Session, last_seq: int) -> None:
        """A session was made ready without (the rest of) its backlog, sent up to ``last_seq``, the store failing:
        nothing of its address is pushed live past what waits stored until a read succeeds, which delivers it
        (one starts now)."""
        assert session.address is not None
        self.flushed(session, last_seq)
        self._of(session.address).unread = True
        self.request(session.address)

    def pushed(self, address: str, seq: int) -> None:
        """A stored message was pushed to the address's ready sessions here (a peer's offer)."""
        state = self._of(address)
        if seq > state.floor:
            state.pushed.add(seq)
            if len(state.pushed) > MAX_PUSHED:
                self.request(address)

    def put_back(self, address: str, seqs: tuple[int, ...]) -> None:
        """These messages were put back in the store (a connection never received them): send them again."""
        state = self._addresses.get(address)
        if state is not None:
            state.pushed.difference_update(seqs)

    def gone(self, address: str) -> None:
        """The address has no session here any more."""
        state = self._addresses.get(address)
        if state is not None and not state.running:
            del self._addresses[address]

    def reading(self, address: str) -> bool:
        """Whether a read of the address's queue is under way (after a blip, a lapse or a hint), or the last one
        failed: until one is done, nothing of the address is pushed live past what it may find."""
        state = self._addresses.get(address)
        return state is not None and (state.running or state.unread)

    def caught_up(self, address: str, seq: int) -> bool:
        """Whether the stored message ``seq`` (0: none) has reached the address's sessions here, or left the
        store, as far as this instance knows."""
        if seq <= 0:
            return True
        state = self._addresses.get(address)
        return state is not None and (seq <= state.floor or seq in state.pushed)

    # Reading

    async def read(self, address: str, seen: int = 0) -> None:
        """``request``, and return once a read that began after the call has ended."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.request(address, seen=seen, done=done)
        await done

    def request(self, address: str, since: int = -1, seqs: tuple[int, ...] = (), seen: int = 0,
                done: asyncio.Future[None] | None = None) -> None:
        """Read the address's queue for its ready sessions here (from ``since`` when >= 0, else the floor).
        ``seen``: a seq the asker knows was stored before it asked (an offer's ``after``); ``done`` is resolved
        when a read that began after this request has ended."""
        if not self.routes.ready_sessions(address):
            if done is not None:
                done.set_result(None)
            return
        state = self._of(address)
        state.seen = max(state.seen, seen)
        if seqs:
            state.pushed.difference_update(seqs)
        if state.running:
            state.again = since if state.again is None else _earliest(state.again, since)
            if done is not None:
                state.next_waiting.append(done)
            return
        state.running = True
        if done is not None:
            state.waiting.append(done)
        self.tasks.spawn(self._run(address, state, since))

    def refresh_all(self) -> None:
        """Read the queue of every address with ready sessions here (notices may have been lost)."""
        for address in list(self.online()):
            self.request(address)

    async def _run(self, address: str, state: _Address, since: int) -> None:
        """Read until no further read was asked for; each starts at the floor as it is then (a read just done
        raised it past what it pushed), or earlier at ``since``."""
        try:
            while True:
                async with self._reads:
                    await self.writes.landed(address)
                    seen = state.seen
                    start = state.floor if since < 0 else min(since, state.floor)
                    try:
                        await self._read(address, state, start, seen)
                    except StorageUnavailable as exc:
                        state.unread = True
                        log.warning("cannot read the queue of an open session: %s; read again on the next hint "
                                    "or message for it", exc)
                        return
                    state.unread = False
                _resolve(state.waiting)
                state.waiting, state.next_waiting = state.next_waiting, []
                if state.again is None:
                    return
                since, state.again = state.again, None
        finally:
            _resolve(state.waiting)
            _resolve(state.next_waiting)
            state.waiting, state.next_waiting = [], []
            state.running = False
            if not self.routes.sessions(address):
                self._addresses.pop(address, None)

    async def _read(self, address: str, state: _Address, after: int, seen: int) -> None:
        """Push what is stored after ``after`` and was not pushed yet, in order; raise the floor to what the
        read went past, or to ``seen`` (stored before the read began: pushed by it, or gone)."""
        while True:
            targets = self.routes.ready_sessions(address)
            if not targets:
                return
            page = await self.store.pending(address, FLUSH_BATCH, after, FLUSH_PAGE_BYTES)
            if not page:
                floor = max(after, seen)
                if floor > state.floor:
                    state.floor = floor
                    state.pushed = {s for s in state.pushed if s > floor}
                return
            removed: list[int] = []
            for msg in page:
                if msg.seq in state.pushed:
                    continue
                ident = ident_of(msg)
                if self.answers.get(ident) == "delivered":
                    removed.append(msg.seq)  # the stored fallback of a live copy taken here
                elif self._push(targets, msg):
                    state.pushed.add(msg.seq)
                    if not any(s.ack for s in targets):  # it leaves the store: a resend offered later is taken
                        removed.append(msg.seq)
                        self.answers.remember(ident, "delivered")
            after = page[-1].seq
            self.metrics.flushed.inc(len(removed))
            if removed:
                self.remove(address, removed)

    @staticmethod
    def _push(targets: tuple[Session, ...], msg: QueuedMessage) -> int:
        """To open sessions, as a message stored while they are ready is pushed on one instance (``queued``
        false: it is not their backlog)."""
        data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
        return sum(s.push(data, None if s.ack else msg) for s in targets)

    async def settle(self) -> None:
        await self.tasks.settle()


def _resolve(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _earliest(a: int, b: int) -> int:
    """Of two read starts (-1: the floor), the one that reads more."""
    if a < 0:
        return b
    if b < 0:
        return a
    return min(a, b)

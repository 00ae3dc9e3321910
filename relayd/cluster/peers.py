"""This instance's link to its peers (the other relayd instances on the same backplane): what it asks of them, and
what they ask of it.

Outgoing: offers of messages (request and reply), copies of live frames,
hints that stored messages wait, evictions, key uploads and drains, each
addressed to the instances the recipient's presence names. Incoming: the same
kinds from the bus, applied to this instance through ``ThisInstance``.

Messages on the bus (JSON, ``k`` is the kind; ``to`` the address):
``offer``/``push`` a message (``m``: sender, messageId, content, timestamp,
queued_at, seq; ``s``: stored; ``o``: the sending instance's count of
unstored offers for the pair; ``w``: the seq of the sender's previous
stored message to that recipient, see ``offers``; ``keep``: an ack session
takes it somewhere, so it stays stored) with or without a reply
(``n`` sessions took it, ``a`` one of them acks); ``frame`` (``f``: a typing
or read frame, a reply when asked); ``pull`` (stored messages may wait for
the address: read its queue; ``since``: from that seq, ``seqs``: messages put
back); ``drain`` (reply once the address's closing sessions here are done);
``evict``; ``key``; ``inv`` (``a``: drop the cached presence of that address);
``ping``. Replies (``re``, or ``res`` batched) are the bus's own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits, StorageUnavailable
from ..tasks import TaskSet
from .backplane import Backplane
from .bus import Bus, Message, Taken
from .presence import NO_PEER_SESSIONS, WATCH_TTL_MS, ClusterPresence, PeerSessions

log = logging.getLogger("relayd.cluster")

BUDGET_WINDOW_MS = 3_600_000
HINT_RETRY_S = 0.2
"""A hint that reached no subscriber, or whose publish failed, is sent again after this long..."""
HINT_RETRIES = 50
"""...this many times (about 10 s): past that, the holder's inbox or this instance's link has been down long
enough that the holder reads every open queue itself when its inbox or its lapsed peers come back."""


class PeerLink(Protocol):
    """The peers as this instance's senders reach them (``ClusterPeers``; a fake in the unit tests).

    Every coroutine is bounded in time: a peer that does not answer within
    ``[cluster] reply_timeout_ms`` counts as having taken nothing. Those that
    need the backplane raise StorageUnavailable.
    """

    def cached(self, address: str) -> PeerSessions | None:
        """Where ``address`` has sessions on peers, when known without asking the backplane; None: call ``lookup``."""
        ...

    async def lookup(self, address: str) -> PeerSessions:
        """Ask the backplane, and keep the answer until the address's presence changes."""
        ...

    async def offer(self, where: PeerSessions, msg: QueuedMessage, *, stored: bool, after: int,
                    keep: bool = False) -> Taken:
        """Offer a message to the recipient's ready sessions on those peers and wait for their answers.

        ``stored``: the message is committed (``msg.seq`` set), so an ack
        session may take it. ``after``: the seq of the sender's previous
        stored message to the recipient (0: none known), which a peer must
        have delivered before it takes this one (see ``offers``). ``keep``:
        an ack session of the recipient takes it somewhere, so a peer whose
        plain sessions took a stored message leaves it stored (else it
        removes it, as the one that knows whether their bytes arrived).
        """
        ...

    def offer_soon(self, where: PeerSessions, msg: QueuedMessage, after: int, number: int,
                   then: Callable[[Taken], None]) -> None:
        """``offer`` of an unstored message without a coroutine: ``then`` gets the outcome from the event loop
        within ``[cluster] reply_timeout_ms`` (the live path's cheap form). ``number``: this instance's count
        of unstored offers for the (sender, recipient) pair, so a peer sees when one was lost (``offers``)."""
        ...

    def push(self, where: PeerSessions, msg: QueuedMessage) -> None:
        """Send a message delivered here to the recipient's other devices too, without waiting."""
        ...

    def hint(self, where: PeerSessions, address: str, since: int = -1, seqs: tuple[int, ...] = ()) -> None:
        """Tell those peers that stored messages may wait for ``address``: they read its queue (from ``since``
        when >= 0; ``seqs`` were put back and must be sent again). A hint whose publish failed or reached no
        subscriber is sent again (bounded): the holder may have resubscribed before this instance could publish,
        and then nothing else would make it read."""
        ...

    async def relay_frame(self, where: PeerSessions, to: str, frame: dict[str, Any]) -> Taken:
        """Push a frame (a read receipt) to the ready sessions of ``to`` there; how many took it."""
        ...

    def forward(self, where: PeerSessions, to: str, frame: dict[str, Any]) -> None:
        """Push a frame that is never stored (typing) to the ready sessions of ``to`` there, without waiting."""
        ...

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> tuple[EnqueueResult, PeerSessions]:
        """Store a message, and read where its recipient has sessions on peers in the same atomic step."""
        ...

    async def restore(self, messages: list[QueuedMessage]) -> None:
        """Put back messages a connection never received, and hint the recipients' peers."""
        ...

    async def spend(self, key: str, recipient: str, budget: int) -> bool:
        """Record ``recipient`` in the cluster-wide hourly budget ``key``; False when the budget is spent."""
        ...


class ThisInstance(Protocol):
    """What peers may ask of this instance (``relayd.cluster.Cluster`` wires it to the protocol's parts)."""

    def offered(self, msg: QueuedMessage, *, stored: bool, after: int, keep: bool,
                origin: str = "", number: int = 0) -> tuple[int, bool] | Awaitable[tuple[int, bool]]:
        """Push a message to its recipient's ready sessions here: (how many took it, whether one of them acks),
        or an awaitable of that when the queue is read first."""
        ...

    def forward_here(self, frame: dict[str, Any], to: str) -> int:
        """Push a frame to the ready sessions of ``to`` here; how many took it."""
        ...

    def refresh(self, address: str, since: int, seqs: tuple[int, ...]) -> None:
        """Stored messages may wait for ``address``: read its queue for its ready sessions here."""
        ...

    async def drained(self, address: str) -> None:
        """Return once the address's closing sessions here applied their last frames and its writes landed."""
        ...

    def evict_here(self, address: str) -> None:
        """The address proved ownership elsewhere: close its unsigned sessions here."""
        ...

    def key_uploaded_here(self, address: str) -> None:
        """A key was published for the address elsewhere: its waiting sessions here get their backlog."""
        ...


def _pack(msg: QueuedMessage) -> list[Any]:
    return [msg.sender, msg.message_id, msg.content, msg.timestamp, msg.queued_at, msg.seq]


def _unpack(recipient: str, packed: list[Any]) -> QueuedMessage:
    sender, message_id, content, timestamp, queued_at, seq = packed
    return QueuedMessage(recipient, str(sender), str(message_id), str(content), int(timestamp), int(queued_at),
                         int(seq))


class ClusterPeers:
    """``PeerLink`` over the bus and the backplane (also the protocol's ``seams.Peers``), and the handler of the bus's
    incoming messages."""

    def __init__(self, backplane: Backplane, presence: ClusterPresence, bus: Bus) -> None:
        self.backplane = backplane
        self.presence = presence
        self.bus = bus
        self.here: ThisInstance | None = None
        self.tasks = TaskSet()
        self.closing = False
        """Set at shutdown: hints are no longer sent again."""
        bus.handler = self.handle

    def bind(self, here: ThisInstance) -> None:
        """This instance's protocol, which incoming messages reach (the server binds it once built)."""
        self.here = here

    async def settle(self) -> None:
        """Wait for the evictions, key notices and drains still on their way (shutdown)."""
        self.closing = True
        await self.tasks.settle()

    # PeerLink

    def cached(self, address: str) -> PeerSessions | None:
        return self.presence.cached(address)

    async def lookup(self, address: str) -> PeerSessions:
        return await self.presence.lookup(address)

    async def _where(self, address: str) -> PeerSessions:
        """Cached or looked up; nowhere when the backplane cannot say."""
        where = self.presence.cached(address)
        if where is not None:
            return where
        try:
            return await self.presence.lookup(address)
        except StorageUnavailable:
            return NO_PEER_SESSIONS

    async def offer(self, where: PeerSessions, msg: QueuedMessage, *, stored: bool, after: int,
                    keep: bool = False) -> Taken:
        return self._taken(msg.recipient, await self.bus.request(where.instances, {
            "k": "offer", "to": msg.recipient, "m": _pack(msg), "s": 1 if stored else 0, "w": after,
            "keep": 1 if keep else 0}))

    def offer_soon(self, where: PeerSessions, msg: QueuedMessage, after: int, number: int,
                   then: Callable[[Taken], None]) -> None:
        self.bus.ask(where.instances, {"k": "offer", "to": msg.recipient, "m": _pack(msg), "s": 0, "w": after,
                                       "o": number}, functools.partial(self._answered, msg.recipient, then))

    def _answered(self, address: str, then: Callable[[Taken], None], taken: Taken) -> None:
        then(self._taken(address, taken))

    def push(self, where: PeerSessions, msg: QueuedMessage) -> None:
        for instance in where.instances:
            self.bus.send(instance, {"k": "push", "to": msg.recipient, "m": _pack(msg), "s": 0})

    def hint(self, where: PeerSessions, address: str, since: int = -1, seqs: tuple[int, ...] = ()) -> None:
        body: Message = {"k": "pull", "to": address, "since": since}
        if seqs:
            body["seqs"] = list(seqs)
        for instance in where.instances:
            self._hint(instance, body, HINT_RETRIES)

    def _hint(self, instance: str, body: Message, retries: int) -> None:
        def unheard(_: str) -> None:
            if retries > 0 and not self.closing:
                asyncio.get_running_loop().call_later(HINT_RETRY_S, self._hint, instance, body, retries - 1)
        self.bus.send(instance, body, unheard)

    async def relay_frame(self, where: PeerSessions, to: str, frame: dict[str, Any]) -> Taken:
        return self._taken(to, await self.bus.request(where.instances, {"k": "frame", "to": to, "f": frame}))

    def forward(self, where: PeerSessions, to: str, frame: dict[str, Any]) -> None:
        for instance in where.instances:
            self.bus.send(instance, {"k": "frame", "to": to, "f": frame})

    def _taken(self, address: str, taken: Taken) -> Taken:
        if taken.nobody or taken.silent:
            self.presence.invalidate(address)  # a peer had nobody for it: ask the backplane next time
        return taken

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> tuple[EnqueueResult, PeerSessions]:
        result, found = await self.backplane.enqueue_routed(msg, limits, watcher=self.presence.instance,
                                                        watch_ttl_ms=WATCH_TTL_MS)
        self.presence.fill(msg.recipient, found)
        if not found:
            return result, NO_PEER_SESSIONS
        lapsed = self.presence.lapsed_holders(found)
        if lapsed and result is EnqueueResult.QUEUED:  # only slow, perhaps: it reads the queue when it hears this
            self.hint(PeerSessions(lapsed), msg.recipient)
        return result, self.presence.peer_sessions(found)

    async def restore(self, messages: list[QueuedMessage]) -> None:
        found = await self.backplane.restore_routed(messages)
        for recipient, entries in found.items():
            seqs = tuple(m.seq for m in messages if m.recipient == recipient and m.seq > 0)
            self.hint(self.presence.peer_sessions(entries), recipient, min(seqs, default=0) - 1 if seqs else -1, seqs)

    async def spend(self, key: str, recipient: str, budget: int) -> bool:
        return await self.backplane.spend(key, recipient, budget, BUDGET_WINDOW_MS)

    # seams.Peers

    async def drain(self, address: str) -> None:
        where = self.presence.cached(address)  # the sign-in's own presence write filled it
        if where is not None and where.instances:
            await self.bus.request(where.instances, {"k": "drain", "to": address})

    def evict_unverified(self, address: str) -> None:
        self.tasks.spawn(self._tell(address, "evict"))

    def key_uploaded(self, address: str) -> None:
        self.tasks.spawn(self._tell(address, "key"))

    async def _tell(self, address: str, kind: str) -> None:
        for instance in (await self._where(address)).instances:
            self.bus.send(instance, {"k": kind, "to": address})

    # Incoming

    def handle(self, message: Message) -> None:
        """Apply one message from a peer (the bus logs what raises)."""
        kind, to, here = message.get("k"), message.get("to"), self.here
        if kind == "ping":
            return
        if kind == "inv":
            self.presence.invalidate(str(message.get("a")))
            self.bus.reply(message)
            return
        if here is None or not isinstance(to, str):
            return
        if kind in ("offer", "push"):
            outcome = here.offered(_unpack(to, message["m"]), stored=bool(message.get("s")),
                                   after=int(message.get("w", 0)), keep=bool(message.get("keep", 1)),
                                   origin=str(message.get("from", "")), number=int(message.get("o", 0)))
            if isinstance(outcome, tuple):
                if kind == "offer":
                    self._reply_taken(message, outcome)
            else:
                self.tasks.spawn(self._taken_later(message, kind, outcome))
        elif kind == "frame":
            taken = here.forward_here(dict(message["f"]), to)
            self.bus.reply(message, taken)
        elif kind == "pull":
            here.refresh(to, int(message.get("since", -1)), tuple(int(s) for s in message.get("seqs", ())))
        elif kind == "drain":
            self.tasks.spawn(self._drain(here, message, to))
        elif kind == "evict":
            here.evict_here(to)
        elif kind == "key":
            here.key_uploaded_here(to)

    def _reply_taken(self, message: Message, outcome: tuple[int, bool]) -> None:
        self.bus.reply(message, *outcome)

    async def _taken_later(self, message: Message, kind: Any, outcome: Awaitable[tuple[int, bool]]) -> None:
        try:
            taken = await outcome
        except Exception:
            log.exception("an offer failed")
            taken = (0, False)
        if kind == "offer":
            self._reply_taken(message, taken)

    async def _drain(self, here: ThisInstance, message: Message, address: str) -> None:
        try:
            await here.drained(address)
        finally:
            self.bus.reply(message)

"""What the protocol asks of the other instances (``presence.Elsewhere``), and what they ask of this one.

Outgoing: offers of messages (request and reply), copies of live frames,
stored messages' notifications, evictions, key uploads and drains, each
addressed to the instances the recipient's presence names. Incoming: the same
kinds from the bus, applied to this instance's sessions through ``Here``.

Messages on the bus (JSON, ``k`` is the kind; ``to`` the address):
``offer``/``push`` a message (``m``: sender, messageId, content, timestamp,
queued_at, seq; ``s``: stored) with or without a reply (``n`` sessions took
it, ``a`` one of them acks); ``frame`` (``f``: a typing or read frame, a reply
when asked); ``pull`` (stored messages arrived: send them); ``drain`` (reply
once the address's closing sessions here are done); ``evict``; ``key``;
``inv`` (``a``: drop the cached presence of that address); ``ping``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..protocol.presence import NOWHERE, Remote, Taken
from ..storage.redis.store import RedisStore
from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits, StorageUnavailable
from . import scripts
from .bus import Bus, Message
from .presence import WATCH_TTL_MS, ClusterPresence

log = logging.getLogger("relayd.cluster")

BUDGET_WINDOW_MS = 3_600_000


class Here(Protocol):
    """What other instances may ask of this instance's protocol (``router.Router`` in production)."""

    def offered(self, msg: QueuedMessage, *, stored: bool) -> tuple[int, bool]:
        """Push a message to its recipient's ready sessions here: (how many took it, whether one of them acks).

        An unstored message is not pushed when a session of the recipient acks (0, True): it must be stored first.
        """
        ...

    def forward_here(self, frame: dict[str, Any], to: str) -> int:
        """Push a frame to the ready sessions of ``to`` here; how many took it."""
        ...

    def catch_up(self, address: str) -> None:
        """Messages were stored for ``address`` after its ready sessions here read their backlog: send them."""
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


class ClusterRoutes:
    """``presence.Elsewhere`` over the bus and Redis, and the handler of the bus's incoming messages."""

    def __init__(self, store: RedisStore, presence: ClusterPresence, bus: Bus) -> None:
        self.store = store
        self.presence = presence
        self.bus = bus
        self.here: Here | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        bus.handler = self.handle

    def bind(self, here: Here) -> None:
        """The protocol of this instance, which incoming messages reach (the server binds it once built)."""
        self.here = here

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the evictions, key notices and drains still on their way (shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # presence.Elsewhere

    def cached(self, address: str) -> Remote | None:
        return self.presence.cached(address)

    async def lookup(self, address: str) -> Remote:
        return await self.presence.lookup(address)

    async def _where(self, address: str) -> Remote:
        """Cached or looked up; nowhere when Redis cannot say."""
        remote = self.presence.cached(address)
        if remote is not None:
            return remote
        try:
            return await self.presence.lookup(address)
        except StorageUnavailable:
            return NOWHERE

    async def offer(self, remote: Remote, msg: QueuedMessage, *, stored: bool) -> Taken:
        replies, silent = await self.bus.request(remote.instances, {"k": "offer", "to": msg.recipient,
                                                                    "m": _pack(msg), "s": 1 if stored else 0})
        return self._taken(msg.recipient, replies, silent)

    def offer_soon(self, remote: Remote, msg: QueuedMessage, then: Callable[[Taken], None]) -> None:
        self.bus.ask(remote.instances, {"k": "offer", "to": msg.recipient, "m": _pack(msg), "s": 0},
                     lambda replies, silent: then(self._taken(msg.recipient, replies, silent)))

    def push(self, remote: Remote, msg: QueuedMessage) -> None:
        for instance in remote.instances:
            self.bus.send(instance, {"k": "push", "to": msg.recipient, "m": _pack(msg), "s": 0})

    async def relay_frame(self, remote: Remote, to: str, frame: dict[str, Any]) -> Taken:
        replies, silent = await self.bus.request(remote.instances, {"k": "frame", "to": to, "f": frame})
        return self._taken(to, replies, silent)

    def forward(self, remote: Remote, to: str, frame: dict[str, Any]) -> None:
        for instance in remote.instances:
            self.bus.send(instance, {"k": "frame", "to": to, "f": frame})

    def _taken(self, address: str, replies: dict[str, Message], silent: tuple[str, ...]) -> Taken:
        count = sum(int(r.get("n", 0)) for r in replies.values())
        if silent or any(int(r.get("n", 0)) == 0 and not r.get("a") for r in replies.values()):
            self.presence.invalidate(address)  # an instance had nobody for it: ask Redis next time
        return Taken(count, any(bool(r.get("a")) for r in replies.values()), silent)

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> tuple[EnqueueResult, Remote]:
        result, found = await self.store.enqueue_routed(msg, limits, watcher=self.presence.instance,
                                                        watch_ttl_ms=WATCH_TTL_MS)
        self.presence.fill(msg.recipient, found)
        return result, self.presence.remote(found)

    async def restore(self, messages: list[QueuedMessage]) -> None:
        _, found = await self.store.restore_routed(messages)
        for recipient, entries in found.items():
            for instance in self.presence.remote(entries).instances:
                self.bus.send(instance, {"k": "pull", "to": recipient})

    async def spend(self, key: str, recipient: str, budget: int) -> bool:
        name = f"{self.store.layout.prefix}{{nq:{key}}}"
        return int(await self.store.link.write(scripts.SPEND, [name], [recipient, budget, BUDGET_WINDOW_MS])) == 1

    async def drain(self, address: str) -> None:
        remote = self.presence.cached(address)  # the sign-in's own presence write filled it
        if remote is not None and remote.instances:
            await self.bus.request(remote.instances, {"k": "drain", "to": address})

    def evict_unverified(self, address: str) -> None:
        self._spawn(self._tell(address, "evict"))

    def key_uploaded(self, address: str) -> None:
        self._spawn(self._tell(address, "key"))

    async def _tell(self, address: str, kind: str) -> None:
        for instance in (await self._where(address)).instances:
            self.bus.send(instance, {"k": kind, "to": address})

    # Incoming

    def handle(self, message: Message) -> None:
        """Apply one message from another instance (the bus logs what raises)."""
        kind, to, here = message.get("k"), message.get("to"), self.here
        if kind == "ping":
            return
        if kind == "inv":
            self.presence.invalidate(str(message.get("a")))
            self.bus.reply(message, {})
            return
        if here is None or not isinstance(to, str):
            return
        if kind in ("offer", "push"):
            taken, ack = here.offered(_unpack(to, message["m"]), stored=bool(message.get("s")))
            if kind == "offer":
                self.bus.reply(message, {"n": taken, "a": 1 if ack else 0})
        elif kind == "frame":
            taken = here.forward_here(dict(message["f"]), to)
            self.bus.reply(message, {"n": taken})
        elif kind == "pull":
            here.catch_up(to)
        elif kind == "drain":
            self._spawn(self._drain(here, message, to))
        elif kind == "evict":
            here.evict_here(to)
        elif kind == "key":
            here.key_uploaded_here(to)

    async def _drain(self, here: Here, message: Message, address: str) -> None:
        try:
            await here.drained(address)
        finally:
            self.bus.reply(message, {"n": 0})

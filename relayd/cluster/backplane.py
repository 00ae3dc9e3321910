"""The seam between the cluster and the server that carries it: inboxes, the presence registry, routed storage.

Everything the cluster needs from a shared server is here, so the cluster's
logic (``bus``, ``presence``, ``peers``) runs unchanged on any backplane:
``RedisBackplane`` (Pub/Sub and Lua, ``redis_backplane``) or
``PostgresBackplane`` (LISTEN/NOTIFY and tables, ``postgres_backplane``).
The composition root picks the one that matches the store.

Every coroutine is bounded in time and raises ``StorageUnavailable`` when the
server cannot answer. Presence entries of an address map an instance to the
kind of its sessions there (``p``: plain, ``a``: one of them acks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..storage.sealing import SealError
from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits

log = logging.getLogger("relayd.cluster")

PresenceEntries = dict[str, str]
"""An address's presence: instance -> ``p`` or ``a``."""


@dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat's outcome, by the server's clock: how long ago this instance's previous heartbeat was (None:
    it was not registered), the live instances, those whose heartbeat lapsed, and long-lapsed ones to forget."""

    age_ms: int | None
    live: tuple[str, ...]
    lapsed: tuple[str, ...]
    dead: tuple[str, ...]


class Seals(Protocol):
    """Sealed values that only the key opens (``relayd.storage.sealing.Sealer``), each bound to where it is kept."""

    def seal(self, fields: list[str], bound_to: str) -> str: ...

    def open(self, value: str, bound_to: str) -> list[str]: ...


class AddressLabels:
    """How the presence registry names the addresses an instance has sessions of. Entries are keyed by the
    address's queue key; with encryption at rest that key is a blind index, and the entry carries the address
    sealed (bound to the key) as its label, so a dump of the registry shows no address while the online list and
    the forgetting of a dead instance can still read it back. Without it the key is the address and the label is
    empty."""

    def __init__(self, seals: Seals | None) -> None:
        self.seals = seals

    def label(self, address: str, key: str) -> str:
        return "" if self.seals is None else self.seals.seal([address], key)

    def read(self, key: str, label: str | None) -> str | None:
        """The address an entry names (None: its label does not open with the configured keys)."""
        if self.seals is None:
            return key
        try:
            [address] = self.seals.open(label or "", key)
        except (SealError, ValueError):
            log.warning("a presence entry's address does not open with the configured key files (an instance with "
                        "other keys, or without encryption at rest?); it is skipped")
            return None
        return address


class RoutedQueues(Protocol):
    """Writes of messages that read the recipient's presence in the same atomic step (the Redis or PostgreSQL
    store's, or ``relayd.storage.sealed.SealedStore``'s over it, which keys the presence by blind index)."""

    def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str = "",
                       watch_ttl_ms: int = 0) -> Awaitable[tuple[EnqueueResult, PresenceEntries]]: ...

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, PresenceEntries]]: ...


class InboxEvents(Protocol):
    """What a subscription reports to its bus."""

    def received(self, data: str) -> None:
        """One published envelope arrived."""
        ...

    def confirmed(self) -> None:
        """The inbox is subscribed: whatever is published from now on arrives."""
        ...


class Backplane(Protocol):
    """The shared server of the instances of one cluster, as the cluster uses it (see the module docstring)."""

    deadline_s: float
    """The longest any one call waits for the server."""

    # Inboxes

    def publish(self, instance: str, data: str) -> asyncio.Future[int]:
        """Send ``data`` to an instance's inbox, in order with this instance's other publishes and writes; the
        future's result is how many subscribers received it (0: none). Raises StorageUnavailable when the link
        is down."""
        ...

    async def listen(self, instance: str, events: InboxEvents) -> None:
        """Subscribe the inbox and report to ``events`` until the subscription ends (return: subscribe again)
        or fails (StorageUnavailable with the reason)."""
        ...

    def on_recovery(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the link to the server recovers from an outage (notices may have been lost)."""
        ...

    async def close(self) -> None:
        """Close what the backplane opened besides the store (after the bus closed)."""
        ...

    # Presence

    def join(self, address: str, instance: str, kind: str,
             watch_ttl_ms: int) -> asyncio.Future[tuple[list[str], PresenceEntries]]:
        """Record the instance's kind of sessions of ``address`` (``''``: none left) and watch the address for it,
        in order with the instance's other writes: (the watchers to tell, the presence afterwards). Raises
        StorageUnavailable when the link is down."""
        ...

    async def lookup(self, address: str, instance: str, watch_ttl_ms: int) -> PresenceEntries:
        """The presence of ``address``; its next change is told to ``instance`` (a watch)."""
        ...

    async def presence_of(self, addresses: list[str]) -> list[PresenceEntries]:
        """The presence of each address, unwatched."""
        ...

    async def registered(self) -> list[str]:
        """Every instance in the registry, live or lapsed."""
        ...

    async def addresses_of(self, instances: list[str]) -> list[str]:
        """The addresses the instances have sessions of."""
        ...

    async def heartbeat(self, instance: str, ttl_ms: int, forget_after_ms: int) -> Beat:
        """Renew the instance's heartbeat and say which instances live."""
        ...

    async def put_counts(self, instance: str, counts: str) -> None:
        """Publish the instance's connection counts (JSON) for operators."""
        ...

    async def counts(self) -> dict[str, str]:
        """Every instance's published counts (JSON)."""
        ...

    async def leave(self, instance: str) -> None:
        """Remove an instance from the registry, and its counts."""
        ...

    def forget(self, instance: str, chunk: int) -> AsyncIterator[tuple[list[str], list[str]]]:
        """Remove a dead instance's presence entries, ``chunk`` addresses at a time, yielding each chunk's
        addresses and the watchers to tell."""
        ...

    # Storage routed by presence, and shared counters

    def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str,
                       watch_ttl_ms: int) -> Awaitable[tuple[EnqueueResult, PresenceEntries]]:
        """Store a message and read its recipient's presence in the same atomic step, watching it for
        ``watcher``: an instance that registers a session after the write reads its backlog after it."""
        ...

    async def restore_routed(self, messages: list[QueuedMessage]) -> dict[str, PresenceEntries]:
        """Put back messages a connection never received; each recipient's presence read atomically with it."""
        ...

    async def spend(self, key: str, recipient: str, budget: int, window_ms: int) -> bool:
        """Record ``recipient`` in the cluster-wide budget ``key`` (a window of ``window_ms`` from its first
        recipient); False when ``budget`` recipients are already in it."""
        ...

"""Several relayd instances on one Redis acting as one relay (``[storage] backend = redis``).

Imported only for the Redis backend (it needs the optional extra ``redis``).
``bus``: each instance's inbox channel (sharded Pub/Sub) and bounded
request/reply; ``presence``: who is online on which instance (a heartbeat with
a TTL, a watched cache); ``peers``: what this instance asks of its peers and
what they ask of it; ``delivery``: the message path with peers (this
instance's senders), ``offers``: peers' messages for sessions here and the
ordering rules, ``refresh``: reading a stored queue again for open sessions;
``receipts`` and ``budgets``: read receipts and new-queue budgets across
instances; ``scripts``: their Lua. ``Cluster`` builds them for the server.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..clock import Clock
from ..config import Config
from ..protocol.delivery import Delivery
from ..protocol.router import Router
from ..protocol.writes import AddressWrites
from ..storage.redis.store import RedisStore
from ..storage.store import QueuedMessage, Store
from .bus import Bus
from .delivery import ClusterDelivery
from .offers import Offers
from .peers import ClusterPeers, RoutedQueues
from .presence import ClusterPresence
from .refresh import Refresh

__all__ = ["Cluster"]


class SealedQueues(Store, RoutedQueues, Protocol):
    """A store that also writes messages with the recipient's presence (the sealing layer over Redis)."""


class _ThisInstance:
    """``peers.ThisInstance``: what peers ask of this instance, answered by the protocol's parts."""

    def __init__(self, router: Router, local: Delivery, offers: Offers, refresh: Refresh) -> None:
        self.router = router
        self.local = local
        self.offers = offers
        self._refresh = refresh

    def offered(self, msg: QueuedMessage, *, stored: bool, after: int, keep: bool,
                origin: str = "", number: int = 0) -> tuple[int, bool] | Awaitable[tuple[int, bool]]:
        return self.offers.offered(msg, stored=stored, after=after, keep=keep, origin=origin, number=number)

    def forward_here(self, frame: dict[str, Any], to: str) -> int:
        return self.local.forward(frame, to)

    def refresh(self, address: str, since: int, seqs: tuple[int, ...]) -> None:
        self._refresh.request(address, since, seqs)

    async def drained(self, address: str) -> None:
        await self.router.backlog.drained(address)

    def evict_here(self, address: str) -> None:
        self.router.evict_here(address)

    def key_uploaded_here(self, address: str) -> None:
        self.router.backlog.key_uploaded(address)


class Cluster:
    """This instance's part of the cluster: its inbox, its presence (``Routes`` and ``Presence``) and its link
    to its peers. ``instance`` is ``[cluster] node_id`` plus a random suffix of this run, so a restarted
    instance never inherits what a dead one left in Redis. With encryption at rest, ``sealed`` is the sealing
    layer over ``store`` (messages are read and written through it) and ``queue_key`` its blind index."""

    def __init__(self, config: Config, store: RedisStore, writes: AddressWrites, clock: Clock, *,
                 sealed: SealedQueues | None = None, queue_key: Callable[[str], str] = str) -> None:
        c = config.cluster
        self.config = config
        self.clock = clock
        self.instance = f"{c.resolved_node_id(config.server.port)}#{secrets.token_hex(4)}"
        self.store = store
        self.messages: Store = sealed if sealed is not None else store
        self.writes = writes
        self.bus = Bus(store.link, store.layout.prefix, self.instance, c.reply_timeout_ms / 1000)
        self.presence = ClusterPresence(store, self.bus, self.instance, writes, clock, heartbeat_s=c.heartbeat_s,
                                        presence_ttl_s=c.presence_ttl_s, queue_key=queue_key)
        self.peers = ClusterPeers(store, self.presence, self.bus, sealed)
        self.refresh: Refresh | None = None

    def delivery(self, local: Delivery) -> ClusterDelivery:
        """The message path with peers, built on this instance's ``local`` one."""
        self.refresh = Refresh(self.presence, self.presence.local.online_addresses, self.messages, self.writes,
                               local.metrics, local.answers, local.remove_delivered)
        return ClusterDelivery(self.config, local, self.peers, self.refresh, self.clock)

    def bind(self, router: Router, local: Delivery) -> None:
        """Connect what peers ask, and the events that may have lost a notice, to this instance's protocol."""
        assert self.refresh is not None, "delivery() first"
        offers = Offers(self.presence, local, self.refresh, local.metrics, self.clock,
                        max_offer_age_ms=self.config.cluster.reply_timeout_ms // 2)
        offers.on_stored = router.backlog.stored
        router.backlog.on_flushed = self.refresh.flushed
        self.peers.bind(_ThisInstance(router, local, offers, self.refresh))
        self.presence.on_lapse = self.refresh.refresh_all
        self.bus.on_subscribed = self.refresh.refresh_all
        self.store.link.health.on_recovery = self.refresh.refresh_all

    async def start(self) -> None:
        """Subscribe the inbox and send the first heartbeat (each bounded; Redis down is retried later)."""
        await self.bus.start(sharded=not self.store.server_version or self.store.server_version >= (7, 0))
        await self.presence.start()

    async def stop(self) -> None:
        """Finish pending notices, leave the registry, close the inbox (the store closes afterwards)."""
        await self.peers.settle()
        if self.refresh is not None:
            await self.refresh.settle()
        await self.presence.stop()
        await self.bus.close()

"""Several relayd instances on one shared server acting as one relay (``[storage] backend = redis``, or
``postgres`` with ``[postgres] cluster = true``).

Imported only for a backend that can carry a cluster. ``backplane``: what the
cluster needs of that server (``redis_backplane``: Redis Pub/Sub and Lua;
``postgres_backplane``: LISTEN/NOTIFY and SQL functions; each imported only
with its optional extra); ``bus``: each instance's inbox and bounded
request/reply; ``presence``: who is online on which instance (a heartbeat with
a TTL, a watched cache); ``peers``: what this instance asks of its peers and
what they ask of it; ``delivery``: the message path with peers (this
instance's senders), ``offers``: peers' messages for sessions here and the
ordering rules, ``refresh``: reading a stored queue again for open sessions;
``receipts`` and ``budgets``: read receipts and new-queue budgets across
instances; ``deadlines``: storing's time limit under one timer; ``scripts``:
their Lua. ``Cluster`` builds them for the server.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..clock import Clock
from ..config import Config
from ..protocol.delivery import Delivery
from ..protocol.router import Router
from ..protocol.writes import AddressWrites
from ..storage.store import Store
from .backplane import Backplane
from .bus import Bus
from .delivery import ClusterDelivery
from .offers import Offers
from .peers import ClusterPeers
from .presence import ClusterPresence
from .refresh import Refresh

__all__ = ["Cluster"]


class _ThisInstance:
    """``peers.ThisInstance``: what peers ask of this instance, answered by the protocol's parts."""

    def __init__(self, router: Router, local: Delivery, offers: Offers, refresh: Refresh) -> None:
        self.router = router
        self.local = local
        self.offered = offers.offered  # ThisInstance.offered: every offer from a peer, with no call in between
        self._refresh = refresh

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
    instance never inherits what a dead one left on the backplane."""

    def __init__(self, config: Config, store: Store, backplane: Backplane, writes: AddressWrites,
                 clock: Clock) -> None:
        c = config.cluster
        self.config = config
        self.clock = clock
        self.instance = f"{c.resolved_node_id(config.server.port)}#{secrets.token_hex(4)}"
        self.store = store
        self.backplane = backplane
        self.writes = writes
        self.bus = Bus(backplane, self.instance, c.reply_timeout_ms / 1000)
        self.presence = ClusterPresence(backplane, self.bus, self.instance, writes, clock, heartbeat_s=c.heartbeat_s,
                                        presence_ttl_s=c.presence_ttl_s)
        self.peers = ClusterPeers(backplane, self.presence, self.bus)
        self.refresh: Refresh | None = None

    def delivery(self, local: Delivery) -> ClusterDelivery:
        """The message path with peers, built on this instance's ``local`` one."""
        self.refresh = Refresh(self.presence, self.presence.local.online_addresses, self.store, self.writes,
                               local.metrics, local.answers, local.remove_delivered)
        return ClusterDelivery(self.config, local, self.peers, self.refresh, self.clock)

    def bind(self, router: Router, local: Delivery) -> None:
        """Connect what peers ask, and the events that may have lost a notice, to this instance's protocol."""
        assert self.refresh is not None, "delivery() first"
        offers = Offers(self.presence, local, self.refresh, local.metrics, self.clock,
                        max_offer_age_ms=self.config.cluster.reply_timeout_ms // 2)
        offers.on_stored = router.backlog.stored
        router.backlog.on_flushed = self.refresh.flushed
        router.backlog.on_unflushed = self.refresh.unflushed
        self.peers.bind(_ThisInstance(router, local, offers, self.refresh))
        self.presence.on_lapse = self.refresh.refresh_all
        self.bus.on_subscribed = self.refresh.refresh_all
        self.backplane.on_recovery(self.refresh.refresh_all)

    async def start(self) -> None:
        """Subscribe the inbox and send the first heartbeat (each bounded; a server down is retried later)."""
        await self.bus.start()
        await self.presence.start()

    async def stop(self) -> None:
        """Finish pending notices, leave the registry, close the inbox (the store closes afterwards)."""
        await self.peers.settle()
        if self.refresh is not None:
            await self.refresh.settle()
        await self.presence.stop()
        await self.bus.close()
        await self.backplane.close()

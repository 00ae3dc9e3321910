"""Several relayd instances on one Redis acting as one relay (``[storage] backend = redis``).

Imported only for the Redis backend (it needs the ``relayd[redis]`` extra).
``bus``: each instance's inbox channel (sharded Pub/Sub) and bounded
request/reply; ``presence``: who is online on which instance (a heartbeat with
a TTL, a watched cache); ``routes``: what the protocol asks of the other
instances (``presence.Elsewhere``) and what they ask of this one;
``scripts``: their Lua. ``Cluster`` builds the three for the server.
"""

from __future__ import annotations

import secrets

from ..config import Config
from ..storage.redis.store import RedisStore
from ..protocol.writes import AddressWrites
from .bus import Bus
from .presence import ClusterPresence
from .peers import ClusterRoutes, Here

__all__ = ["Cluster"]


class Cluster:
    """This instance's part of the cluster: its inbox, its presence (``Routes`` and ``Presence``) and its
    routes to the others (``Elsewhere``). ``instance`` is ``[cluster] node_id`` plus a random suffix of this
    run, so a restarted instance never inherits what a dead one left in Redis."""

    def __init__(self, config: Config, store: RedisStore, writes: AddressWrites) -> None:
        c = config.cluster
        self.instance = f"{c.resolved_node_id(config.server.port)}#{secrets.token_hex(4)}"
        self.store = store
        self.bus = Bus(store.link, store.layout.prefix, self.instance, c.reply_timeout_ms / 1000)
        self.presence = ClusterPresence(store, self.bus, self.instance, writes, heartbeat_s=c.heartbeat_s,
                                        presence_ttl_s=c.presence_ttl_s)
        self.routes = ClusterRoutes(store, self.presence, self.bus)

    def bind(self, here: Here) -> None:
        """Connect incoming messages to this instance's protocol."""
        self.routes.bind(here)
        self.presence.on_lapse = here.catch_up

    async def start(self) -> None:
        """Subscribe the inbox and send the first heartbeat (each bounded; Redis down is retried later)."""
        await self.bus.start(sharded=not self.store.server_version or self.store.server_version >= (7, 0))
        await self.presence.start()

    async def stop(self) -> None:
        """Finish pending notices, leave the registry, close the inbox (the store closes afterwards)."""
        await self.routes.settle()
        await self.presence.stop()
        await self.bus.close()

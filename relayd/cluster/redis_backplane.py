"""The cluster's ``Backplane`` on Redis: inboxes on (sharded) Pub/Sub, presence and budgets in Lua scripts.

Each instance's inbox is the channel ``PREFIX{INSTANCE}:inbox``. On Redis 7
and later these are shard channels (``SSUBSCRIBE``/``SPUBLISH``): on a
Cluster a message travels to the one shard that owns the inbox's slot instead
of being broadcast to every node; older servers get plain
``SUBSCRIBE``/``PUBLISH``. Publishes go through the store's ordered write
queue (``RedisLink``), so one instance's messages to another arrive in the
order they were sent and share round trips with its writes. The inbox is read
on a redis-py connection of its own, reply by reply, without a read timeout:
the bus's own heartbeat through the inbox notices a connection gone quiet
(redis-py's PubSub wrapper cost a few µs per envelope, with two envelopes per
message across instances).

Redis holds, per address, which instances have sessions of it
(``{address}:on``: instance -> kind) and who watches it, plus, per hash slot,
each instance's addresses (a HASH from the address's queue key to its label,
``AddressLabels``: so a dead instance's entries can be found), and a registry
of heartbeats (a ZSET scored by the Redis clock). With encryption at rest the
keys are blind indexes and the labels sealed addresses: no address in clear.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

from ..storage.redis.layout import slot_tag
from ..storage.redis.reasons import describe
from ..storage.redis.store import RedisStore
from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits, StorageUnavailable
from . import scripts
from .backplane import AddressLabels, Beat, InboxEvents, PresenceEntries, RoutedQueues, Seals

log = logging.getLogger("relayd.cluster")

SLOT_BATCH = 500


def entries(flat: Sequence[Any]) -> PresenceEntries:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class RedisBackplane:
    """``Backplane`` on the store's Redis (see the module docstring). With encryption at rest, ``sealed`` is the
    sealing layer over ``store`` (messages are written through it), ``queue_key`` its blind index and ``seals``
    its sealer: an address's presence shares its queue's hash tag, and neither the presence registry nor the
    shared budgets name an address in clear."""

    def __init__(self, store: RedisStore, *, sealed: RoutedQueues | None = None,
                 queue_key: Callable[[str], str] = str, seals: Seals | None = None) -> None:
        self.store = store
        self.queues: RoutedQueues = sealed if sealed is not None else store
        self.queue_key = queue_key
        self.labels = AddressLabels(seals)
        self.link = store.link
        self.layout = store.layout
        self.deadline_s = store.link.deadline_s
        self.registry = f"{self.layout.prefix}cluster:nodes"
        self.counts_key = f"{self.layout.prefix}cluster:counts"
        """HASH instance -> its connection counts (JSON), written with each heartbeat, for operators."""
        self._sharded: bool | None = None

    @property
    def sharded(self) -> bool:
        """Shard channels, unless the server is older than Redis 7 (known once the store opened)."""
        if self._sharded is None:
            version = self.store.server_version
            self._sharded = not version or version >= (7, 0)
        return self._sharded

    def inbox(self, instance: str) -> str:
        return f"{self.layout.prefix}{{{instance}}}:inbox"

    def _keys(self, queue: str, instance: str) -> tuple[str, str, str]:
        """(presence HASH, watchers SET, the instance's HASH of addresses in that slot), in the slot of the
        address's queue ``queue`` (its queue key)."""
        keys = self.layout.recipient(queue)
        return keys.presence, keys.watchers, self._mine(self.layout.slot_of(queue), instance)

    def _mine(self, slot: int, instance: str) -> str:
        return f"{self.layout.prefix}{{{slot_tag(slot)}}}:on:{instance}"

    # Inboxes

    def publish(self, instance: str, data: str) -> asyncio.Future[int]:
        channel = self.inbox(instance)
        sent: asyncio.Future[int] = self.link.post_command("SPUBLISH" if self.sharded else "PUBLISH", channel,
                                                           data, key=channel)
        return sent

    async def listen(self, instance: str, events: InboxEvents) -> None:
        """Subscribe on a connection of its own and read until it fails or the inbox's slot moves."""
        channel = self.inbox(instance)
        while True:
            client: Redis[str] | None = None
            conn: AbstractConnection | None = None
            try:
                client = await self._subscriber(channel)
                conn = client.connection_pool.make_connection()
                async with asyncio.timeout(self.deadline_s):
                    await conn.connect()
                    await conn.send_command("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", channel)
                while True:
                    reply: Any = await conn.read_response()  # no timeout: the bus's heartbeat notices silence
                    kind = reply[0] if isinstance(reply, list) and len(reply) == 3 else None
                    if kind in ("message", "smessage"):
                        events.received(reply[2])
                    elif kind in ("subscribe", "ssubscribe"):
                        events.confirmed()
                    elif kind in ("sunsubscribe", "unsubscribe"):  # the slot moved: subscribe again
                        return
            except rx.ResponseError as exc:
                if self.sharded and "unknown command" in str(exc).lower():
                    log.warning("Redis has no sharded Pub/Sub (Redis 7): the cluster uses plain Pub/Sub")
                    self._sharded = False
                    continue
                raise StorageUnavailable(describe(exc)) from exc
            except (rx.RedisError, OSError, TimeoutError) as exc:
                raise StorageUnavailable(describe(exc)) from exc
            finally:
                await _close_quietly(conn, client, self.deadline_s)

    async def _subscriber(self, channel: str) -> Redis[str]:
        """A client of its own to the server, or to the Cluster node that owns the inbox's slot."""
        url = None
        client = self.link.client
        if isinstance(client, RedisCluster):
            async def initialize(_: Any) -> None:
                await client.initialize()
            await self.link.read(initialize)
            node = client.get_node_from_key(channel)
            if node is None:
                raise StorageUnavailable("the Redis Cluster has no node for the inbox's slot")
            parts = urllib.parse.urlsplit(self.link.url)
            auth = parts.netloc.rpartition("@")[0]
            host = f"[{node.host}]" if ":" in node.host else node.host
            url = urllib.parse.urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}{host}:{node.port}"))
        return self.link.subscriber(url)

    def on_recovery(self, callback: Callable[[], None]) -> None:
        self.link.health.on_recovery = callback

    async def close(self) -> None:
        """Nothing of its own: publishes use the store's link, which the store closes."""

    # Presence

    def join(self, address: str, instance: str, kind: str,
             watch_ttl_ms: int) -> asyncio.Future[tuple[list[str], PresenceEntries]]:
        queue = self.queue_key(address)
        self.store.note_slot(self.layout.slot_of(queue))
        label = self.labels.label(address, queue) if kind else ""
        posted = self.link.post(scripts.JOIN, self._keys(queue, instance), [queue, instance, kind, watch_ttl_ms, label])
        return asyncio.ensure_future(_joined(posted))

    async def lookup(self, address: str, instance: str, watch_ttl_ms: int) -> PresenceEntries:
        presence, watchers = self._keys(self.queue_key(address), instance)[:2]
        return entries(await self.link.write(scripts.LOOKUP, [presence, watchers], [instance, watch_ttl_ms]))

    async def presence_of(self, addresses: list[str]) -> list[PresenceEntries]:
        async def work(client: Any) -> list[Any]:
            pipe = self.store.pipeline(client)
            for address in addresses:
                pipe.hgetall(self.layout.recipient(self.queue_key(address)).presence)
            return list(await pipe.execute())
        return [dict(found or {}) for found in await self.link.read(work)]

    async def registered(self) -> list[str]:
        return list(await self.link.read(lambda c: c.zrange(self.registry, 0, -1)))

    async def addresses_of(self, instances: list[str]) -> list[str]:
        out: set[str | None] = set()
        pairs = [(s, i) for s in await self.store.slots() for i in instances]
        for start in range(0, len(pairs), SLOT_BATCH):
            part = pairs[start:start + SLOT_BATCH]

            async def work(client: Any, part: list[tuple[int, str]] = part) -> list[Any]:
                pipe = self.store.pipeline(client)
                for slot, instance in part:
                    pipe.hgetall(self._mine(slot, instance))
                return list(await pipe.execute())
            for members in await self.link.read(work):
                out.update(self.labels.read(k, label) for k, label in members.items())
        return sorted(a for a in out if a is not None)

    async def heartbeat(self, instance: str, ttl_ms: int, forget_after_ms: int) -> Beat:
        age, live, lapsed, dead = await self.link.write(scripts.HEARTBEAT, [self.registry],
                                                        [instance, ttl_ms, forget_after_ms])
        return Beat(None if age == "" else int(age), tuple(live), tuple(lapsed), tuple(dead))

    async def put_counts(self, instance: str, counts: str) -> None:
        await self.link.command("HSET", self.counts_key, instance, counts, key=self.counts_key)

    async def counts(self) -> dict[str, str]:
        return dict(await self.link.read(lambda c: c.hgetall(self.counts_key)))

    async def leave(self, instance: str) -> None:
        await self.link.write(scripts.LEAVE_REGISTRY, [self.registry], [instance])
        await self.link.command("HDEL", self.counts_key, instance, key=self.counts_key)

    async def forget(self, instance: str, chunk: int) -> AsyncIterator[tuple[list[str], list[str]]]:
        for slot in await self.store.slots():
            mine = self._mine(slot, instance)
            members = sorted((await self.link.read(lambda c: c.hgetall(mine))).items())
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                keys = [mine]
                for queue, _ in part:
                    keys += self._keys(queue, instance)[:2]
                watchers = set(await self.link.write(scripts.FORGET, keys, [instance, *(q for q, _ in part)]))
                addresses = (self.labels.read(queue, label) for queue, label in part)
                yield [a for a in addresses if a is not None], sorted(watchers)

    # Storage routed by presence, and shared counters

    def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str,
                       watch_ttl_ms: int) -> Awaitable[tuple[EnqueueResult, PresenceEntries]]:
        return self.queues.enqueue_routed(msg, limits, watcher=watcher, watch_ttl_ms=watch_ttl_ms)

    async def restore_routed(self, messages: list[QueuedMessage]) -> dict[str, PresenceEntries]:
        _, found = await self.queues.restore_routed(messages)
        return found

    async def spend(self, key: str, recipient: str, budget: int, window_ms: int) -> bool:
        blind = self.queue_key  # no address in clear in a budget either (with encryption at rest)
        name = f"{self.layout.prefix}{{nq:{blind(key)}}}"
        return int(await self.link.write(scripts.SPEND, [name], [blind(recipient), budget, window_ms])) == 1


async def _joined(posted: asyncio.Future[Any]) -> tuple[list[str], PresenceEntries]:
    watchers, found = await posted
    return [str(w) for w in watchers], entries(found)


async def _close_quietly(conn: AbstractConnection | None, client: Redis[str] | None, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            if conn is not None:
                await conn.disconnect()
            if client is not None:
                await client.aclose(close_connection_pool=True)  # type: ignore[attr-defined]
    except (rx.RedisError, OSError, TimeoutError):
        pass

"""The Redis backend: the ``Store`` contract on a single Redis or a Redis Cluster.

Several relayd instances may share one Redis: every change that spans keys is
one Lua script on one address's hash slot (see ``layout`` and ``scripts``), so
queue caps, idempotency and counters hold for the whole cluster. An awaited
write has been acknowledged by Redis (and, as configured, by ``min_replicas``
replicas and the AOF fsync: see ``lifecycle``); one sent but not answered
within ``socket_timeout_s`` is ``StorageOutcomeUnknown``. Writes go out in the
order they were made (``write_queue``), so one connection's messages keep
their order although many share a round trip.

Totals (``total()``, ``stored_bytes()``) are kept per hash slot: exact for this
instance's own writes (each script returns its slot's new totals) and for the
others' as of the last refresh (every ``refresh_interval_s``). The storage
budget (``max_total_bytes``) is checked against that sum, so on a cluster of
instances it may be overshot by what the others stored since the last refresh.

``RedisStore`` is a facade: its parts (``messages``, ``receipts``, ``keys``,
``retention``, ``lifecycle``) each hold the shared ``core`` (link, layout,
slot bookkeeping) and do the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from ..store import EnqueueResult, HistoryPage, KeyRecord, PushSubscription, QueuedMessage, QueueLimits, Receipt
from . import records, scripts
from .connection import Commands, RedisLink
from .core import Pipe, StoreCore
from .history import RedisHistory
from .keys import RedisKeys
from .push import RedisPush
from .layout import Layout
from .lifecycle import Durability, RedisLifecycle
from .messages import RedisMessages
from .receipts import RedisReceipts
from .records import PresenceEntries
from .retention import RedisRetention

EXPIRE_CHUNK = 1000      # messages (and receipts, delivered records, tokens) one expiry script removes at most


class RedisStore:
    """A ``Store`` in Redis; see the module docstring."""

    name = "redis"

    def __init__(self, url: str, *, key_prefix: str = "relayd:", cluster: bool = False, node_id: str = "relayd",
                 socket_timeout_s: float = 2.0, min_replicas: int = 0, wait_timeout_ms: int = 500,
                 probe_interval_s: float = 1.0, refresh_interval_s: float = 5.0,
                 expire_chunk: int = EXPIRE_CHUNK) -> None:
        self.layout = Layout(key_prefix)
        self.link = RedisLink(url, cluster=cluster, socket_timeout_s=socket_timeout_s,
                              min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
        self.core = StoreCore(self.link, self.layout)
        self.messages = RedisMessages(self.core)
        self.receipt_store = RedisReceipts(self.core)
        self.keys = RedisKeys(self.core)
        self.push = RedisPush(self.core)
        self.retention = RedisRetention(self.core, expire_chunk)
        self.kept = RedisHistory(self.core)
        self._history_ms = 0
        self.lifecycle = RedisLifecycle(self.core, node_id=node_id, probe_interval_s=probe_interval_s,
                                        refresh_interval_s=refresh_interval_s)

    # For relayd.cluster

    @property
    def server_version(self) -> tuple[int, ...]:
        """The oldest primary's (major, minor); () until the server was reached."""
        return self.lifecycle.server_version

    @property
    def durability(self) -> Durability | None:
        """What ``queued`` means on this Redis (read at open)."""
        return self.lifecycle.durability

    @property
    def maxmemory(self) -> int | None:
        """Redis's ``maxmemory`` (the smallest primary's; 0: none), or None until the server was reached: what
        the automatic storage budget is derived from."""
        return self.lifecycle.durability.maxmemory if self.lifecycle.durability else None

    def pipeline(self, client: Commands) -> Pipe:
        return self.core.pipeline(client)

    def note_slot(self, slot: int) -> asyncio.Future[Any] | None:
        return self.core.note_slot(slot)

    async def slots(self) -> list[int]:
        return await self.core.slots()

    def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str = "",
                       watch_ttl_ms: int = 0) -> Awaitable[tuple[EnqueueResult, PresenceEntries]]:
        """``enqueue``, and the recipient's presence read in the same atomic step.

        An instance that registers a session for the recipient after this
        write reads its backlog after it; one registered before is in the
        returned presence: either way the message reaches that session.
        ``watcher`` (an instance of ``relayd.cluster``) is told when that
        presence next changes, for ``watch_ttl_ms``.
        """
        return self.messages.enqueue_routed(msg, limits, watcher, watch_ttl_ms)

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, PresenceEntries]]:
        """``restore``, and each recipient's presence read in the same atomic step (see ``enqueue_routed``)."""
        return await self.messages.restore(messages)

    # Lifecycle and health

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def problem(self) -> str | None:
        return self.link.problem

    async def open(self) -> None:
        await self.lifecycle.open()

    async def close(self) -> None:
        await self.lifecycle.close()

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        return (await self.enqueue_routed(msg, limits))[0]

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        return await self.messages.enqueue_many(messages, limits)

    async def restore(self, messages: list[QueuedMessage]) -> int:
        return (await self.messages.restore(messages))[0]

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        return await self.messages.pending(recipient, limit, after_seq, max_bytes)

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return await self.messages.remove(recipient, "seq", [str(s) for s in dict.fromkeys(seqs)],
                                          self._keep_until())

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        return await self.messages.remove(recipient, "id", list(dict.fromkeys(message_ids)), self._keep_until())

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        await self.messages.record_delivered(messages, self._keep_until())

    async def clear(self, recipient: str) -> int:
        return await self.messages.remove(recipient, "all", [])

    async def size(self, recipient: str) -> int:
        return await self.messages.size(recipient)

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        return await self.messages.backlog_size(recipient)

    def total(self) -> int:
        """Queued messages in all queues: exact for this instance's writes, refreshed from Redis every
        ``refresh_interval_s`` for the others', so /health never waits on Redis."""
        return max(self.core.totals.messages, 0)

    def stored_bytes(self) -> int:
        """Content bytes in all queues, kept like ``total()``, and what receipts, keys and push subscriptions
        count (from the statistics read every ``refresh_interval_s``, plus this instance's writes since)."""
        return max(self.core.totals.bytes + self.core.other_bytes, 0)

    async def stats(self) -> dict[str, int]:
        return await self.core.stats()

    async def expire(self, before_ms: int) -> int:
        return await self.retention.expire(before_ms)

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        return await self.retention.shift_times(before_ms, delta_ms)

    # Receipts

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        return await self.receipt_store.add_receipts(receipts, max_per_recipient)

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        return await self.receipt_store.receipts(recipient, limit)

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        return await self.receipt_store.remove_receipts(recipient, seqs)

    # History

    def keep_history(self, ms: int) -> None:
        self._history_ms = ms

    def _keep_until(self) -> int:
        return records.now_ms() + self._history_ms if self._history_ms else 0

    async def history(self, recipient: str, limit: int, before_ms: int | None = None,
                      sender: str | None = None) -> HistoryPage:
        return await self.kept.page(recipient, limit, before_ms, sender)

    async def delete_history(self, recipient: str, message_ids: list[str] | None) -> int:
        return await self.kept.delete(recipient, message_ids)

    async def expire_history(self, now_ms: int) -> int:
        return await self.kept.expire(now_ms)

    async def copy_history(self, kept: list[tuple[QueuedMessage, int]]) -> int:
        """``relayd migrate``: keep these messages, each until its time (ms), unless kept already; how many
        were new."""
        return await self.kept.copy(kept)

    async def queue_keys(self) -> list[str]:
        """The members of every slot's expiry indexes (they list each address with messages, receipts or kept
        history)."""
        found: dict[str, None] = {}
        for slot in await self.core.slots():
            for index in (self.layout.slot_keys(slot)[0], self.layout.history_expiry(slot)):

                async def work(client: Commands, key: str = index) -> list[Any]:
                    return list(await client.zrange(key, 0, -1))
                found.update(dict.fromkeys(m if isinstance(m, str) else m.decode()
                                           for m in await self.link.read(work)))
        return list(found)

    # Keys, locks, tokens

    async def get_key(self, address: str) -> KeyRecord | None:
        return await self.keys.get_key(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        return await self.keys.get_keys(addresses)

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        return await self.keys.put_key(record)

    async def delete_key(self, address: str) -> bool:
        return await self.keys.delete_key(address)

    async def drop_unsigned_key(self, address: str) -> bool:
        return await self.keys.drop_unsigned_key(address)

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        return await self.keys.expire_keys(before_ms, now_ms)

    async def key_floor(self, address: str) -> int | None:
        return await self.keys.key_floor(address)

    async def key_count(self) -> int:
        return await self.keys.key_count()

    async def is_locked(self, address: str) -> bool:
        return await self.keys.is_locked(address)

    async def lock(self, address: str) -> None:
        await self.keys.lock(address)

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        await self.keys.save_token(token_hash, address, expires_at_ms, max_per_address)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        return await self.keys.token_address(token_hash, now_ms)

    async def put_push_subscription(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        return await self.push.put(sub, max_per_address)

    async def push_subscriptions(self, address: str, now_ms: int) -> list[PushSubscription]:
        return await self.push.of(address, now_ms)

    async def delete_push_subscription(self, address: str, sub_id: str) -> bool:
        return await self.push.delete(address, sub_id)

    async def extend_push_subscriptions(self, address: str, expires_at_ms: int) -> None:
        await self.push.extend(address, expires_at_ms)

    async def expire_push_subscriptions(self, now_ms: int) -> int:
        return await self.push.expire(now_ms)

    # Migration (``relayd migrate``): each copy is remembered for ``ledger_ttl_ms``, so a re-run copies
    # nothing twice, not even what was delivered and deleted since.

    async def migrate_message(self, msg: QueuedMessage, ledger_ttl_ms: int) -> str:
        """Returns queued, duplicate, delivered, full or migrated (copied by an earlier run)."""
        roomy = QueueLimits(max_messages=1 << 62, max_bytes=1 << 62, drop_oldest=False)
        outcome, _ = await self.messages.enqueue(msg, roomy, f"m\n{msg.sender.lower()}\n{msg.message_id}",
                                                 ledger_ttl_ms)
        return outcome

    async def migrate_receipt(self, receipt: Receipt, source_seq: int, ledger_ttl_ms: int) -> bool:
        """True when copied, False when an earlier run did."""
        member = f"r\n{receipt.reader}\n{receipt.message_id}\n{receipt.timestamp}\n{source_seq}"
        return await self.receipt_store.write_receipts(receipt.recipient, [receipt], 1 << 62, member,
                                                       ledger_ttl_ms) >= 0

    async def migrate_key(self, record: KeyRecord, ledger_ttl_ms: int) -> str:
        """Returns stored, migrated (copied by an earlier run) or newer (Redis holds a newer key)."""
        return await self.keys.write_key(record, "migrate", f"k\n{record.updated_at}", ledger_ttl_ms)

    async def migrate_floor(self, address: str, issued_at: int) -> None:
        """Raise the key floor of ``address`` (floors outlive deleted keys)."""
        await self.link.write(scripts.RAISE_FLOOR, [self.layout.key(address)[3]], [issued_at])

"""The Redis backend: the ``Store`` contract on a single Redis or a Redis Cluster.

Several relayd instances may share one Redis: every change that spans keys is
one Lua script on one address's hash slot (see ``layout`` and ``scripts``), so
queue caps, idempotency and counters hold for the whole cluster. An awaited
write has been acknowledged by Redis (and by ``min_replicas`` replicas when
configured). Writes go out in the order they were made (``RedisLink``), so one
connection's messages keep their order although many share a round trip.

Totals (``total()``, ``stored_bytes()``) are kept per hash slot: exact for this
instance's own writes (each script returns its slot's new totals) and for the
others' as of the last refresh (every ``refresh_interval_s``). The storage
budget (``max_total_bytes``) is checked against that sum, so on a cluster of
instances it may be overshot by what the others stored since the last refresh.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ...frames import utf8_len
from ..store import (
    EnqueueResult,
    KeyRecord,
    QueuedMessage,
    QueueLimits,
    Receipt,
)
from . import scripts
from .connection import RedisLink
from .keys import RedisKeys
from .layout import Layout
from .lifecycle import RedisLifecycle
from .receipts import RedisReceipts
from .records import (
    Presence,
    SlotTotals,
    by_recipient,
    chunks,
    decode_message,
    encode_message,
    pairs,
)
from .retention import RedisRetention

log = logging.getLogger("relayd.storage")

EXPIRE_CHUNK = 1000      # messages (and receipts, tokens) one expiry script removes at most
ID_CHUNK = 1000          # seqs or messageIds per removal script
RESTORE_CHUNK = 200      # messages per restore script
SLOT_BATCH = 500         # per-slot keys read in one pipeline
DROP_CHUNK = 64
PENDING_CHUNK = 16       # messages read at a time for a page bounded in bytes
STAT_FIELDS = ("recipients", "messages", "bytes", "receipts", "keys")
_RESULTS = {"queued": EnqueueResult.QUEUED, "duplicate": EnqueueResult.DUPLICATE, "full": EnqueueResult.FULL,
            "no_space": EnqueueResult.NO_SPACE}


class RedisStore(RedisLifecycle, RedisKeys, RedisReceipts, RedisRetention):
    """A ``Store`` in Redis; see the module docstring."""

    name = "redis"

    def __init__(self, url: str, *, key_prefix: str = "relayd:", cluster: bool = False, node_id: str = "relayd",
                 socket_timeout_s: float = 2.0, min_replicas: int = 0, wait_timeout_ms: int = 500,
                 probe_interval_s: float = 1.0, refresh_interval_s: float = 5.0,
                 expire_chunk: int = EXPIRE_CHUNK) -> None:
        self.layout = Layout(key_prefix)
        self.link = RedisLink(url, cluster=cluster, socket_timeout_s=socket_timeout_s,
                              min_replicas=min_replicas, wait_timeout_ms=wait_timeout_ms)
        self.node_id = node_id
        self.probe_interval_s = probe_interval_s
        self.refresh_interval_s = refresh_interval_s
        self.expire_chunk = expire_chunk
        self.server_version: tuple[int, ...] = ()
        self._known_slots: set[int] = set()
        self._totals = SlotTotals()
        self.link.on_failure = self._forget_assumptions
        self._prober: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def problem(self) -> str | None:
        return self.link.problem

    def _forget_assumptions(self) -> None:
        self._known_slots.clear()
        self._totals.trust_next_read = True

    # Helpers

    def pipeline(self, client: Any) -> Any:
        """A non-transactional pipeline; a Cluster's splits itself per node."""
        return client.pipeline() if self.link.cluster else client.pipeline(transaction=False)

    def note_slot(self, slot: int) -> asyncio.Future[Any] | None:
        """Record a slot in the set expiry, statistics and the cluster's presence walk (once per process, and
        again after a failure): queued, not awaited, so it shares the round trip of the write that follows."""
        if slot in self._known_slots:
            return None
        self._known_slots.add(slot)
        noted = self.link.post(scripts.ADD_SLOTS, [self.layout.slots], [slot])
        noted.add_done_callback(lambda f: (f.cancelled() or f.exception()) and self._known_slots.discard(slot))
        return noted

    async def slots(self) -> list[int]:
        """The hash slots that hold relayd data (noted by ``note_slot``). Raises StorageUnavailable."""
        members = await self.link.read(lambda c: c.smembers(self.layout.slots))
        return sorted(int(m) for m in members)

    async def recipient_write(self, script: scripts.Script, address: str, *args: Any) -> Any:
        """Run ``script`` on ``address``'s keys (one hash slot), in write order."""
        return await self.link.write(script, self.layout.recipient(address).all(), [address, *args])

    def apply_totals(self, address: str, totals: Sequence[Any]) -> None:
        """Take the totals a script returned for ``address``'s slot."""
        self._totals.apply(self.layout.slot_of(address), totals)

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        return (await self.enqueue_routed(msg, limits))[0]

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        outcomes = await asyncio.gather(*(self._enqueue(msg, limits, "", 0) for msg in messages))
        return [_RESULTS[outcome] for outcome, _ in outcomes]

    async def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str = "",
                             watch_ttl_ms: int = 0) -> tuple[EnqueueResult, Presence]:
        """``enqueue``, and the recipient's presence read in the same atomic step.

        An instance that registers a session for the recipient after this
        write reads its backlog after it; one registered before is in the
        returned presence: either way the message reaches that session.
        ``watcher`` (an instance of ``relayd.cluster``) is told when that
        presence next changes, for ``watch_ttl_ms``.
        """
        outcome, presence = await self._enqueue(msg, limits, "", 0, watcher, watch_ttl_ms)
        return _RESULTS[outcome], presence

    async def _enqueue(self, msg: QueuedMessage, limits: QueueLimits, ledger: str, ledger_ttl_ms: int,
                       watcher: str = "", watch_ttl_ms: int = 0) -> tuple[str, Presence]:
        size = utf8_len(msg.content)
        over = bool(limits.max_total_bytes) and self._totals.bytes + size > limits.max_total_bytes
        self.note_slot(self.layout.slot_of(msg.recipient))
        outcome, seq, _dropped, totals, presence = await self.recipient_write(
            scripts.ENQUEUE, msg.recipient, msg.sender, msg.message_id, encode_message(msg, size), size,
            msg.queued_at, limits.max_messages, limits.max_bytes, 1 if limits.drop_oldest else 0, DROP_CHUNK,
            1 if over else 0, ledger, ledger_ttl_ms, watcher, watch_ttl_ms)
        if outcome == "queued":
            msg.seq = int(seq)
            self.apply_totals(msg.recipient, totals)
        return outcome, pairs(presence)

    async def restore(self, messages: list[QueuedMessage]) -> int:
        return (await self.restore_routed(messages))[0]

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, Presence]]:
        """``restore``, and each recipient's presence read in the same atomic step (see ``enqueue_routed``)."""
        restored = 0
        presence: dict[str, Presence] = {}
        for recipient, group in by_recipient(messages, lambda m: m.recipient).items():
            self.note_slot(self.layout.slot_of(recipient))
            for part in chunks(group, RESTORE_CHUNK):
                args: list[Any] = []
                for m in part:
                    size = utf8_len(m.content)
                    args += [max(m.seq, 0), m.sender, m.message_id, size, m.queued_at, encode_message(m, size)]
                count, seqs, totals, found = await self.recipient_write(scripts.RESTORE, recipient, *args)
                for m, seq in zip(part, seqs):
                    if seq != "0":
                        m.seq = int(seq)
                self.apply_totals(recipient, totals)
                restored += int(count)
                presence[recipient] = pairs(found)
        return restored, presence

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        keys = self.layout.recipient(recipient)

        async def work(client: Any) -> list[QueuedMessage]:
            seqs = await client.zrangebyscore(keys.queue, f"({after_seq}", "+inf", start=0, num=limit)
            page: list[QueuedMessage] = []
            used = 0
            # Records are fetched a few at a time, so a page of large messages never holds more than max_bytes
            # and one message.
            for part in chunks(seqs, PENDING_CHUNK if max_bytes is not None else max(len(seqs), 1)):
                for seq, record in zip(part, await client.hmget(keys.messages, part)):
                    if record is None:
                        continue
                    if max_bytes is not None and page and used >= max_bytes:
                        return page
                    msg = decode_message(recipient, seq, record)
                    page.append(msg)
                    used += utf8_len(msg.content)
            return page
        return await self.link.read(work)

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        return None  # placeholder until the storage branches land

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return await self._remove(recipient, "seq", [str(s) for s in dict.fromkeys(seqs)])

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        return await self._remove(recipient, "id", list(dict.fromkeys(message_ids)))

    async def clear(self, recipient: str) -> int:
        return await self._remove(recipient, "all", [None])

    async def _remove(self, recipient: str, mode: str, items: list[Any]) -> int:
        removed = 0
        for part in chunks(items, ID_CHUNK):
            args = [] if mode == "all" else list(part)
            count, totals = await self.recipient_write(scripts.REMOVE, recipient, mode, *args)
            self.apply_totals(recipient, totals)
            removed += int(count)
        return removed

    async def size(self, recipient: str) -> int:
        count = await self.link.read(lambda c: c.hget(self.layout.recipient(recipient).counters, "count"))
        return int(count or 0)

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        keys = self.layout.recipient(recipient)

        async def work(client: Any) -> tuple[int, int]:
            pipe = self.pipeline(client)
            pipe.hget(keys.counters, "count")
            pipe.zcard(keys.receipt_queue)
            count, receipts = await pipe.execute()
            return int(count or 0), int(receipts or 0)
        return await self.link.read(work)

    def total(self) -> int:
        """Queued messages in all queues: exact for this instance's writes, refreshed from Redis every
        ``refresh_interval_s`` for the others', so /health never waits on Redis."""
        return max(self._totals.messages, 0)

    def stored_bytes(self) -> int:
        """Content bytes in all queues, kept like ``total()``."""
        return max(self._totals.bytes, 0)

    async def stats(self) -> dict[str, int]:
        sums = dict.fromkeys(STAT_FIELDS, 0)
        force, self._totals.trust_next_read = self._totals.trust_next_read, False
        slots = await self.slots()
        for part in chunks(slots, SLOT_BATCH):
            async def work(client: Any, part: Sequence[int] = part) -> list[Any]:
                pipe = self.pipeline(client)
                for slot in part:
                    pipe.hmget(self.layout.slot_keys(slot)[1], [*STAT_FIELDS, "ver"])
                return await pipe.execute()
            for slot, row in zip(part, await self.link.read(work)):
                for name, value in zip(STAT_FIELDS, row):
                    sums[name] += int(value or 0)
                self._totals.apply(slot, (row[1], row[2], row[5]), force=force)
        return sums

    # Migration (``relayd migrate``): each copy is remembered for ``ledger_ttl_ms``, so a re-run copies
    # nothing twice, not even what was delivered and deleted since.

    async def migrate_message(self, msg: QueuedMessage, ledger_ttl_ms: int) -> str:
        """Returns queued, duplicate, full or migrated (copied by an earlier run)."""
        roomy = QueueLimits(max_messages=1 << 62, max_bytes=1 << 62, drop_oldest=False)
        outcome, _ = await self._enqueue(msg, roomy, f"m\n{msg.sender.lower()}\n{msg.message_id}", ledger_ttl_ms)
        return outcome

    async def migrate_receipt(self, receipt: Receipt, source_seq: int, ledger_ttl_ms: int) -> bool:
        """True when copied, False when an earlier run did."""
        member = f"r\n{receipt.reader}\n{receipt.message_id}\n{receipt.timestamp}\n{source_seq}"
        return await self.write_receipts(receipt.recipient, [receipt], 1 << 62, member, ledger_ttl_ms) >= 0

    async def migrate_key(self, record: KeyRecord, ledger_ttl_ms: int) -> str:
        """Returns stored, migrated (copied by an earlier run) or newer (Redis holds a newer key)."""
        return await self._put_key(record, "migrate", f"k\n{record.updated_at}", ledger_ttl_ms)

    async def migrate_floor(self, address: str, issued_at: int) -> None:
        """Raise the key floor of ``address`` (floors outlive deleted keys)."""
        await self.link.write(scripts.RAISE_FLOOR, [self.layout.key(address)[3]], [issued_at])

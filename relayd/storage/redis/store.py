"""The Redis backend: the ``Store`` contract on a single Redis or a Redis Cluster.

Several relayd instances may share one Redis: every change that spans keys is
one Lua script on one address's hash slot (see ``layout`` and ``scripts``), so
queue caps, idempotency and counters hold for the whole cluster. An awaited
write has been acknowledged by Redis (and by ``min_replicas`` replicas when
configured). Writes for one recipient start in call order, so one connection's
messages keep their order although the client pipelines over many sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis import exceptions as rx

from ...frames import utf8_len
from ..store import (
    EnqueueResult,
    KeyRecord,
    QueuedMessage,
    QueueLimits,
    Receipt,
    StorageUnavailable,
    StoreOpenError,
)
from . import scripts
from .connection import RedisLink, describe
from .layout import Layout

log = logging.getLogger("relayd.storage")

T = TypeVar("T")
MIN_VERSION = (5, 0)
EXPIRE_CHUNK = 1000      # messages (and receipts) one expiry script removes at most
EXPIRE_SCAN = 100        # recipients read from one slot's retention index at a time
ID_CHUNK = 1000          # seqs or messageIds per removal script
SLOT_BATCH = 500         # per-slot keys read in one pipeline
DROP_CHUNK = 64
PROBE_TTL_MS = 60_000
STAT_FIELDS = ("recipients", "messages", "bytes", "receipts", "keys")
_RESULTS = {"queued": EnqueueResult.QUEUED, "duplicate": EnqueueResult.DUPLICATE, "full": EnqueueResult.FULL}
_KEY_OPTIONAL = ("key_type", "issued_at", "format", "signature")


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _encode_message(msg: QueuedMessage, size: int) -> str:
    meta = json.dumps([msg.sender, msg.message_id, size, msg.timestamp, msg.queued_at], separators=(",", ":"))
    return f"{meta}\n{msg.content}"


def _decode_message(recipient: str, seq: str, record: str) -> QueuedMessage:
    meta, _, content = record.partition("\n")
    sender, message_id, _size, timestamp, queued_at = json.loads(meta)
    return QueuedMessage(recipient, sender, message_id, content, timestamp, queued_at, int(seq))


def _decode_key(address: str, fields: dict[str, str]) -> KeyRecord:
    issued = fields.get("issued_at")
    return KeyRecord(address, fields["public_key"], int(fields["created_at"]), int(fields["updated_at"]),
                     fields.get("key_type"), int(issued) if issued is not None else None,
                     fields.get("format"), fields.get("signature"))


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
        self.node_id = node_id
        self.probe_interval_s = probe_interval_s
        self.refresh_interval_s = refresh_interval_s
        self.expire_chunk = expire_chunk
        self._known_slots: set[int] = set()
        self.link.on_failure = self._known_slots.clear
        self._tails: dict[str, asyncio.Future[None]] = {}
        self._total = 0
        self._changes = 0
        self._prober: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.link.healthy

    @property
    def problem(self) -> str | None:
        return self.link.problem

    # Lifecycle

    async def open(self) -> None:
        """Connect and check the server. Wrong credentials or a too old server stop relayd
        (StoreOpenError); an unreachable Redis does not: relayd starts unhealthy and recovers."""
        if self._prober is not None:
            return
        self.link.connect()
        try:
            await self._check_server()
        except StoreOpenError:
            await self.link.close()
            raise
        except StorageUnavailable as exc:
            log.warning("Redis is not usable yet (%s); relayd starts and keeps trying", exc)
        self._prober = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        tails = list(self._tails.values())
        if tails:
            await asyncio.wait(tails, timeout=self.link.deadline_s)
        await self.link.close()

    async def _check_server(self) -> None:
        try:
            async with asyncio.timeout(self.link.deadline_s):
                if self.link.cluster:
                    await self.link.client.initialize()
                info = await self.link.client.info("server")
        except (rx.RedisError, OSError, TimeoutError) as exc:
            reason = describe(exc)
            if isinstance(exc, (rx.AuthenticationError, rx.NoPermissionError)) or "credentials" in reason \
                    or "password" in reason:
                raise StoreOpenError(f"cannot use Redis: {reason}") from None
            raise self.link.fail(reason) from None
        if self.link.cluster:  # one answer per node; all must qualify
            versions = [v.get("redis_version", "0") for v in info.values()] if isinstance(
                next(iter(info.values()), None), dict) else [info.get("redis_version", "0")]
        else:
            versions = [info.get("redis_version", "0")]
        for version in versions:
            parts = tuple(int(p) for p in str(version).split(".")[:2] if p.isdigit())
            if parts < MIN_VERSION:
                raise StoreOpenError(f"Redis {version} is too old: relayd needs Redis 5.0 or newer")
        await self.probe()
        await self.refresh_total()

    async def _probe_loop(self) -> None:
        """Write a probe key now and then, so health follows Redis even without traffic."""
        next_refresh = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.probe()
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + self.refresh_interval_s
                    await self.refresh_total()
            except StorageUnavailable:
                pass
            except Exception:  # keep probing whatever happens
                log.exception("Redis health probe failed")

    async def probe(self) -> None:
        """One write round trip (and WAIT); marks the store healthy or unhealthy. Raises StorageUnavailable."""
        if self.link.cluster:
            from redis.asyncio.cluster import RedisCluster
            await self.link.read(lambda c: c.ping(target_nodes=RedisCluster.PRIMARIES))
        await self.link.write(scripts.PROBE, [self.layout.probe(self.node_id)], [_now_ms(), PROBE_TTL_MS])

    async def refresh_total(self) -> None:
        """Take the cluster-wide count, unless this instance changed it meanwhile (then next time)."""
        changes = self._changes
        messages = (await self.stats())["messages"]
        if changes == self._changes:
            self._total = messages

    def _count(self, delta: int) -> None:
        self._total += delta
        self._changes += 1

    # Helpers

    def _pipeline(self, client: Any) -> Any:
        """A non-transactional pipeline; a Cluster's splits itself per node."""
        return client.pipeline() if self.link.cluster else client.pipeline(transaction=False)

    async def _in_order(self, address: str, work: Callable[[], Awaitable[T]]) -> T:
        """Start writes for one address in call order; each waits for the previous one."""
        previous = self._tails.get(address)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[address] = mine
        try:
            if previous is not None:
                await asyncio.wait([previous])
            return await work()
        finally:
            mine.set_result(None)
            if self._tails.get(address) is mine:
                del self._tails[address]

    async def _note_slot(self, address: str) -> None:
        """Record the address's slot in the set expiry and statistics walk (once per expiry run)."""
        slot = self.layout.slot_of(address)
        if slot not in self._known_slots:
            await self.link.write(scripts.ADD_SLOTS, [self.layout.slots], [slot])
            self._known_slots.add(slot)

    async def _slots(self) -> list[int]:
        members = await self.link.read(lambda c: c.smembers(self.layout.slots))
        return sorted(int(m) for m in members)

    async def _recipient_write(self, script: scripts.Script, address: str, *args: Any) -> Any:
        return await self.link.write(script, self.layout.recipient(address).all(), [address, *args])

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        outcome = await self._enqueue(msg, limits, "", 0)
        return _RESULTS[outcome]

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        outcomes = await asyncio.gather(*(self._enqueue(msg, limits, "", 0) for msg in messages))
        return [_RESULTS[outcome] for outcome in outcomes]

    async def _enqueue(self, msg: QueuedMessage, limits: QueueLimits, ledger: str, ledger_ttl_ms: int) -> str:
        size = utf8_len(msg.content)
        record = _encode_message(msg, size)

        async def work() -> str:
            await self._note_slot(msg.recipient)
            outcome, seq, dropped = await self._recipient_write(
                scripts.ENQUEUE, msg.recipient, msg.sender, msg.message_id, record, size, msg.queued_at,
                limits.max_messages, limits.max_bytes, 1 if limits.drop_oldest else 0, DROP_CHUNK,
                ledger, ledger_ttl_ms)
            if outcome == "queued":
                msg.seq = int(seq)
                self._count(1 - int(dropped))
            return outcome
        return await self._in_order(msg.recipient, work)

    async def pending(self, recipient: str, limit: int, after_seq: int = 0) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        keys = self.layout.recipient(recipient)

        async def work(client: Any) -> list[QueuedMessage]:
            seqs = await client.zrangebyscore(keys.queue, f"({after_seq}", "+inf", start=0, num=limit)
            if not seqs:
                return []
            records = await client.hmget(keys.messages, seqs)
            return [_decode_message(recipient, s, r) for s, r in zip(seqs, records) if r is not None]
        return await self.link.read(work)

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return await self._remove(recipient, "seq", [str(s) for s in dict.fromkeys(seqs)])

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        return await self._remove(recipient, "id", list(dict.fromkeys(message_ids)))

    async def clear(self, recipient: str) -> int:
        return await self._remove(recipient, "all", [None])

    async def _remove(self, recipient: str, mode: str, items: list[Any]) -> int:
        removed = 0
        for part in _chunks(items, ID_CHUNK):
            args = [] if mode == "all" else list(part)
            count = int(await self._recipient_write(scripts.REMOVE, recipient, mode, *args))
            self._count(-count)
            removed += count
        return removed

    async def size(self, recipient: str) -> int:
        count = await self.link.read(lambda c: c.hget(self.layout.recipient(recipient).counters, "count"))
        return int(count or 0)

    def total(self) -> int:
        """Queued messages in all queues: kept from this instance's writes and refreshed from Redis
        every ``refresh_interval_s``, so /health never waits on Redis."""
        return max(self._total, 0)

    async def stats(self) -> dict[str, int]:
        sums = dict.fromkeys(STAT_FIELDS, 0)
        slots = await self._slots()
        for part in _chunks(slots, SLOT_BATCH):
            async def work(client: Any, part: Sequence[int] = part) -> list[Any]:
                pipe = self._pipeline(client)
                for slot in part:
                    pipe.hmget(self.layout.slot_keys(slot)[1], STAT_FIELDS)
                return await pipe.execute()
            for row in await self.link.read(work):
                for name, value in zip(STAT_FIELDS, row):
                    sums[name] += int(value or 0)
        return sums

    async def expire(self, before_ms: int) -> int:
        """Remove what is older than ``before_ms``: only recipients the per-slot retention indexes
        list as old, each in scripts of at most ``expire_chunk`` messages and receipts."""
        self._known_slots.clear()
        todo = await self._slots()
        removed = 0
        while todo:
            part, todo = todo[:SLOT_BATCH], todo[SLOT_BATCH:]

            async def work(client: Any, part: Sequence[int] = part) -> list[Any]:
                pipe = self._pipeline(client)
                for slot in part:
                    pipe.zrangebyscore(self.layout.slot_keys(slot)[0], "-inf", f"({before_ms}",
                                       start=0, num=EXPIRE_SCAN)
                return await pipe.execute()
            for slot, names in zip(part, await self.link.read(work)):
                for address in names:
                    removed += await self._expire_recipient(address, before_ms)
                if len(names) == EXPIRE_SCAN:
                    todo.append(slot)
        return removed

    async def _expire_recipient(self, address: str, before_ms: int) -> int:
        removed = 0
        while True:
            messages, receipts = await self._recipient_write(scripts.EXPIRE, address, before_ms, self.expire_chunk)
            self._count(-int(messages))
            removed += int(messages)
            if int(messages) < self.expire_chunk and int(receipts) < self.expire_chunk:
                return removed

    # Read receipts

    async def add_receipt(self, receipt: Receipt) -> None:
        await self._add_receipt(receipt, "", 0)

    async def _add_receipt(self, receipt: Receipt, ledger: str, ledger_ttl_ms: int) -> bool:
        record = json.dumps([receipt.reader, receipt.message_id, receipt.timestamp], separators=(",", ":"))

        async def work() -> bool:
            await self._note_slot(receipt.recipient)
            seq = await self._recipient_write(scripts.ADD_RECEIPT, receipt.recipient, record, receipt.timestamp,
                                              ledger, ledger_ttl_ms)
            if seq == "":
                return False
            receipt.seq = int(seq)
            return True
        return await self._in_order(receipt.recipient, work)

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        if limit <= 0:
            return []
        keys = self.layout.recipient(recipient)

        async def work(client: Any) -> list[Receipt]:
            seqs = await client.zrange(keys.receipt_queue, 0, limit - 1)
            if not seqs:
                return []
            records = await client.hmget(keys.receipts, seqs)
            found = []
            for seq, record in zip(seqs, records):
                if record is not None:
                    reader, message_id, timestamp = json.loads(record)
                    found.append(Receipt(recipient, reader, message_id, timestamp, int(seq)))
            return found
        return await self.link.read(work)

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        removed = 0
        for part in _chunks([str(s) for s in dict.fromkeys(seqs)], ID_CHUNK):
            removed += int(await self._recipient_write(scripts.REMOVE_RECEIPTS, recipient, *part))
        return removed

    # Keys

    async def get_key(self, address: str) -> KeyRecord | None:
        return (await self.get_keys([address])).get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        wanted = list(dict.fromkeys(addresses))
        found: dict[str, KeyRecord] = {}
        for part in _chunks(wanted, SLOT_BATCH):
            async def work(client: Any, part: Sequence[str] = part) -> list[Any]:
                pipe = self._pipeline(client)
                for address in part:
                    pipe.hgetall(self.layout.key(address)[0])
                return await pipe.execute()
            for address, fields in zip(part, await self.link.read(work)):
                if fields:
                    found[address] = _decode_key(address, fields)
        return found

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``; an existing key keeps its original ``created_at``."""
        await self._put_key(record, "put", "", 0)
        return record

    async def _put_key(self, record: KeyRecord, mode: str, ledger: str, ledger_ttl_ms: int) -> str:
        fields: list[Any] = ["public_key", record.public_key, "updated_at", record.updated_at]
        for name in _KEY_OPTIONAL:
            value = getattr(record, name)
            if value is not None:
                fields += [name, value]
        await self._note_slot(record.address)
        outcome, created_at = await self.link.write(
            scripts.PUT_KEY, list(self.layout.key(record.address)),
            [mode, record.created_at, ledger, ledger_ttl_ms, record.updated_at, *fields])
        if outcome == "stored":
            record.created_at = int(created_at)
        return str(outcome)

    async def delete_key(self, address: str) -> bool:
        key, stats, _ = self.layout.key(address)
        return int(await self.link.write(scripts.DELETE_KEY, [key, stats], [])) == 1

    async def key_count(self) -> int:
        return (await self.stats())["keys"]

    # Ownership locks

    async def is_locked(self, address: str) -> bool:
        return bool(await self.link.read(lambda c: c.exists(self.layout.lock(address))))

    async def lock(self, address: str) -> None:
        await self.link.write(scripts.LOCK, [self.layout.lock(address)], [_now_ms()])

    # Migration (``relayd migrate``): each copy is remembered for ``ledger_ttl_ms``, so a re-run copies
    # nothing twice, not even what was delivered and deleted since.

    async def migrate_message(self, msg: QueuedMessage, ledger_ttl_ms: int) -> str:
        """Returns queued, duplicate, full or migrated (copied by an earlier run)."""
        roomy = QueueLimits(max_messages=1 << 62, max_bytes=1 << 62, drop_oldest=False)
        return await self._enqueue(msg, roomy, f"m\n{msg.sender}\n{msg.message_id}", ledger_ttl_ms)

    async def migrate_receipt(self, receipt: Receipt, source_seq: int, ledger_ttl_ms: int) -> bool:
        """True when copied, False when an earlier run did."""
        member = f"r\n{receipt.reader}\n{receipt.message_id}\n{receipt.timestamp}\n{source_seq}"
        return await self._add_receipt(receipt, member, ledger_ttl_ms)

    async def migrate_key(self, record: KeyRecord, ledger_ttl_ms: int) -> str:
        """Returns stored, migrated (copied by an earlier run) or newer (Redis holds a newer key)."""
        return await self._put_key(record, "migrate", f"k\n{record.updated_at}", ledger_ttl_ms)

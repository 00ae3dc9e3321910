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
import json
import logging
import time
from collections.abc import Iterable, Sequence
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
EXPIRE_CHUNK = 1000      # messages (and receipts, tokens) one expiry script removes at most
EXPIRE_SCAN = 100        # recipients read from one slot's retention index at a time
ID_CHUNK = 1000          # seqs or messageIds per removal script
RESTORE_CHUNK = 200      # messages per restore script
RECEIPT_CHUNK = 500      # receipts per add_receipts script
SLOT_BATCH = 500         # per-slot keys read in one pipeline
DROP_CHUNK = 64
PENDING_CHUNK = 16       # messages read at a time for a page bounded in bytes
PROBE_TTL_MS = 60_000
STAT_FIELDS = ("recipients", "messages", "bytes", "receipts", "keys")
_RESULTS = {"queued": EnqueueResult.QUEUED, "duplicate": EnqueueResult.DUPLICATE, "full": EnqueueResult.FULL,
            "no_space": EnqueueResult.NO_SPACE}
_KEY_OPTIONAL = ("key_type", "issued_at", "format", "signature")

Presence = dict[str, str]
"""An address's presence as ``relayd.cluster`` records it: instance -> kind of its sessions there."""


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _pairs(flat: Sequence[Any]) -> Presence:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


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


def _by_recipient(items: Iterable[T], recipient: Any) -> dict[str, list[T]]:
    """Items grouped by recipient, each group in the given order."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(recipient(item), []).append(item)
    return groups


class SlotTotals:
    """Messages and content bytes per hash slot, and their sums, never older than what was last seen.

    Every change of a slot's totals bumps its ``ver`` in Redis; a value is
    taken only when its version is newer than the one held, so a slow
    periodic read never overwrites what a later write of this instance
    returned. After a failure (Redis may have restarted with other data) the
    next full read is taken as it is.
    """

    def __init__(self) -> None:
        self._slots: dict[int, tuple[int, int, int]] = {}
        self.messages = 0
        self.bytes = 0
        self.trust_next_read = False

    def apply(self, slot: int, totals: Sequence[Any], *, force: bool = False) -> None:
        if len(totals) < 3:
            return
        messages, nbytes, ver = (int(v or 0) for v in totals[:3])
        old = self._slots.get(slot)
        if old is not None and ver <= old[2] and not force:
            return
        self._slots[slot] = (messages, nbytes, ver)
        self.messages += messages - (old[0] if old else 0)
        self.bytes += nbytes - (old[1] if old else 0)


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
        parsed = []
        for version in versions:
            parts = tuple(int(p) for p in str(version).split(".")[:2] if p.isdigit())
            if parts < MIN_VERSION:
                raise StoreOpenError(f"Redis {version} is too old: relayd needs Redis 5.0 or newer")
            parsed.append(parts)
        self.server_version = min(parsed)
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
        """Read every slot's totals, so the sums include what other instances stored."""
        await self.stats()

    # Helpers

    def _pipeline(self, client: Any) -> Any:
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

    async def _recipient_write(self, script: scripts.Script, address: str, *args: Any) -> Any:
        return await self.link.write(script, self.layout.recipient(address).all(), [address, *args])

    def _count(self, address: str, totals: Sequence[Any]) -> None:
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
        outcome, seq, _dropped, totals, presence = await self._recipient_write(
            scripts.ENQUEUE, msg.recipient, msg.sender, msg.message_id, _encode_message(msg, size), size,
            msg.queued_at, limits.max_messages, limits.max_bytes, 1 if limits.drop_oldest else 0, DROP_CHUNK,
            1 if over else 0, ledger, ledger_ttl_ms, watcher, watch_ttl_ms)
        if outcome == "queued":
            msg.seq = int(seq)
            self._count(msg.recipient, totals)
        return outcome, _pairs(presence)

    async def restore(self, messages: list[QueuedMessage]) -> int:
        return (await self.restore_routed(messages))[0]

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, Presence]]:
        """``restore``, and each recipient's presence read in the same atomic step (see ``enqueue_routed``)."""
        restored = 0
        presence: dict[str, Presence] = {}
        for recipient, group in _by_recipient(messages, lambda m: m.recipient).items():
            self.note_slot(self.layout.slot_of(recipient))
            for part in _chunks(group, RESTORE_CHUNK):
                args: list[Any] = []
                for m in part:
                    size = utf8_len(m.content)
                    args += [max(m.seq, 0), m.sender, m.message_id, size, m.queued_at, _encode_message(m, size)]
                count, seqs, totals, found = await self._recipient_write(scripts.RESTORE, recipient, *args)
                for m, seq in zip(part, seqs):
                    if seq != "0":
                        m.seq = int(seq)
                self._count(recipient, totals)
                restored += int(count)
                presence[recipient] = _pairs(found)
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
            for part in _chunks(seqs, PENDING_CHUNK if max_bytes is not None else max(len(seqs), 1)):
                for seq, record in zip(part, await client.hmget(keys.messages, part)):
                    if record is None:
                        continue
                    if max_bytes is not None and page and used >= max_bytes:
                        return page
                    msg = _decode_message(recipient, seq, record)
                    page.append(msg)
                    used += utf8_len(msg.content)
            return page
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
            count, totals = await self._recipient_write(scripts.REMOVE, recipient, mode, *args)
            self._count(recipient, totals)
            removed += int(count)
        return removed

    async def size(self, recipient: str) -> int:
        count = await self.link.read(lambda c: c.hget(self.layout.recipient(recipient).counters, "count"))
        return int(count or 0)

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        keys = self.layout.recipient(recipient)

        async def work(client: Any) -> tuple[int, int]:
            pipe = client.pipeline(transaction=False) if not self.link.cluster else client.pipeline()
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
        for part in _chunks(slots, SLOT_BATCH):
            async def work(client: Any, part: Sequence[int] = part) -> list[Any]:
                pipe = self._pipeline(client)
                for slot in part:
                    pipe.hmget(self.layout.slot_keys(slot)[1], [*STAT_FIELDS, "ver"])
                return await pipe.execute()
            for slot, row in zip(part, await self.link.read(work)):
                for name, value in zip(STAT_FIELDS, row):
                    sums[name] += int(value or 0)
                self._totals.apply(slot, (row[1], row[2], row[5]), force=force)
        return sums

    async def expire(self, before_ms: int) -> int:
        """Remove what is older than ``before_ms``: only recipients the per-slot retention indexes
        list as old, each in scripts of at most ``expire_chunk`` messages and receipts; then tokens
        that expired by ``before_ms``."""
        slots = await self.slots()
        removed = 0
        todo = list(slots)
        while todo:
            part, todo = todo[:SLOT_BATCH], todo[SLOT_BATCH:]
            for slot, names in zip(part, await self._index_pages(part, before_ms, dict.fromkeys(part, 0))):
                for address in names:
                    removed += await self._expire_recipient(address, before_ms)
                if len(names) == EXPIRE_SCAN:  # expired addresses left the index: read it from the start again
                    todo.append(slot)
        await self._expire_tokens(slots, before_ms)
        return removed

    async def _index_pages(self, slots: Sequence[int], before_ms: int, offsets: dict[int, int]) -> list[Any]:
        """One page (``EXPIRE_SCAN`` addresses from each slot's offset) of the retention indexes: the
        addresses holding something older than ``before_ms``, per slot."""
        async def work(client: Any) -> list[Any]:
            pipe = self._pipeline(client)
            for slot in slots:
                pipe.zrangebyscore(self.layout.slot_keys(slot)[0], "-inf", f"({before_ms}",
                                   start=offsets[slot], num=EXPIRE_SCAN)
            return await pipe.execute()
        return await self.link.read(work)

    async def _all_old_addresses(self, before_ms: int) -> list[str]:
        """Every address the retention indexes list as holding something older than ``before_ms``."""
        found: list[str] = []
        offsets = dict.fromkeys(await self.slots(), 0)
        while offsets:
            part = list(offsets)[:SLOT_BATCH]
            for slot, names in zip(part, await self._index_pages(part, before_ms, offsets)):
                found += names
                if len(names) == EXPIRE_SCAN:
                    offsets[slot] += EXPIRE_SCAN
                else:
                    del offsets[slot]
        return found

    async def _expire_recipient(self, address: str, before_ms: int) -> int:
        removed = 0
        while True:
            messages, receipts, totals = await self._recipient_write(scripts.EXPIRE, address, before_ms,
                                                                     self.expire_chunk)
            self._count(address, totals)
            removed += int(messages)
            if int(messages) < self.expire_chunk and int(receipts) < self.expire_chunk:
                return removed

    async def _expire_tokens(self, slots: list[int], before_ms: int) -> None:
        for part in _chunks(slots, SLOT_BATCH):
            async def work(client: Any, part: Sequence[int] = part) -> list[Any]:
                pipe = self._pipeline(client)
                for slot in part:
                    pipe.zcount(self.layout.token_slot_keys(slot)[1], "-inf", before_ms)
                return await pipe.execute()
            for slot, due in zip(part, await self.link.read(work)):
                while int(due or 0) > 0:
                    gone = await self.link.write(scripts.EXPIRE_TOKENS, list(self.layout.token_slot_keys(slot)),
                                                 [before_ms, self.expire_chunk])
                    for i in range(0, len(gone) - 1, 2):
                        if gone[i + 1]:
                            self.link.post_command("ZREM", self.layout.tokens_of(gone[i + 1]), gone[i],
                                                   key=self.layout.tokens_of(gone[i + 1]))
                    due = 0 if len(gone) < 2 * self.expire_chunk else due

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        """Move the times of what was stored before ``before_ms``: every address the retention indexes
        list as old (read in full first, since shifting reorders them), each in bounded scripts."""
        moved = 0
        for address in await self._all_old_addresses(before_ms):
            for what in ("m", "r"):
                after = "0"
                while True:
                    count, last = await self._recipient_write(scripts.SHIFT_TIMES, address, what, before_ms,
                                                              delta_ms, after, self.expire_chunk)
                    moved += int(count)
                    if not last:
                        break
                    after = last
        return moved

    # Read receipts

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        dropped = 0
        for recipient, group in _by_recipient(receipts, lambda r: r.recipient).items():
            for part in _chunks(group, RECEIPT_CHUNK):
                dropped += await self._add_receipts(recipient, part, max_per_recipient, "", 0)
        return dropped

    async def _add_receipts(self, recipient: str, receipts: Sequence[Receipt], cap: int, ledger: str,
                            ledger_ttl_ms: int) -> int:
        """Store one recipient's receipts; returns how many were dropped, or -1 when migrated before."""
        args: list[Any] = []
        for r in receipts:
            args += [json.dumps([r.reader, r.message_id, r.timestamp], separators=(",", ":")), r.timestamp]
        self.note_slot(self.layout.slot_of(recipient))
        reply = await self._recipient_write(scripts.ADD_RECEIPTS, recipient, cap, ledger, ledger_ttl_ms, *args)
        if int(reply[0]) < 0:
            return -1
        for r, seq in zip(receipts, reply[1:]):
            r.seq = int(seq)
        return int(reply[0])

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
        """Store ``record``; an existing key keeps its original ``created_at``; a signed one raises the floor."""
        await self._put_key(record, "put", "", 0)
        return record

    async def _put_key(self, record: KeyRecord, mode: str, ledger: str, ledger_ttl_ms: int) -> str:
        fields: list[Any] = ["public_key", record.public_key, "updated_at", record.updated_at]
        for name in _KEY_OPTIONAL:
            value = getattr(record, name)
            if value is not None:
                fields += [name, value]
        signed_issued = record.issued_at if record.signed and record.issued_at is not None else ""
        self.note_slot(self.layout.slot_of(record.address))
        outcome, created_at = await self.link.write(
            scripts.PUT_KEY, list(self.layout.key(record.address)),
            [mode, record.created_at, ledger, ledger_ttl_ms, record.updated_at, signed_issued, *fields])
        if outcome == "stored":
            record.created_at = int(created_at)
        return str(outcome)

    async def delete_key(self, address: str) -> bool:
        key, stats, _, _ = self.layout.key(address)
        return int(await self.link.write(scripts.DELETE_KEY, [key, stats], [])) == 1

    async def key_floor(self, address: str) -> int | None:
        """The floor key, or (for keys stored before floors existed) the stored signed key's ``issued_at``."""
        key, _, _, floor_key = self.layout.key(address)

        async def work(client: Any) -> list[Any]:
            pipe = self._pipeline(client)
            pipe.get(floor_key)
            pipe.hmget(key, ["signature", "issued_at"])
            return await pipe.execute()
        floor, (signature, issued) = await self.link.read(work)
        found = [int(v) for v in (floor, issued if signature is not None else None) if v is not None]
        return max(found) if found else None

    async def key_count(self) -> int:
        return (await self.stats())["keys"]

    # Ownership locks

    async def is_locked(self, address: str) -> bool:
        return bool(await self.link.read(lambda c: c.exists(self.layout.lock(address))))

    async def lock(self, address: str) -> None:
        await self.link.write(scripts.LOCK, [self.layout.lock(address)], [_now_ms()])

    # Bearer tokens: found by hash in the hash's slot, listed (and capped) in the address's own slot.

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        slot = self.layout.token_slot(token_hash)
        self.note_slot(slot)
        saved = self.link.post(scripts.SAVE_TOKEN, list(self.layout.token_slot_keys(slot)),
                               [token_hash, address, expires_at_ms])
        gone = await self.link.write(scripts.OWN_TOKEN, [self.layout.tokens_of(address)],
                                     [token_hash, expires_at_ms, max_per_address])
        await saved
        for part in _by_recipient(gone, self.layout.token_slot).items():
            await self.link.write(scripts.DROP_TOKENS, list(self.layout.token_slot_keys(part[0])), part[1])

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        """The lookup by hash, confirmed by the address's own list (a token over the cap is gone from it)."""
        found = await self.link.read(lambda c: c.hget(self.layout.token_slot_keys(
            self.layout.token_slot(token_hash))[0], token_hash))
        if not found:
            return None
        address, _, expires = found.partition(" ")
        if int(expires) <= now_ms:
            return None
        listed = await self.link.read(lambda c: c.zscore(self.layout.tokens_of(address), token_hash))
        return address if listed is not None else None

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
        return await self._add_receipts(receipt.recipient, [receipt], 1 << 62, member, ledger_ttl_ms) >= 0

    async def migrate_key(self, record: KeyRecord, ledger_ttl_ms: int) -> str:
        """Returns stored, migrated (copied by an earlier run) or newer (Redis holds a newer key)."""
        return await self._put_key(record, "migrate", f"k\n{record.updated_at}", ledger_ttl_ms)

    async def migrate_floor(self, address: str, issued_at: int) -> None:
        """Raise the key floor of ``address`` (floors outlive deleted keys)."""
        await self.link.write(scripts.RAISE_FLOOR, [self.layout.key(address)[3]], [issued_at])

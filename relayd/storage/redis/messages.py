"""Queued messages in Redis: enqueue (with idempotency for the retention period), restore, pages, removal.

A part of ``RedisStore``. Each change is one script on the recipient's hash
slot. A message that leaves as delivered (``remove``, ``ack``,
``record_delivered``) stays known by (sender, messageId) until expiry forgets
it, so a resend is answered DELIVERED instead of being stored again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ...frames import utf8_len
from ..store import EnqueueResult, QueuedMessage, QueueLimits
from . import scripts
from .connection import Commands
from .core import StoreCore
from .records import PresenceEntries, by_recipient, chunks, decode_message, encode_message, pairs

ID_CHUNK = 1000          # seqs or messageIds per removal script
RESTORE_CHUNK = 200      # messages per restore script
DELIVERED_CHUNK = 500    # messages per record_delivered script
DROP_CHUNK = 64
PENDING_CHUNK = 16       # messages read at a time for a page bounded in bytes
RESULTS = {"queued": EnqueueResult.QUEUED, "duplicate": EnqueueResult.DUPLICATE,
           "delivered": EnqueueResult.DELIVERED, "full": EnqueueResult.FULL, "no_space": EnqueueResult.NO_SPACE}


class RedisMessages:
    def __init__(self, core: StoreCore) -> None:
        self.core = core

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        """All submitted at once, so they share round trips and keep their order."""
        outcomes = await asyncio.gather(*(self.enqueue(msg, limits, "", 0) for msg in messages))
        return [RESULTS[outcome] for outcome, _ in outcomes]

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits, ledger: str, ledger_ttl_ms: int,
                      watcher: str = "", watch_ttl_ms: int = 0) -> tuple[str, PresenceEntries]:
        """The script's outcome (a key of ``RESULTS``, or ``migrated``) and the recipient's presence."""
        slot, posted = self._post(msg, limits, ledger, ledger_ttl_ms, watcher, watch_ttl_ms)
        return self._settle(msg, slot, await posted)

    async def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, watcher: str,
                             watch_ttl_ms: int) -> tuple[EnqueueResult, PresenceEntries]:
        """``enqueue`` as ``RedisStore.enqueue_routed`` answers it, in the one coroutine of the cluster's every
        stored message (a layer that only awaits another costs a coroutine and its frame per message)."""
        slot, posted = self._post(msg, limits, "", 0, watcher, watch_ttl_ms)
        outcome, presence = self._settle(msg, slot, await posted)
        return RESULTS[outcome], presence

    def _post(self, msg: QueuedMessage, limits: QueueLimits, ledger: str, ledger_ttl_ms: int, watcher: str,
              watch_ttl_ms: int) -> tuple[int, asyncio.Future[Any]]:
        """Queue the message's call of the merged enqueue script: its recipient's slot, and the call's entry."""
        core = self.core
        size = utf8_len(msg.content)
        over = bool(limits.max_total_bytes) and core.totals.bytes + core.other_bytes + size > limits.max_total_bytes
        slot = core.layout.slot_of(msg.recipient)
        core.note_slot(slot)
        return slot, core.link.merge(
            scripts.ENQUEUE, core.layout.enqueue_keys(msg.recipient),
            (limits.max_messages, limits.max_bytes, 1 if limits.drop_oldest else 0, DROP_CHUNK, ledger_ttl_ms,
             watcher, watch_ttl_ms),
            (msg.recipient, msg.sender, msg.message_id, encode_message(msg, size), size, msg.queued_at,
             1 if over else 0, ledger))

    def _settle(self, msg: QueuedMessage, slot: int, entry: Any) -> tuple[str, PresenceEntries]:
        """Take a call's entry: the message's seq, the slot's totals; its outcome and the presence."""
        outcome, seq, _dropped, totals, presence = entry
        if outcome in ("queued", "duplicate"):
            msg.seq = int(seq)
        if outcome == "queued":
            self.core.totals.apply(slot, totals)
        return str(outcome), pairs(presence) if presence else {}

    async def restore(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, PresenceEntries]]:
        core = self.core
        restored = 0
        presence: dict[str, PresenceEntries] = {}
        for recipient, group in by_recipient(messages, lambda m: m.recipient).items():
            core.note_slot(core.layout.slot_of(recipient))
            for part in chunks(group, RESTORE_CHUNK):
                args: list[Any] = []
                for m in part:
                    size = utf8_len(m.content)
                    args += [max(m.seq, 0), m.sender, m.message_id, size, m.queued_at, encode_message(m, size)]
                count, seqs, totals, found = await core.recipient_write(scripts.RESTORE, recipient, *args)
                for m, seq in zip(part, seqs):
                    if seq != "0":
                        m.seq = int(seq)
                core.apply_totals(recipient, totals)
                restored += int(count)
                presence[recipient] = pairs(found)
        return restored, presence

    async def record_delivered(self, messages: list[QueuedMessage], keep_until: int = 0) -> None:
        """One script per recipient, all submitted together: one round trip (per Cluster node). With
        ``keep_until``, history keeps them until then."""
        calls: list[tuple[scripts.Script, Sequence[str], list[Any]]] = []
        recipients: list[str] = []
        for recipient, group in by_recipient(messages, lambda m: m.recipient).items():
            self.core.note_slot(self.core.layout.slot_of(recipient))
            for part in chunks(group, DELIVERED_CHUNK):
                args: list[Any] = [recipient, keep_until]
                for m in part:
                    size = utf8_len(m.content) if keep_until else 0
                    args += [m.sender, m.message_id, m.queued_at, m.timestamp, size,
                             encode_message(m, size) if keep_until else ""]
                calls.append((scripts.RECORD_DELIVERED, self.core.layout.script_keys(recipient), args))
                recipients.append(recipient)
        if calls:
            for recipient, (_, totals) in zip(recipients, await self.core.link.write_many(calls)):
                self.core.apply_totals(recipient, totals)

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        keys = self.core.layout.recipient(recipient)

        async def work(client: Commands) -> list[QueuedMessage]:
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
        return await self.core.link.read(work)

    async def remove(self, recipient: str, mode: str, items: list[str], keep_until: int = 0) -> int:
        """Remove by ``seq`` or ``id`` (as delivered, kept in history until ``keep_until`` when set), or ``all``
        (not)."""
        removed = 0
        for part in chunks(items, ID_CHUNK) if mode != "all" else [[]]:
            count, totals = await self.core.recipient_write(scripts.REMOVE, recipient, mode, keep_until, *part)
            self.core.apply_totals(recipient, totals)
            removed += int(count)
        return removed

    async def size(self, recipient: str) -> int:
        counters = self.core.layout.recipient(recipient).counters

        async def work(client: Commands) -> str | None:
            return await client.hget(counters, "count")
        return int(await self.core.link.read(work) or 0)

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        keys = self.core.layout.recipient(recipient)

        async def work(client: Commands) -> tuple[int, int]:
            pipe = self.core.pipeline(client)
            pipe.hget(keys.counters, "count")
            pipe.zcard(keys.receipt_queue)
            count, receipts = await pipe.execute()
            return int(count or 0), int(receipts or 0)
        return await self.core.link.read(work)

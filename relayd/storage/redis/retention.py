"""Retention in Redis: expiry by the per-slot retention indexes, and times moved after a clock step.

A part of ``RedisStore``. The retention index of a slot lists each address by
the oldest time it holds (a message's queued_at, a receipt's timestamp, a
delivered record's queued_at), so expiry reads only addresses that hold
something old.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..store import RECEIPT_BYTES
from . import scripts
from .core import StoreCore
from .records import chunks

EXPIRE_SCAN = 100   # recipients read from one slot's retention index at a time
SLOT_BATCH = 500    # per-slot keys read at once


class RedisRetention:
    def __init__(self, core: StoreCore, expire_chunk: int) -> None:
        self.core = core
        self.expire_chunk = expire_chunk
        """Messages (and receipts, delivered records, tokens) one expiry script removes at most."""

    async def expire(self, before_ms: int) -> int:
        """Remove what is older than ``before_ms``: only recipients the per-slot retention indexes
        list as old, each in scripts of at most ``expire_chunk`` messages, receipts and delivered
        records; then tokens that expired by ``before_ms``."""
        slots = await self.core.slots()
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

    async def _index_pages(self, slots: Sequence[int], before_ms: int, offsets: dict[int, int]) -> list[list[str]]:
        """One page (``EXPIRE_SCAN`` addresses from each slot's offset) of the retention indexes: the
        addresses holding something older than ``before_ms``, per slot."""
        return await self.core.due_members([self.core.layout.slot_keys(slot)[0] for slot in slots], f"({before_ms}",
                                           EXPIRE_SCAN, [offsets[slot] for slot in slots])

    async def _all_old_addresses(self, before_ms: int) -> list[str]:
        """Every address the retention indexes list as holding something older than ``before_ms``."""
        found: list[str] = []
        offsets = dict.fromkeys(await self.core.slots(), 0)
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
            messages, receipts, totals, forgotten = await self.core.recipient_write(
                scripts.EXPIRE, address, before_ms, self.expire_chunk)
            self.core.apply_totals(address, totals)
            self.core.other_bytes -= int(receipts) * RECEIPT_BYTES
            removed += int(messages)
            if max(int(messages), int(receipts), int(forgotten)) < self.expire_chunk:
                return removed

    async def _expire_tokens(self, slots: list[int], before_ms: int) -> None:
        link, layout = self.core.link, self.core.layout
        for part in chunks(slots, SLOT_BATCH):
            firsts = await self.core.due_members([layout.token_slot_keys(slot)[1] for slot in part], str(before_ms), 1)
            for slot, first in zip(part, firsts):
                due = bool(first)
                while due:
                    gone = await link.write(scripts.EXPIRE_TOKENS, list(layout.token_slot_keys(slot)),
                                            [before_ms, self.expire_chunk])
                    for i in range(0, len(gone) - 1, 2):
                        if gone[i + 1]:
                            link.post_command("ZREM", layout.tokens_of(gone[i + 1]), gone[i],
                                              key=layout.tokens_of(gone[i + 1]))
                    due = len(gone) >= 2 * self.expire_chunk

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        """Move the times of what was stored before ``before_ms``: every address the retention indexes
        list as old (read in full first, since shifting reorders them), each in bounded scripts."""
        moved = 0
        for address in await self._all_old_addresses(before_ms):
            for what in ("m", "r", "d"):
                after = "0"
                while True:
                    count, last = await self.core.recipient_write(scripts.SHIFT_TIMES, address, what, before_ms,
                                                                   delta_ms, after, self.expire_chunk)
                    moved += int(count)
                    if not last:
                        break
                    after = last
        return moved

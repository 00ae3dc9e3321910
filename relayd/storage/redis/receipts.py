"""Read receipts waiting in Redis for their message's sender: a part of ``RedisStore``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..store import RECEIPT_BYTES, Receipt
from . import scripts
from .connection import Commands
from .core import StoreCore
from .records import by_recipient, chunks, compact_json

RECEIPT_CHUNK = 500  # receipts per add_receipts script
ID_CHUNK = 1000      # seqs per removal script


class RedisReceipts:
    def __init__(self, core: StoreCore) -> None:
        self.core = core

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        dropped = 0
        for recipient, group in by_recipient(receipts, lambda r: r.recipient).items():
            for part in chunks(group, RECEIPT_CHUNK):
                dropped += await self.write_receipts(recipient, part, max_per_recipient, "", 0)
        return dropped

    async def write_receipts(self, recipient: str, receipts: Sequence[Receipt], cap: int, ledger: str,
                             ledger_ttl_ms: int) -> int:
        """Store one recipient's receipts; returns how many were dropped, or -1 when migrated before."""
        args: list[Any] = []
        for r in receipts:
            args += [compact_json([r.reader, r.message_id, r.timestamp]), r.timestamp]
        self.core.note_slot(self.core.layout.slot_of(recipient))
        reply = await self.core.recipient_write(scripts.ADD_RECEIPTS, recipient, cap, ledger, ledger_ttl_ms, *args)
        if int(reply[0]) < 0:
            return -1
        for r, seq in zip(receipts, reply[1:]):
            r.seq = int(seq)
        self.core.other_bytes += (len(receipts) - int(reply[0])) * RECEIPT_BYTES
        return int(reply[0])

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        if limit <= 0:
            return []
        keys = self.core.layout.recipient(recipient)

        async def work(client: Commands) -> list[Receipt]:
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
        return await self.core.link.read(work)

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        removed = 0
        for part in chunks([str(s) for s in dict.fromkeys(seqs)], ID_CHUNK):
            removed += int(await self.core.recipient_write(scripts.REMOVE_RECEIPTS, recipient, *part))
        self.core.other_bytes -= removed * RECEIPT_BYTES
        return removed

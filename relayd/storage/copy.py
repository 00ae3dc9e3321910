"""``relayd migrate`` into a SQLite or PostgreSQL store: a snapshot copied through the store contract, safe to re-run.

Re-running copies nothing twice, through the contract's own idempotency: a
message still stored is DUPLICATE, one delivered since the last run is
DELIVERED (neither is stored again); a receipt already stored for the same
reader, messageId and time is skipped; a key the destination holds in the same
or a newer version is kept; locks, floors and tokens are idempotent. Messages
keep their order and ``queued_at``; past-retention ones are not copied.
"""

from __future__ import annotations

import time
from typing import Protocol

from .snapshot import Snapshot
from .store import EnqueueResult, QueuedMessage, QueueLimits, Store

BATCH = 200
ROOMY = QueueLimits(max_messages=1 << 62, max_bytes=1 << 62, drop_oldest=False)
RECEIPT_CAP = 1 << 30


class MigrationTarget(Store, Protocol):
    async def raise_key_floor(self, address: str, issued_at: int) -> None:
        """Raise the key floor of ``address`` to at least ``issued_at`` (floors outlive deleted keys)."""
        ...


async def copy_into(snapshot: Snapshot, store: MigrationTarget, *, cutoff_ms: int,
                    max_tokens_per_address: int) -> dict[str, int]:
    """Copy everything; returns counts by outcome. Raises StorageUnavailable when the destination fails."""
    counts = dict.fromkeys(("messages_copied", "messages_already_copied", "messages_expired", "messages_refused",
                            "receipts_copied", "receipts_already_copied", "keys_copied", "keys_already_copied",
                            "keys_newer_in_destination", "locks", "key_floors", "tokens"), 0)
    batch: list[QueuedMessage] = []

    async def flush() -> None:
        for result in await store.enqueue_many(batch, ROOMY):
            name = {EnqueueResult.QUEUED: "messages_copied", EnqueueResult.FULL: "messages_refused",
                    EnqueueResult.NO_SPACE: "messages_refused"}.get(result, "messages_already_copied")
            counts[name] += 1
        batch.clear()

    async for msg in snapshot.messages():
        if msg.queued_at < cutoff_ms:
            counts["messages_expired"] += 1
            continue
        if batch and (len(batch) >= BATCH or batch[0].recipient != msg.recipient):
            await flush()
        batch.append(msg)
    if batch:
        await flush()

    stored: dict[str, set[tuple[str, str, int]]] = {}
    async for receipt, _ in snapshot.receipts():
        if receipt.recipient not in stored:
            stored = {receipt.recipient: {(r.reader, r.message_id, r.timestamp)
                                          for r in await store.receipts(receipt.recipient, RECEIPT_CAP)}}
        ident = (receipt.reader, receipt.message_id, receipt.timestamp)
        if ident in stored[receipt.recipient]:
            counts["receipts_already_copied"] += 1
            continue
        await store.add_receipts([receipt], RECEIPT_CAP)
        stored[receipt.recipient].add(ident)
        counts["receipts_copied"] += 1

    async for floor_address, issued_at in snapshot.floors():
        await store.raise_key_floor(floor_address, issued_at)
        counts["key_floors"] += 1
    async for record in snapshot.keys():
        held = await store.get_key(record.address)
        if held is not None and held.updated_at >= record.updated_at:
            same = (held.public_key, held.signature) == (record.public_key, record.signature)
            counts["keys_already_copied" if same else "keys_newer_in_destination"] += 1
            continue
        await store.put_key(record)
        counts["keys_copied"] += 1
    async for address in snapshot.locks():
        await store.lock(address)
        counts["locks"] += 1
    async for token_hash, address, expires_at in snapshot.tokens(int(time.time() * 1000)):
        await store.save_token(token_hash, address, expires_at, max_tokens_per_address)
        counts["tokens"] += 1
    return counts

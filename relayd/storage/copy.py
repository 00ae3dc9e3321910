"""``relayd migrate`` into a SQLite or PostgreSQL store: a snapshot copied through the store contract, safe to re-run.

Re-running copies nothing twice, through the contract's own idempotency: a
message still stored is DUPLICATE, one delivered since the last run is
DELIVERED (neither is stored again); a receipt already stored for the same
reader, messageId and time is skipped; a key the destination holds in the same
or a newer version is kept; locks, floors, tokens, delivered records, kept
history and push subscriptions are idempotent (``copy_kept``, which the Redis
destination uses too). Messages keep their order and ``queued_at``;
past-retention ones are not copied.

Records are copied as stored: sealed ones (encryption at rest) stay sealed,
so ``check_sealing`` refuses, before anything is copied, a destination that
would not open them with the same key(s).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeVar

from .sealed import CHECK_ADDRESS, check_key_ids
from .snapshot import Snapshot
from .store import (EnqueueResult, KeyRecord, PushSubscription, QueuedMessage, QueueLimits, Store,
                    StoreOpenError)

T = TypeVar("T")
BATCH = 200
ROOMY = QueueLimits(max_messages=1 << 62, max_bytes=1 << 62, drop_oldest=False)
RECEIPT_CAP = 1 << 30
PUSH_CAP = 1 << 30
"""Push subscriptions are copied past the per-address cap: the source's relays kept it already."""


class SealingMismatch(StoreOpenError):
    """The source's sealed records would not open in the destination (or the other way round): nothing copied."""


class KeptTarget(Protocol):
    """What ``copy_kept`` and ``check_sealing`` ask of a destination (every persistent backend has it)."""

    async def record_delivered(self, messages: list[QueuedMessage]) -> None: ...

    async def copy_history(self, kept: list[tuple[QueuedMessage, int]]) -> int:
        """Keep these messages, each until its time (ms), unless kept already; how many were new."""
        ...

    async def put_push_subscription(self, sub: PushSubscription, max_per_address: int) -> PushSubscription: ...

    async def get_key(self, address: str) -> KeyRecord | None: ...

    async def queue_keys(self) -> list[str]: ...


class MigrationTarget(Store, KeptTarget, Protocol):
    async def raise_key_floor(self, address: str, issued_at: int) -> None:
        """Raise the key floor of ``address`` to at least ``issued_at`` (floors outlive deleted keys)."""
        ...


def _ids(ids: set[int]) -> str:
    return ", ".join(str(i) for i in sorted(ids))


async def check_sealing(snapshot: Snapshot, store: KeptTarget) -> None:
    """Raise ``SealingMismatch`` unless the destination opens the source's records as they are: both in clear,
    or the source sealed with key ids the destination was set up with (or the destination holds nothing)."""
    source = check_key_ids(await snapshot.key(CHECK_ADDRESS))
    dest = check_key_ids(await store.get_key(CHECK_ADDRESS))
    nothing = "nothing was copied"
    if source is None and dest is None:
        return
    if dest is None:
        if await store.queue_keys():
            raise SealingMismatch(f"the source's records are sealed (encryption at rest, key id "
                                  f"{_ids(source or set())}) but the destination holds records in clear: migrate "
                                  f"into an empty destination ({nothing})")
        return
    if source is None:
        raise SealingMismatch(f"the destination's records are sealed (encryption at rest, key id {_ids(dest)}) but "
                              f"the source's are not: migrate into an empty destination, then run relayd reseal "
                              f"there with its [storage] encryption_key_file ({nothing})")
    if not source <= dest:
        raise SealingMismatch(f"the source's records are sealed with key id {_ids(source)}, the destination's with "
                              f"key id {_ids(dest)}: relayd migrate copies sealed records as they are, so both must "
                              f"use the same [storage] encryption_key_file; migrate into an empty destination and "
                              f"start it with the source's key file ({nothing})")


async def _batches(items: AsyncIterator[T], wanted: Callable[[T], bool]) -> AsyncIterator[list[T]]:
    """The ``wanted`` ones of ``items``, ``BATCH`` at a time."""
    batch: list[T] = []
    async for item in items:
        if wanted(item):
            batch.append(item)
            if len(batch) >= BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


async def copy_kept(snapshot: Snapshot, store: KeptTarget, counts: dict[str, int], *, cutoff_ms: int) -> None:
    """Copy the messageIds remembered as delivered (so a resend is still answered as the first one was), kept
    history and push subscriptions; what expired already is left out. Adds to ``counts``."""
    now = int(time.time() * 1000)
    for name in ("delivered_records", "history_copied", "history_already_copied", "push_subscriptions"):
        counts.setdefault(name, 0)
    async for delivered in _batches(snapshot.delivered(), lambda m: m.queued_at >= cutoff_ms):
        await store.record_delivered(delivered)
        counts["delivered_records"] += len(delivered)
    async for kept in _batches(snapshot.history(), lambda entry: entry[1] > now):
        copied = await store.copy_history(kept)
        counts["history_copied"] += copied
        counts["history_already_copied"] += len(kept) - copied
    async for sub in snapshot.push_subscriptions():
        if sub.expires_at > now:
            await store.put_push_subscription(sub, PUSH_CAP)
            counts["push_subscriptions"] += 1


async def copy_into(snapshot: Snapshot, store: MigrationTarget, *, cutoff_ms: int,
                    max_tokens_per_address: int) -> dict[str, int]:
    """Copy everything; returns counts by outcome. Raises StorageUnavailable when the destination fails, and
    ``SealingMismatch`` (before copying anything) when the destination would not open sealed records."""
    await check_sealing(snapshot, store)
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
    await copy_kept(snapshot, store, counts, cutoff_ms=cutoff_ms)
    return counts

"""``relayd migrate`` into Redis: copy a relay's snapshot (a SQLite file, a PostgreSQL database or another Redis)
into Redis.

The source is read without disturbing its relay (``storage.snapshot``). Queues
keep their per-recipient order and original ``queued_at``; receipts, keys
(signed fields included, ``created_at`` kept), ownership locks, the floors of
signed keys (so a deleted key's statement stays unpublishable), unexpired
REST tokens, the messageIds remembered as delivered, kept history and push
subscriptions come along (the last three as ``copy.copy_kept`` copies them).
Every copied message, receipt and key is remembered in Redis for
``ledger_ttl_ms``, so a re-run copies nothing twice, even what the Redis
relays delivered and deleted since. Messages already past retention are not
copied; sealed records only into a Redis that opens them (``copy.check_sealing``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..copy import check_sealing, copy_kept
from ..snapshot import Snapshot
from .store import RedisStore

T = TypeVar("T")
IN_FLIGHT = 64
"""Copies started at once; the store keeps each recipient's copies in source order."""
MIN_LEDGER_TTL_MS = 30 * 86_400_000


def now_ms() -> int:
    return int(time.time() * 1000)


def ledger_ttl_ms(retention_hours: float) -> int:
    """How long copies are remembered: twice the retention, at least 30 days."""
    return max(MIN_LEDGER_TTL_MS, int(2 * retention_hours * 3_600_000))


class _Window:
    """At most IN_FLIGHT copies at once; the first failure is raised by ``drain``."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    async def add(self, coro: Coroutine[Any, Any, T], on_done: Callable[[T], object]) -> None:
        if len(self.tasks) >= IN_FLIGHT:
            done, self.tasks = await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        task = asyncio.ensure_future(coro)

        def finished(t: asyncio.Task[T]) -> None:
            if not t.cancelled() and t.exception() is None:
                on_done(t.result())
        task.add_done_callback(finished)
        self.tasks.add(task)

    async def drain(self) -> None:
        tasks, self.tasks = self.tasks, set()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


async def migrate(snapshot: Snapshot, store: RedisStore, *, cutoff_ms: int,
                  ledger_ttl: int, max_tokens_per_address: int) -> dict[str, int]:
    """Copy everything; returns counts by outcome. Raises StorageUnavailable when Redis fails, and
    ``copy.SealingMismatch`` (before copying anything) when Redis would not open the source's sealed records.

    ``max_tokens_per_address``: the sign-in's cap on bearer tokens per address, kept as tokens are copied.
    """
    counts = dict.fromkeys(("messages_copied", "messages_already_copied", "messages_expired", "messages_refused",
                            "receipts_copied", "receipts_already_copied", "keys_copied",
                            "keys_already_copied", "keys_newer_in_redis", "locks", "key_floors", "tokens"), 0)

    def count_message(outcome: str) -> None:
        name = {"queued": "messages_copied", "full": "messages_refused"}.get(outcome, "messages_already_copied")
        counts[name] += 1

    def count_receipt(copied: bool) -> None:
        counts["receipts_copied" if copied else "receipts_already_copied"] += 1

    def count_key(outcome: str) -> None:
        counts[{"stored": "keys_copied", "newer": "keys_newer_in_redis"}.get(outcome, "keys_already_copied")] += 1

    await check_sealing(snapshot, store)
    window = _Window()
    try:
        await _copy(snapshot, store, window, cutoff_ms, ledger_ttl, max_tokens_per_address, counts, count_message,
                    count_receipt, count_key)
    finally:
        window.cancel()
    await copy_kept(snapshot, store, counts, cutoff_ms=cutoff_ms)
    return counts


async def _copy(snapshot: Snapshot, store: RedisStore, window: _Window, cutoff_ms: int, ledger_ttl: int,
                max_tokens: int,
                counts: dict[str, int], count_message: Callable[[str], None], count_receipt: Callable[[bool], None],
                count_key: Callable[[str], None]) -> None:
    async for msg in snapshot.messages():
        if msg.queued_at < cutoff_ms:
            counts["messages_expired"] += 1
            continue
        await window.add(store.migrate_message(msg, ledger_ttl), count_message)
    async for receipt, seq in snapshot.receipts():
        await window.add(store.migrate_receipt(receipt, seq, ledger_ttl), count_receipt)
    async for record in snapshot.keys():
        await window.add(store.migrate_key(record, ledger_ttl), count_key)
    async for address in snapshot.locks():
        await window.add(store.lock(address), lambda _: None)
        counts["locks"] += 1
    async for address, issued_at in snapshot.floors():
        await window.add(store.migrate_floor(address, issued_at), lambda _: None)
        counts["key_floors"] += 1
    async for token_hash, address, expires_at in snapshot.tokens(now_ms()):
        await window.add(store.save_token(token_hash, address, expires_at, max_tokens), lambda _: None)
        counts["tokens"] += 1
    await window.drain()

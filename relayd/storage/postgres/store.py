"""The PostgreSQL backend: the whole ``Store`` contract on one database (one relayd per database unless the cluster
runs on it, ``owner``).

Each operation is a job on the link's pool (``link``); an awaited write has
committed. An enqueue is one call of the ``relayd_enqueue`` function (one
round trip, see ``schema``), a batch one call of ``relayd_enqueue_many`` (one
statement: none of it is stored when it fails). The queue's SQL is in
``queue``, keys, locks and tokens in ``keys``, push subscriptions in
``push``, message history in ``history``. ``total()`` and ``stored_bytes()``
are kept in ``totals``; one recipient's enqueues keep their order (``order``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from . import history
from .keys import KEY_BYTES_SQL, PgKeyDirectory
from .link import PgLink
from .order import AddressOrder
from .push import PgPushTable
from .totals import Totals
from .queue import (
    EXPIRE_CHUNK,
    MESSAGE_COLUMNS,
    Delta,
    NumberingCollision,
    add_receipt_rows,
    delete_messages,
    enqueue_routed_row,
    enqueue_row,
    enqueue_rows,
    pairs,
    from_pg,
    to_pg,
    expire_chunk,
    message_from,
    record_delivered_rows,
    remove_receipt_rows,
    restore_rows,
    resync_numbering,
    shift_rows,
)
from ..store import (RECEIPT_BYTES, EnqueueResult, HistoryPage, KeyRecord, PushSubscription, QueuedMessage,
                     QueueLimits, Receipt)

log = logging.getLogger("relayd.storage")
T = TypeVar("T")


class PostgresStore:
    """A ``Store`` on PostgreSQL; see the module docstring."""

    name = "postgres"

    def __init__(self, url: str, *, pool_min: int = 1, pool_size: int = 10, connect_timeout_s: float = 5.0,
                 command_timeout_s: float = 5.0, probe_interval_s: float = 1.0, exclusive: bool = True) -> None:
        self._link = PgLink(url, pool_min=pool_min, pool_size=pool_size, connect_timeout_s=connect_timeout_s,
                            command_timeout_s=command_timeout_s, probe_interval_s=probe_interval_s,
                            exclusive=exclusive)
        self._link.health.on_recovery = self._totals_stale
        self._totals = Totals()
        self._keys = PgKeyDirectory(self._link, self._totals)
        self._push = PgPushTable(self._link, self._totals)
        self._history_ms = 0
        self._order = AddressOrder()

    @property
    def link(self) -> PgLink:
        return self._link

    @property
    def healthy(self) -> bool:
        return self._link.healthy

    @property
    def problem(self) -> str | None:
        return self._link.problem

    async def open(self) -> None:
        await self._link.open()
        if self._link.healthy:
            await self._read_totals()
        else:
            self._totals.stale = True

    async def close(self) -> None:
        await self._link.close()

    def _totals_stale(self) -> None:
        self._totals.stale = True

    async def _read_totals(self) -> None:
        async def job(conn: Any) -> tuple[int, int]:
            row = await conn.fetchrow(
                "SELECT COALESCE(SUM(count), 0) AS n, COALESCE(SUM(bytes), 0) AS b, COALESCE(SUM(receipts), 0) AS r, "
                f"(SELECT COALESCE(SUM({KEY_BYTES_SQL}), 0) FROM keys) AS k, {PgPushTable.bytes_sql()} AS p, "
                f"{history.BYTES_SQL} AS h FROM queues")
            return int(row["n"]), (int(row["b"]) + int(row["r"]) * RECEIPT_BYTES + int(row["k"]) + int(row["p"])
                                   + int(row["h"]))
        mark = self._totals.mark()
        messages, nbytes = await self._link.run(job, write=False)
        self._totals.refresh(mark, messages, nbytes)

    async def _tracked(self, run: Awaitable[tuple[T, Delta]]) -> T:
        """Await a write that returns (value, delta) and count its delta once (see ``totals``)."""
        self._totals.begin()
        delta: Delta = (0, 0)
        try:
            value, delta = await run
            return value
        finally:
            self._totals.end(*delta)

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        return (await self.enqueue_many([msg], limits))[0]

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        if not messages:
            return []
        with self._link.bounded():
            return await self._order.run((m.recipient for m in messages), lambda: self._enqueue_many(messages, limits))

    async def _enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        if self._totals.stale:
            await self._read_totals()

        async def job(conn: Any) -> tuple[list[tuple[EnqueueResult, int]], Delta]:
            if len(messages) == 1:
                outcome, delta = await enqueue_row(conn, messages[0], limits, self._totals.bytes)
                return [outcome], delta
            return await enqueue_rows(conn, messages, limits, self._totals.bytes)
        try:
            results = await self._tracked(self._link.run(job, write=True))
        except NumberingCollision:
            last = await self._link.run(resync_numbering, write=True)
            log.error("a message seq was already taken: something else numbered messages in this database; the "
                      "write failed and new messages now start after seq %d", last)
            raise
        for msg, (result, seq) in zip(messages, results):
            if result is EnqueueResult.QUEUED or result is EnqueueResult.DUPLICATE:
                msg.seq = seq
        return [result for result, _ in results]

    async def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str = "",
                             watch_ttl_ms: int = 0) -> tuple[EnqueueResult, dict[str, str]]:
        """``enqueue``, and the recipient's presence (``relayd.cluster``) read in the same transaction, under the
        recipient's presence lock: a session registered after this commit reads its backlog after it; one
        registered before is in the returned presence. ``watcher`` is told when that presence next changes."""
        if self._totals.stale:
            await self._read_totals()

        async def job(conn: Any) -> tuple[tuple[EnqueueResult, int, list[str]], Delta]:
            outcome, delta, presence = await enqueue_routed_row(conn, msg, limits, self._totals.bytes, watcher,
                                                                watch_ttl_ms)
            return (outcome[0], outcome[1], presence), delta
        try:
            result, seq, presence = await self._tracked(self._link.run(job, write=True))
        except NumberingCollision:
            last = await self._link.run(resync_numbering, write=True)
            log.error("a message seq was already taken: something else numbered messages in this database; the "
                      "write failed and new messages now start after seq %d", last)
            raise
        if result is EnqueueResult.QUEUED or result is EnqueueResult.DUPLICATE:
            msg.seq = seq
        return result, pairs(presence)

    async def restore_routed(self, messages: list[QueuedMessage]) -> tuple[int, dict[str, dict[str, str]]]:
        """``restore``, and each recipient's presence read in the same transaction (see ``enqueue_routed``)."""
        if not messages:
            return 0, {}

        async def job(conn: Any) -> tuple[tuple[int, dict[str, dict[str, str]]], Delta]:
            restored, delta = await restore_rows(conn, messages)
            found: dict[str, dict[str, str]] = {}
            for recipient in sorted({m.recipient for m in messages}):  # the queue rows are held: no lock cycle
                found[recipient] = pairs(await conn.fetchval("SELECT relayd_presence($1, '', 0)", recipient))
            return (restored, found), delta
        return await self._tracked(self._link.run(job, write=True, transaction=True))

    async def restore(self, messages: list[QueuedMessage]) -> int:
        if not messages:
            return 0

        async def job(conn: Any) -> tuple[int, Delta]:
            restored, (count, nbytes) = await restore_rows(conn, messages)
            for msg in messages:  # put back: its delivery did not happen, so history keeps no copy
                nbytes -= await history.forget(conn, msg)
            return restored, (count, nbytes)
        return await self._tracked(self._link.run(job, write=True, transaction=True))

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        if not messages:
            return
        until = self._keep_until()

        async def job(conn: Any) -> tuple[None, Delta]:
            await record_delivered_rows(conn, messages)
            return None, (await history.keep_live(conn, messages, until) if until else (0, 0))
        await self._tracked(self._link.run(job, write=True, transaction=bool(until)))

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        async def job(conn: Any) -> list[QueuedMessage]:
            if max_bytes is None:
                rows = await conn.fetch(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE recipient = $1 AND seq > $2 "
                                        "ORDER BY seq LIMIT $3", recipient, after_seq, max(limit, 0))
            else:  # the running total of sizes picks the page before any content is read
                rows = await conn.fetch(
                    f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE recipient = $1 AND seq IN (SELECT seq FROM "
                    "(SELECT seq, size, SUM(size) OVER (ORDER BY seq) AS running FROM (SELECT seq, size FROM "
                    "messages WHERE recipient = $1 AND seq > $2 ORDER BY seq LIMIT $3) page) sized "
                    "WHERE running - size < $4) ORDER BY seq", recipient, after_seq, max(limit, 0), max(max_bytes, 1))
            return [message_from(row) for row in rows]
        return await self._link.run(job, write=False)

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        if not seqs:
            return 0
        return await self._delete(recipient, "seq = ANY($2::bigint[])", list(dict.fromkeys(seqs)), delivered=True)

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        if not message_ids:
            return 0
        return await self._delete(recipient, "message_id = ANY($2::text[])",
                                  list(dict.fromkeys(to_pg(m) for m in message_ids)), delivered=True)

    async def clear(self, recipient: str) -> int:
        return await self._delete(recipient, "$2::int IS NULL", None, delivered=False)

    async def _delete(self, recipient: str, where: str, values: Any, *, delivered: bool) -> int:
        until = self._keep_until() if delivered else 0

        async def job(conn: Any) -> tuple[int, Delta]:
            kept = await history.keep_stored(conn, recipient, where, values, until) if until else 0
            removed, (count, nbytes) = await delete_messages(conn, recipient, where, values, delivered=delivered)
            return removed, (count, nbytes + kept)
        return await self._tracked(self._link.run(job, write=True, transaction=True))

    async def size(self, recipient: str) -> int:
        return (await self.backlog_size(recipient))[0]

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        async def job(conn: Any) -> tuple[int, int]:
            row = await conn.fetchrow("SELECT count, receipts FROM queues WHERE recipient = $1", recipient)
            return (int(row["count"]), int(row["receipts"])) if row else (0, 0)
        return await self._link.run(job, write=False)

    def total(self) -> int:
        return self._totals.messages

    def stored_bytes(self) -> int:
        return self._totals.bytes

    async def stats(self) -> dict[str, int]:
        async def job(conn: Any) -> dict[str, int]:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM queues WHERE count > 0) AS recipients, "
                "(SELECT COALESCE(SUM(count), 0) FROM queues) AS messages, "
                "(SELECT COALESCE(SUM(bytes), 0) FROM queues) AS bytes, "
                "(SELECT COALESCE(SUM(receipts), 0) FROM queues) AS receipts, (SELECT count(*) FROM keys) AS keys")
            return {name: int(row[name]) for name in ("recipients", "messages", "bytes", "receipts", "keys")}
        counts = await self._link.run(job, write=False)
        await self._read_totals()
        return counts

    async def expire(self, before_ms: int) -> int:
        """Delete old messages, receipts, delivered records and tokens a chunk per transaction."""
        removed = 0
        while True:
            counts = await self._tracked(self._link.run(lambda c: expire_chunk(c, before_ms), write=True,
                                                        transaction=True))
            removed += counts[0]
            if max(counts) < EXPIRE_CHUNK:
                return removed

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        return await self._link.run(lambda c: shift_rows(c, before_ms, delta_ms), write=True, transaction=True)

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        if not receipts:
            return 0
        async def job(conn: Any) -> tuple[int, Delta]:
            dropped = await add_receipt_rows(conn, receipts, max_per_recipient)
            return dropped, (0, (len(receipts) - dropped) * RECEIPT_BYTES)
        return await self._tracked(self._link.run(job, write=True, transaction=True))

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        async def job(conn: Any) -> list[Receipt]:
            rows = await conn.fetch("SELECT seq, reader, message_id, timestamp FROM receipts WHERE recipient = $1 "
                                    "ORDER BY seq LIMIT $2", recipient, max(limit, 0))
            return [Receipt(recipient, r["reader"], from_pg(r["message_id"]), int(r["timestamp"]), int(r["seq"]))
                    for r in rows]
        return await self._link.run(job, write=False)

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        if not seqs:
            return 0
        wanted = list(dict.fromkeys(seqs))
        async def job(conn: Any) -> tuple[int, Delta]:
            removed = await remove_receipt_rows(conn, recipient, wanted)
            return removed, (0, -removed * RECEIPT_BYTES)
        return await self._tracked(self._link.run(job, write=True, transaction=True))

    # History

    def keep_history(self, ms: int) -> None:
        self._history_ms = ms

    def _keep_until(self) -> int:
        return int(time.time() * 1000) + self._history_ms if self._history_ms else 0

    async def history(self, recipient: str, limit: int, before_ms: int | None = None,
                      sender: str | None = None) -> HistoryPage:
        return await self._link.run(lambda c: history.page(c, recipient, limit, before_ms, sender), write=False)

    async def delete_history(self, recipient: str, message_ids: list[str] | None) -> int:
        return await self._tracked(self._link.run(lambda c: history.delete(c, recipient, message_ids), write=True))

    async def expire_history(self, now_ms: int) -> int:
        removed = 0
        while True:
            gone = await self._tracked(self._link.run(lambda c: history.expire(c, now_ms), write=True))
            removed += gone
            if gone < history.EXPIRE_CHUNK:
                return removed

    async def copy_history(self, kept: list[tuple[QueuedMessage, int]]) -> int:
        """``relayd migrate``: keep these messages, each until its time (ms), unless kept already; how many
        were new."""
        if not kept:
            return 0
        return await self._tracked(self._link.run(lambda c: history.keep_copies(c, kept), write=True))

    async def queue_keys(self) -> list[str]:
        async def job(conn: Any) -> list[str]:
            rows = await conn.fetch("SELECT recipient FROM queues WHERE count > 0 OR receipts > 0 "
                                    "UNION SELECT DISTINCT recipient FROM history")
            return [r["recipient"] for r in rows]
        return await self._link.run(job, write=False)

    # Keys, ownership locks and tokens: the key directory's

    async def get_key(self, address: str) -> KeyRecord | None:
        return await self._keys.get_key(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        return await self._keys.get_keys(addresses)

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        return await self._keys.put_key(record)

    async def delete_key(self, address: str) -> bool:
        return await self._keys.delete_key(address)

    async def drop_unsigned_key(self, address: str) -> bool:
        return await self._keys.drop_unsigned_key(address)

    async def expire_keys(self, before_ms: int, now_ms: int) -> int:
        return await self._keys.expire_keys(before_ms, now_ms)

    async def key_floor(self, address: str) -> int | None:
        return await self._keys.key_floor(address)

    async def raise_key_floor(self, address: str, issued_at: int) -> None:
        await self._keys.raise_key_floor(address, issued_at)

    async def key_count(self) -> int:
        return await self._keys.key_count()

    async def is_locked(self, address: str) -> bool:
        return await self._keys.is_locked(address)

    async def lock(self, address: str) -> None:
        await self._keys.lock(address)

    async def save_token(self, token_hash: str, address: str, expires_at_ms: int, max_per_address: int) -> None:
        await self._keys.save_token(token_hash, address, expires_at_ms, max_per_address)

    async def token_address(self, token_hash: str, now_ms: int) -> str | None:
        return await self._keys.token_address(token_hash, now_ms)

    # Push subscriptions

    async def put_push_subscription(self, sub: PushSubscription, max_per_address: int) -> PushSubscription:
        return await self._push.put(sub, max_per_address)

    async def push_subscriptions(self, address: str, now_ms: int) -> list[PushSubscription]:
        return await self._push.of(address, now_ms)

    async def delete_push_subscription(self, address: str, sub_id: str) -> bool:
        return await self._push.delete(address, sub_id)

    async def extend_push_subscriptions(self, address: str, expires_at_ms: int) -> None:
        await self._push.extend(address, expires_at_ms)

    async def expire_push_subscriptions(self, now_ms: int) -> int:
        return await self._push.expire(now_ms)

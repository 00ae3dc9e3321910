"""Message history's SQL on PostgreSQL (``[history] days``): delivered messages kept as stored, a page of them,
deletion by their recipient and expiry.

Like ``queue``, the writers return the change to the store-wide totals as a
``Delta``: history counts in the byte total (the storage budget) and never in
the message total. A message is kept once per (recipient, messageId,
lower-cased sender): a second delivery of the same message keeps the first
copy. ``messageId`` and content are stored through ``to_pg`` as in
``messages``.
"""

from __future__ import annotations

from typing import Any

from ...frames import utf8_len
from ..store import HistoryPage, QueuedMessage
from .queue import Delta, from_pg, to_pg

EXPIRE_CHUNK = 1000
_COLUMNS = "recipient, message_id, sender_key, sender, content, timestamp, queued_at, seq, kept_until, size"


async def keep_stored(conn: Any, recipient: str, where: str, values: Any, until: int) -> int:
    """Copy ``recipient``'s messages matching ``where`` (``$2`` is ``values``), about to be deleted as delivered,
    into history; the bytes it adds. Run before the delete, in its transaction."""
    added = await conn.fetchval(
        f"WITH kept AS (INSERT INTO history ({_COLUMNS}) SELECT recipient, message_id, lower(sender), sender, "
        f"content, timestamp, queued_at, seq, $3, size FROM messages WHERE recipient = $1 AND {where} "
        "ON CONFLICT DO NOTHING RETURNING size) SELECT COALESCE(SUM(size), 0) FROM kept", recipient, values, until)
    return int(added)


async def keep_live(conn: Any, messages: list[QueuedMessage], until: int) -> Delta:
    """Keep messages delivered live (never stored)."""
    return (await keep_copies(conn, [(m, until) for m in messages]))[1]


async def keep_copies(conn: Any, kept: list[tuple[QueuedMessage, int]]) -> tuple[int, Delta]:
    """Keep each message until its own time (``relayd migrate``'s copies keep the source's); how many were new."""
    messages = [m for m, _ in kept]
    row = await conn.fetchrow(
        f"WITH kept AS (INSERT INTO history ({_COLUMNS}) SELECT r, m, lower(s), s, c, t, q, n, k, z FROM "
        "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], "
        "$8::bigint[], $9::bigint[]) AS u(r, m, s, c, t, q, n, k, z) ON CONFLICT DO NOTHING RETURNING size) "
        "SELECT count(*) AS n, COALESCE(SUM(size), 0) AS b FROM kept",
        [m.recipient for m in messages], [to_pg(m.message_id) for m in messages], [m.sender for m in messages],
        [to_pg(m.content) for m in messages], [m.timestamp for m in messages], [m.queued_at for m in messages],
        [m.seq for m in messages], [until for _, until in kept], [utf8_len(m.content) for m in messages])
    return int(row["n"]), (0, int(row["b"]))


async def forget(conn: Any, msg: QueuedMessage) -> int:
    """Forget the kept copy of a message put back in its queue (its delivery did not happen); bytes freed."""
    freed = await conn.fetchval(
        "WITH gone AS (DELETE FROM history WHERE recipient = $1 AND message_id = $2 AND sender_key = lower($3) "
        "RETURNING size) SELECT COALESCE(SUM(size), 0) FROM gone", msg.recipient, to_pg(msg.message_id), msg.sender)
    return int(freed)


async def page(conn: Any, recipient: str, limit: int, before_ms: int | None, sender: str | None) -> HistoryPage:
    rows = await conn.fetch(
        "SELECT recipient, sender, message_id, content, timestamp, queued_at, seq FROM history "
        "WHERE recipient = $1 AND ($2::bigint IS NULL OR timestamp < $2) AND ($3::text IS NULL OR sender_key = "
        "lower($3)) ORDER BY timestamp DESC, seq DESC LIMIT $4", recipient, before_ms, sender, max(limit, 0) + 1)
    return HistoryPage([QueuedMessage(r["recipient"], r["sender"], from_pg(r["message_id"]), from_pg(r["content"]),
                                      int(r["timestamp"]), int(r["queued_at"]), int(r["seq"]))
                        for r in rows[:limit]], len(rows) > limit)


async def delete(conn: Any, recipient: str, message_ids: list[str] | None) -> tuple[int, Delta]:
    ids = None if message_ids is None else [to_pg(m) for m in message_ids]
    row = await conn.fetchrow(
        "WITH gone AS (DELETE FROM history WHERE recipient = $1 AND ($2::text[] IS NULL OR message_id = ANY($2)) "
        "RETURNING size) SELECT count(*) AS n, COALESCE(SUM(size), 0) AS b FROM gone", recipient, ids)
    return int(row["n"]), (0, -int(row["b"]))


async def expire(conn: Any, now_ms: int) -> tuple[int, Delta]:
    row = await conn.fetchrow(
        "WITH gone AS (DELETE FROM history WHERE ctid IN (SELECT ctid FROM history WHERE kept_until <= $1 "
        "ORDER BY kept_until LIMIT $2) RETURNING size) SELECT count(*) AS n, COALESCE(SUM(size), 0) AS b FROM gone",
        now_ms, EXPIRE_CHUNK)
    return int(row["n"]), (0, -int(row["b"]))


BYTES_SQL = "(SELECT COALESCE(SUM(size), 0) FROM history)"
"""What history counts in the storage budget."""

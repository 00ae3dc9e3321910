"""The offline queue's SQL on PostgreSQL: enqueue through ``relayd_enqueue``, deletes that keep counters exact, receipts,
and the messageIds known as delivered.

Every function takes a connection (inside the caller's transaction where it
writes more than one statement) and returns its value with the change to the
store-wide message and byte totals as a ``Delta``. A writer that touches a
recipient's messages locks that recipient's ``queues`` row first, so the
counters stay exact and a recipient's seqs commit in order. Senders are
compared case-insensitively by ``lower()`` on both sides, as the
``messages_ident`` index and the ``delivered`` table store them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ...frames import utf8_len
from ..store import RECEIPT_BYTES, EnqueueResult, QueuedMessage, QueueLimits, Receipt, StorageUnavailable

log = logging.getLogger("relayd.storage")

Delta = tuple[int, int]
NONE: Delta = (0, 0)
EXPIRE_CHUNK = 1000

_RESULTS = {r.value: r for r in EnqueueResult}
ENQUEUE = ("SELECT o_result, o_seq, o_added, o_added_bytes FROM relayd_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, "
           "$10, $11, $12)")
_ESC = "\uffff"


def to_pg(text: str) -> str:
    """``text`` as PostgreSQL can store it: its text type holds no NUL, so NUL becomes U+FFFF "0" (and U+FFFF
    itself U+FFFF U+FFFF, so the mapping stays one to one). Message contents and messageIds may hold either."""
    if "\0" not in text and _ESC not in text:
        return text
    return text.replace(_ESC, _ESC + _ESC).replace("\0", _ESC + "0")


def from_pg(text: str) -> str:
    """The inverse of ``to_pg``."""
    if _ESC not in text:
        return text
    return re.sub("\uffff(.)", lambda m: "\0" if m.group(1) == "0" else m.group(1), text, flags=re.S)
MESSAGE_COLUMNS = "seq, recipient, sender, message_id, content, timestamp, queued_at"
_LOCK_QUEUE = ("INSERT INTO queues AS q (recipient, count, bytes, receipts) VALUES ($1, 0, 0, 0) "
               "ON CONFLICT (recipient) DO UPDATE SET count = q.count")
LOCK_QUEUES = ("INSERT INTO queues AS q (recipient, count, bytes, receipts) SELECT r, 0, 0, 0 FROM unnest($1::text[]) "
               "AS u(r) ORDER BY r ON CONFLICT (recipient) DO UPDATE SET count = q.count")
"""Lock the ``queues`` rows of several recipients at once, in address order (the order every writer keeps)."""
_STORED = "SELECT seq FROM messages WHERE recipient = $1 AND message_id = $2 AND lower(sender) = lower($3)"
_LATER_DELIVERY = ("ON CONFLICT (recipient, message_id, sender) DO UPDATE SET "
                   "queued_at = GREATEST(delivered.queued_at, excluded.queued_at)")
"""A message recorded as delivered twice is remembered from the later ``queued_at``."""
_FORGET_EMPTY = "DELETE FROM queues WHERE recipient = $1 AND count <= 0 AND receipts <= 0"


async def enqueue_row(conn: Any, msg: QueuedMessage, limits: QueueLimits,
                      stored_total: int) -> tuple[tuple[EnqueueResult, int], Delta]:
    """One ``relayd_enqueue`` call: ((result, seq), delta); the seq is the new one or the stored duplicate's.

    A seq already taken (something else numbered messages) raises ``NumberingCollision``: nothing is written,
    and the caller moves the numbering on (``resync_numbering``) once the transaction is over.
    """
    import asyncpg
    try:
        row = await conn.fetchrow(ENQUEUE, msg.recipient, msg.sender, to_pg(msg.message_id), msg.timestamp,
                                  msg.queued_at, to_pg(msg.content), utf8_len(msg.content), limits.max_messages,
                                  limits.max_bytes, limits.drop_oldest, limits.max_total_bytes, stored_total)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "messages_pkey":
            raise
        raise NumberingCollision("message numbering collided with a stored message; nothing was written") from exc
    result = _RESULTS[row["o_result"]]
    return (result, int(row["o_seq"])), (int(row["o_added"]), int(row["o_added_bytes"]))


ENQUEUE_ROUTED = ("SELECT o_result, o_seq, o_added, o_added_bytes, o_presence FROM relayd_enqueue_routed($1, $2, $3, "
                  "$4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)")


async def enqueue_routed_row(conn: Any, msg: QueuedMessage, limits: QueueLimits, stored_total: int, watcher: str,
                             watch_ttl_ms: int) -> tuple[tuple[EnqueueResult, int], Delta, list[str]]:
    """``enqueue_row``, and the recipient's presence (flat: instance, kind, ...) read under its presence lock,
    watched for ``watcher`` (``''``: none) for ``watch_ttl_ms``; one statement, so one transaction."""
    import asyncpg
    try:
        row = await conn.fetchrow(ENQUEUE_ROUTED, msg.recipient, msg.sender, to_pg(msg.message_id), msg.timestamp,
                                  msg.queued_at, to_pg(msg.content), utf8_len(msg.content), limits.max_messages,
                                  limits.max_bytes, limits.drop_oldest, limits.max_total_bytes, stored_total,
                                  watcher, watch_ttl_ms)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "messages_pkey":
            raise
        raise NumberingCollision("message numbering collided with a stored message; nothing was written") from exc
    return ((_RESULTS[row["o_result"]], int(row["o_seq"])), (int(row["o_added"]), int(row["o_added_bytes"])),
            list(row["o_presence"] or ()))


def pairs(flat: Any) -> dict[str, str]:
    """A presence as ``relayd_presence`` returns it (instance, kind, ...) as instance -> kind."""
    items = list(flat or ())
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


ENQUEUE_MANY = ("SELECT o_result, o_seq, o_added, o_added_bytes FROM relayd_enqueue_many($1::text[], $2::text[], "
                "$3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[], $8, $9, $10, $11, $12)")


async def enqueue_rows(conn: Any, messages: list[QueuedMessage], limits: QueueLimits,
                       stored_total: int) -> tuple[list[tuple[EnqueueResult, int]], Delta]:
    """``enqueue_row`` for each message, in order, in one call of ``relayd_enqueue_many`` (one round trip; a
    single statement, so all or nothing)."""
    import asyncpg
    try:
        rows = await conn.fetch(ENQUEUE_MANY, [m.recipient for m in messages], [m.sender for m in messages],
                                [to_pg(m.message_id) for m in messages], [m.timestamp for m in messages],
                                [m.queued_at for m in messages], [to_pg(m.content) for m in messages],
                                [utf8_len(m.content) for m in messages], limits.max_messages, limits.max_bytes,
                                limits.drop_oldest, limits.max_total_bytes, stored_total)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "messages_pkey":
            raise
        raise NumberingCollision("message numbering collided with a stored message; nothing was written") from exc
    return ([(_RESULTS[r["o_result"]], int(r["o_seq"])) for r in rows],
            (sum(int(r["o_added"]) for r in rows), sum(int(r["o_added_bytes"]) for r in rows)))


class NumberingCollision(StorageUnavailable):
    """A message seq was already taken: something else numbered messages in this database; nothing was written."""


async def resync_numbering(conn: Any) -> int:
    """Move ``message_seq`` past every stored seq; returns the last seq now taken."""
    return int(await conn.fetchval("SELECT setval('message_seq', GREATEST((SELECT COALESCE(MAX(seq), 1) FROM messages), "
                       "(SELECT last_value FROM message_seq)))"))


async def restore_rows(conn: Any, messages: list[QueuedMessage]) -> tuple[int, Delta]:
    """Put messages back past the per-queue caps, each with its seq when it had one (and it is free); those
    still stored are skipped, those known as delivered are no longer."""
    restored = added = 0
    await conn.execute(LOCK_QUEUES, sorted({m.recipient for m in messages}))
    for msg in messages:
        if await conn.fetchval(_STORED, msg.recipient, to_pg(msg.message_id), msg.sender) is not None:
            continue
        seq = msg.seq
        if seq <= 0 or await conn.fetchval("SELECT 1 FROM messages WHERE seq = $1", seq) is not None:
            if seq > 0:
                log.warning("a message put back had seq %d, which another message holds; it gets a new one", seq)
            seq = int(await conn.fetchval("SELECT nextval('message_seq')"))
        else:
            await conn.execute("SELECT setval('message_seq', $1) WHERE $1 > (SELECT last_value FROM message_seq)",
                               seq)
        size = utf8_len(msg.content)
        await conn.execute("INSERT INTO messages (seq, recipient, sender, message_id, timestamp, queued_at, size, "
                           "content) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", seq, msg.recipient, msg.sender,
                           to_pg(msg.message_id), msg.timestamp, msg.queued_at, size, to_pg(msg.content))
        msg.seq = seq
        await conn.execute("DELETE FROM delivered WHERE recipient = $1 AND message_id = $2 AND sender = lower($3)",
                           msg.recipient, to_pg(msg.message_id), msg.sender)
        await conn.execute("UPDATE queues SET count = count + 1, bytes = bytes + $2 WHERE recipient = $1",
                           msg.recipient, size)
        restored, added = restored + 1, added + size
    return restored, (restored, added)


async def record_delivered_rows(conn: Any, messages: list[QueuedMessage]) -> None:
    """Remember messages as delivered (a second record of one keeps the later ``queued_at``)."""
    latest: dict[tuple[str, str, str], int] = {}
    for m in messages:
        key = (m.recipient, to_pg(m.message_id), m.sender.lower())
        latest[key] = max(latest.get(key, m.queued_at), m.queued_at)
    keys = list(latest)
    await conn.execute(
        "INSERT INTO delivered (recipient, message_id, sender, queued_at) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) " + _LATER_DELIVERY,
        [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], [latest[k] for k in keys])


async def delete_messages(conn: Any, recipient: str, where: str, values: list[Any], *,
                          delivered: bool) -> tuple[int, Delta]:
    """Delete ``recipient``'s messages matching ``where`` (``$2`` is ``values``), keeping its counters exact;
    ``delivered``: remember their (recipient, messageId, sender) as delivered."""
    await conn.execute(_LOCK_QUEUE, recipient)
    rows = await conn.fetch(f"DELETE FROM messages WHERE recipient = $1 AND {where} "
                            "RETURNING message_id, lower(sender) AS sender, queued_at, size", recipient, values)
    if not rows:
        await conn.execute(_FORGET_EMPTY, recipient)
        return 0, NONE
    if delivered:
        latest: dict[tuple[str, str], int] = {}
        for r in rows:
            key = (r["message_id"], r["sender"])
            latest[key] = max(latest.get(key, r["queued_at"]), r["queued_at"])
        await conn.execute(
            "INSERT INTO delivered (recipient, message_id, sender, queued_at) "
            "SELECT $1, m, s, q FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(m, s, q) " + _LATER_DELIVERY,
            recipient, [k[0] for k in latest], [k[1] for k in latest], list(latest.values()))
    freed = sum(int(r["size"]) for r in rows)
    await conn.execute("UPDATE queues SET count = count - $2, bytes = bytes - $3 WHERE recipient = $1",
                       recipient, len(rows), freed)
    await conn.execute(_FORGET_EMPTY, recipient)
    return len(rows), (-len(rows), -freed)


async def expire_chunk(conn: Any, before_ms: int) -> tuple[tuple[int, int, int], Delta]:
    """Delete up to a chunk each of messages, receipts and delivered records older than ``before_ms``, and
    expired tokens. Returns ((messages, receipts, delivered records) removed, delta)."""
    old = await conn.fetch("SELECT seq, recipient FROM messages WHERE queued_at < $1 ORDER BY queued_at LIMIT $2",
                           before_ms, EXPIRE_CHUNK)
    per_recipient: dict[str, list[int]] = {}
    for r in old:
        per_recipient.setdefault(r["recipient"], []).append(int(r["seq"]))
    removed, count, nbytes = 0, 0, 0
    for recipient in sorted(per_recipient):
        n, (dc, db) = await delete_messages(conn, recipient, "seq = ANY($2::bigint[])", per_recipient[recipient],
                                            delivered=False)
        removed, count, nbytes = removed + n, count + dc, nbytes + db
    gone = await conn.fetch("SELECT seq, recipient FROM receipts WHERE timestamp < $1 ORDER BY timestamp LIMIT $2",
                            before_ms, EXPIRE_CHUNK)
    await delete_receipts(conn, [(int(r["seq"]), r["recipient"]) for r in gone])
    nbytes -= len(gone) * RECEIPT_BYTES
    forgotten = await conn.fetchval(
        "WITH gone AS (DELETE FROM delivered WHERE ctid IN (SELECT ctid FROM delivered WHERE queued_at < $1 "
        "ORDER BY queued_at LIMIT $2) RETURNING 1) SELECT count(*) FROM gone", before_ms, EXPIRE_CHUNK)
    await conn.execute("DELETE FROM tokens WHERE expires_at <= $1", before_ms)
    return (removed, len(gone), int(forgotten)), (count, nbytes)


async def shift_rows(conn: Any, before_ms: int, delta_ms: int) -> int:
    """Move the times of messages, receipts and delivered records older than ``before_ms`` by ``delta_ms``."""
    moved = 0
    for sql in ("UPDATE messages SET queued_at = queued_at + $1 WHERE queued_at < $2",
                "UPDATE receipts SET timestamp = timestamp + $1 WHERE timestamp < $2",
                "UPDATE delivered SET queued_at = queued_at + $1 WHERE queued_at < $2"):
        status = await conn.execute(sql, delta_ms, before_ms)
        moved += int(status.rsplit(" ", 1)[-1])
    return moved


async def add_receipt_rows(conn: Any, receipts: list[Receipt], cap: int) -> int:
    """Insert receipts; past ``cap`` per recipient the oldest are deleted. Returns how many were dropped."""
    per_recipient: dict[str, list[Receipt]] = {}
    for r in receipts:
        per_recipient.setdefault(r.recipient, []).append(r)
    dropped = 0
    for recipient in sorted(per_recipient):
        batch = per_recipient[recipient]
        stored = await conn.fetchval(
            "INSERT INTO queues AS q (recipient, count, bytes, receipts) VALUES ($1, 0, 0, $2) ON CONFLICT "
            "(recipient) DO UPDATE SET receipts = q.receipts + excluded.receipts RETURNING q.receipts",
            recipient, len(batch))
        seqs = await conn.fetch(
            "INSERT INTO receipts (recipient, reader, message_id, timestamp) SELECT $1, r, m, t FROM "
            "unnest($2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS u(r, m, t, n) ORDER BY n RETURNING seq",
            recipient, [r.reader for r in batch], [to_pg(r.message_id) for r in batch], [r.timestamp for r in batch])
        for r, row in zip(batch, sorted(int(s["seq"]) for s in seqs)):
            r.seq = row
        if stored > cap:
            rows = await conn.fetch("SELECT seq, recipient FROM receipts WHERE recipient = $1 ORDER BY seq LIMIT $2",
                                    recipient, stored - cap)
            await delete_receipts(conn, [(int(r["seq"]), r["recipient"]) for r in rows])
            dropped += len(rows)
    return dropped


async def remove_receipt_rows(conn: Any, recipient: str, seqs: list[int]) -> int:
    rows = await conn.fetch("SELECT seq FROM receipts WHERE recipient = $1 AND seq = ANY($2::bigint[])",
                            recipient, seqs)
    await delete_receipts(conn, [(int(r["seq"]), recipient) for r in rows])
    return len(rows)


async def delete_receipts(conn: Any, rows: list[tuple[int, str]]) -> None:
    per_recipient: dict[str, list[int]] = {}
    for seq, recipient in rows:
        per_recipient.setdefault(recipient, []).append(seq)
    for recipient in sorted(per_recipient):
        seqs = per_recipient[recipient]
        gone = await conn.fetchval("WITH gone AS (DELETE FROM receipts WHERE recipient = $1 AND seq = ANY($2::bigint[]) "
                                   "RETURNING 1) SELECT count(*) FROM gone", recipient, seqs)
        await conn.execute("UPDATE queues SET receipts = receipts - $2 WHERE recipient = $1", recipient, int(gone))
        await conn.execute(_FORGET_EMPTY, recipient)


def message_from(row: Any) -> QueuedMessage:
    return QueuedMessage(row["recipient"], row["sender"], from_pg(row["message_id"]), from_pg(row["content"]),
                         int(row["timestamp"]), int(row["queued_at"]), int(row["seq"]))

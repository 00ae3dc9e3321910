"""The offline queue's SQL, run on the writer thread: enqueue within the limits, deletes that keep counters exact.

Every function takes the writer's connection inside its transaction and
returns ``(value, Delta)``: the change to the store-wide message and byte
totals, applied by the writer only if the transaction commits. Seqs come
from ``SeqCounter``, so the insert needs no AUTOINCREMENT bookkeeping.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from ...frames import utf8_len
from ..store import EnqueueResult, QueuedMessage, QueueLimits, Receipt

IN_CHUNK = 500  # stays far below SQLite's bound-parameter limit on old builds
DROP_CHUNK = 64
EXPIRE_CHUNK = 1000

T = TypeVar("T")
Delta = tuple[int, int]
"""(messages, content bytes) added to (or, negative, removed from) the store-wide totals."""
NONE: Delta = (0, 0)
_INSERT = ("INSERT OR IGNORE INTO messages (seq, recipient, sender, message_id, timestamp, queued_at, size, content) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_COUNT = ("INSERT INTO queues (recipient, count, bytes, receipts) VALUES (?, ?, ?, 0) "
          "ON CONFLICT (recipient) DO UPDATE SET count = count + excluded.count, bytes = bytes + excluded.bytes")


class SeqCounter:
    """The next message seq: one past the largest stored, kept on the writer thread."""

    __slots__ = ("last",)

    def __init__(self, last: int) -> None:
        self.last = last

    def take(self) -> int:
        self.last += 1
        return self.last


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def enqueue_row(conn: sqlite3.Connection, msg: QueuedMessage, limits: QueueLimits, seqs: SeqCounter,
                stored_bytes: int) -> tuple[tuple[EnqueueResult, int], Delta]:
    """Insert ``msg`` within ``limits``: one counter read, the insert (the unique index finds duplicates)."""
    size = utf8_len(msg.content)
    if limits.max_total_bytes and stored_bytes + size > limits.max_total_bytes:
        if _is_stored(conn, msg):
            return (EnqueueResult.DUPLICATE, 0), NONE
        return (EnqueueResult.NO_SPACE, 0), NONE
    if size > limits.max_bytes:
        return (EnqueueResult.FULL, 0), NONE
    counters = conn.execute("SELECT count, bytes FROM queues WHERE recipient = ?", (msg.recipient,)).fetchone()
    count, used = counters or (0, 0)
    if count >= limits.max_messages or used + size > limits.max_bytes:
        if _is_stored(conn, msg):
            return (EnqueueResult.DUPLICATE, 0), NONE
        if not limits.drop_oldest:
            return (EnqueueResult.FULL, 0), NONE
    seq = seqs.take()
    if conn.execute(_INSERT, (seq, msg.recipient, msg.sender, msg.message_id, msg.timestamp, msg.queued_at, size,
                              msg.content)).rowcount == 0:
        seqs.last -= 1
        return (EnqueueResult.DUPLICATE, 0), NONE
    dropped, freed = _drop_oldest(conn, msg.recipient, count, used, size, limits) if count else (0, 0)
    conn.execute(_COUNT, (msg.recipient, 1 - dropped, size - freed))
    return (EnqueueResult.QUEUED, seq), (1 - dropped, size - freed)


def _is_stored(conn: sqlite3.Connection, msg: QueuedMessage) -> bool:
    return conn.execute("SELECT 1 FROM messages WHERE recipient = ? AND message_id = ? AND lower(sender) = ?",
                        (msg.recipient, msg.message_id, msg.sender.lower())).fetchone() is not None


def _drop_oldest(conn: sqlite3.Connection, recipient: str, count: int, used: int, size: int,
                 limits: QueueLimits) -> tuple[int, int]:
    """Make room for ``size`` more bytes (the new message is already in): (messages, bytes) dropped."""
    dropped = freed = 0
    while count and (count >= limits.max_messages or used + size > limits.max_bytes):
        oldest = conn.execute("SELECT seq, size FROM messages WHERE recipient = ? ORDER BY seq LIMIT ?",
                              (recipient, DROP_CHUNK)).fetchall()
        victims = []
        for seq, victim_size in oldest:
            if not (count and (count >= limits.max_messages or used + size > limits.max_bytes)):
                break
            victims.append(seq)
            count, used = count - 1, used - victim_size
            dropped, freed = dropped + 1, freed + victim_size
        if not victims:
            break
        conn.execute(f"DELETE FROM messages WHERE seq IN ({marks(len(victims))})", victims)
    return dropped, freed


def restore_rows(conn: sqlite3.Connection, messages: list[QueuedMessage], seqs: SeqCounter) -> tuple[int, Delta]:
    """Put messages back (their seq kept when they had one), past the per-queue caps; duplicates skipped."""
    restored = added = 0
    for msg in messages:
        if msg.seq <= 0:
            msg.seq = seqs.take()
        size = utf8_len(msg.content)
        if conn.execute(_INSERT, (msg.seq, msg.recipient, msg.sender, msg.message_id, msg.timestamp,
                                  msg.queued_at, size, msg.content)).rowcount:
            conn.execute(_COUNT, (msg.recipient, 1, size))
            restored, added = restored + 1, added + size
    return restored, (restored, added)


def delete_where(conn: sqlite3.Connection, recipient: str, column: str, values: list[Any]) -> tuple[int, Delta]:
    rows: list[tuple[int, str, int]] = []
    for part in chunks(values):
        rows += conn.execute(f"SELECT seq, recipient, size FROM messages WHERE recipient = ? "
                             f"AND {column} IN ({marks(len(part))})", (recipient, *part)).fetchall()
    return delete_rows(conn, rows)


def delete_rows(conn: sqlite3.Connection, rows: list[tuple[int, str, int]]) -> tuple[int, Delta]:
    """Delete messages given as (seq, recipient, size) and keep the counters exact."""
    per_recipient: dict[str, list[int]] = {}
    freed = 0
    for _, recipient, size in rows:
        counts = per_recipient.setdefault(recipient, [0, 0])
        counts[0] += 1
        counts[1] += size
        freed += size
    for part in chunks([r[0] for r in rows]):
        conn.execute(f"DELETE FROM messages WHERE seq IN ({marks(len(part))})", part)
    for recipient, (count, size) in per_recipient.items():
        conn.execute("UPDATE queues SET count = count - ?, bytes = bytes - ? WHERE recipient = ?",
                     (count, size, recipient))
        _forget_empty_queue(conn, recipient)
    return len(rows), (-len(rows), -freed)


def _forget_empty_queue(conn: sqlite3.Connection, recipient: str) -> None:
    conn.execute("DELETE FROM queues WHERE recipient = ? AND count <= 0 AND receipts <= 0", (recipient,))


def expire_chunk(conn: sqlite3.Connection, before_ms: int) -> tuple[tuple[int, int], Delta]:
    """Delete up to a chunk of messages and of receipts older than ``before_ms``, and expired tokens.

    Returns ((messages, receipts) removed, delta).
    """
    old = conn.execute("SELECT seq, recipient, size FROM messages WHERE queued_at < ? ORDER BY queued_at LIMIT ?",
                       (before_ms, EXPIRE_CHUNK)).fetchall()
    removed, delta = delete_rows(conn, old)
    gone = conn.execute("SELECT seq, recipient FROM receipts WHERE timestamp < ? ORDER BY timestamp LIMIT ?",
                        (before_ms, EXPIRE_CHUNK)).fetchall()
    _delete_receipts(conn, gone)
    conn.execute("DELETE FROM tokens WHERE expires_at <= ?", (before_ms,))
    return (removed, len(gone)), delta


def add_receipt_rows(conn: sqlite3.Connection, receipts: list[Receipt], cap: int) -> tuple[int, Delta]:
    """Insert receipts; past ``cap`` per recipient the oldest are deleted. Returns how many were dropped."""
    dropped = 0
    per_recipient: dict[str, int] = {}
    for r in receipts:
        cur = conn.execute("INSERT INTO receipts (recipient, reader, message_id, timestamp) VALUES (?, ?, ?, ?)",
                           (r.recipient, r.reader, r.message_id, r.timestamp))
        r.seq = cur.lastrowid or 0
        per_recipient[r.recipient] = per_recipient.get(r.recipient, 0) + 1
    for recipient, added in per_recipient.items():
        stored = conn.execute("INSERT INTO queues (recipient, count, bytes, receipts) VALUES (?, 0, 0, ?) "
                              "ON CONFLICT (recipient) DO UPDATE SET receipts = receipts + excluded.receipts "
                              "RETURNING receipts", (recipient, added)).fetchone()[0]
        if stored > cap:
            excess = stored - cap
            rows = conn.execute("SELECT seq, recipient FROM receipts WHERE recipient = ? ORDER BY seq LIMIT ?",
                                (recipient, excess)).fetchall()
            _delete_receipts(conn, rows)
            dropped += len(rows)
    return dropped, NONE


def remove_receipt_rows(conn: sqlite3.Connection, recipient: str, seqs: list[int]) -> tuple[int, Delta]:
    rows: list[tuple[int, str]] = []
    for part in chunks(seqs):
        rows += conn.execute(f"SELECT seq, recipient FROM receipts WHERE recipient = ? AND seq IN "
                             f"({marks(len(part))})", (recipient, *part)).fetchall()
    _delete_receipts(conn, rows)
    return len(rows), NONE


def _delete_receipts(conn: sqlite3.Connection, rows: list[tuple[int, str]]) -> None:
    per_recipient: dict[str, int] = {}
    for _, recipient in rows:
        per_recipient[recipient] = per_recipient.get(recipient, 0) + 1
    for part in chunks([r[0] for r in rows]):
        conn.execute(f"DELETE FROM receipts WHERE seq IN ({marks(len(part))})", part)
    for recipient, count in per_recipient.items():
        conn.execute("UPDATE queues SET receipts = receipts - ? WHERE recipient = ?", (count, recipient))
        _forget_empty_queue(conn, recipient)

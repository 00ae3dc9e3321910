"""The offline queue's SQL, run on the writer thread: enqueue within the limits, deletes that keep counters exact."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from ..frames import utf8_len
from .store import EnqueueResult

IN_CHUNK = 500  # stays far below SQLite's bound-parameter limit on old builds
DROP_CHUNK = 64

T = TypeVar("T")


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def marks(n: int) -> str:
    return ",".join("?" * n)




def enqueue_row(conn: sqlite3.Connection, row: tuple[str, str, str, str, int, int],
             max_messages: int, max_bytes: int, drop_oldest: bool) -> tuple[tuple[EnqueueResult, int], int]:
    recipient, sender, message_id, content = row[:4]
    if conn.execute("SELECT 1 FROM messages WHERE sender = ? AND recipient = ? AND message_id = ?",
                    (sender, recipient, message_id)).fetchone():
        return (EnqueueResult.DUPLICATE, 0), 0
    size = utf8_len(content)
    if size > max_bytes:
        return (EnqueueResult.FULL, 0), 0
    counters = conn.execute("SELECT count, bytes FROM queues WHERE recipient = ?",
                            (recipient,)).fetchone()
    count, used = counters or (0, 0)
    dropped = 0
    while count and (count >= max_messages or used + size > max_bytes):
        if not drop_oldest:
            return (EnqueueResult.FULL, 0), 0
        oldest = conn.execute("SELECT seq, size FROM messages WHERE recipient = ? ORDER BY seq "
                              "LIMIT ?", (recipient, DROP_CHUNK)).fetchall()
        if not oldest:
            count = used = 0
            break
        victims = []
        for seq, victim_size in oldest:
            if not (count and (count >= max_messages or used + size > max_bytes)):
                break
            victims.append(seq)
            count, used = count - 1, used - victim_size
        conn.execute(f"DELETE FROM messages WHERE seq IN ({marks(len(victims))})", victims)
        dropped += len(victims)
    cur = conn.execute("INSERT INTO messages (recipient, sender, message_id, content, timestamp, "
                       "queued_at, size) VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, size))
    conn.execute("INSERT INTO queues (recipient, count, bytes) VALUES (?, ?, ?) "
                 "ON CONFLICT (recipient) DO UPDATE SET count = excluded.count, "
                 "bytes = excluded.bytes", (recipient, count + 1, used + size))
    return (EnqueueResult.QUEUED, cur.lastrowid), 1 - dropped


def delete_where(conn: sqlite3.Connection, recipient: str, column: str, values: list[Any]) -> int:
    rows: list[tuple[int, str, int]] = []
    for part in chunks(values):
        rows += conn.execute(f"SELECT seq, recipient, size FROM messages WHERE recipient = ? "
                             f"AND {column} IN ({marks(len(part))})", (recipient, *part)).fetchall()
    return delete_rows(conn, rows)


def delete_rows(conn: sqlite3.Connection, rows: list[tuple[int, str, int]]) -> int:
    """Delete messages given as (seq, recipient, size) and keep the counters exact."""
    per_recipient: dict[str, list[int]] = {}
    for seq, recipient, size in rows:
        counts = per_recipient.setdefault(recipient, [0, 0])
        counts[0] += 1
        counts[1] += size
    for part in chunks([r[0] for r in rows]):
        conn.execute(f"DELETE FROM messages WHERE seq IN ({marks(len(part))})", part)
    for recipient, (count, size) in per_recipient.items():
        conn.execute("UPDATE queues SET count = count - ?, bytes = bytes - ? WHERE recipient = ?",
                     (count, size, recipient))
        conn.execute("DELETE FROM queues WHERE recipient = ? AND count <= 0", (recipient,))
    return len(rows)


"""Message history's SQL (``[history] days``), run on the writer thread: delivered messages kept as stored, a
page of them, deletion by their recipient and expiry.

Like ``queue``, each function returns ``(value, Delta)``; history counts in
the byte total (the storage budget) and never in the message total. A message
is kept once per (recipient, messageId, lower-cased sender): a second
delivery of the same message keeps the first copy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from ...frames import utf8_len
from ..store import HistoryPage, QueuedMessage
from .writer import NONE, Delta

_NEW = ("NOT EXISTS (SELECT 1 FROM history h WHERE h.recipient = m.recipient AND h.message_id = m.message_id "
        "AND h.sender_key = lower(m.sender))")


def keep_stored(conn: sqlite3.Connection, seqs: Sequence[int], marks: str, until: int) -> int:
    """Copy these stored messages (about to be deleted as delivered) into history; the bytes it adds."""
    added = conn.execute(f"SELECT COALESCE(SUM(size), 0) FROM messages m WHERE seq IN ({marks}) AND {_NEW}",
                         seqs).fetchone()[0]
    conn.execute(f"INSERT OR IGNORE INTO history (recipient, message_id, sender_key, sender, content, timestamp, "
                 f"queued_at, seq, kept_until, size) SELECT recipient, message_id, lower(sender), sender, "
                 f"content, timestamp, queued_at, seq, ?, size FROM messages WHERE seq IN ({marks})",
                 (until, *seqs))
    return int(added)


def keep_live(conn: sqlite3.Connection, messages: list[QueuedMessage], until: int) -> tuple[None, Delta]:
    """Keep messages delivered live (never stored)."""
    return None, keep_copies(conn, [(m, until) for m in messages])[1]


def keep_copies(conn: sqlite3.Connection, kept: list[tuple[QueuedMessage, int]]) -> tuple[int, Delta]:
    """Keep each message until its own time (``relayd migrate``'s copies keep the source's); how many were new."""
    added = count = 0
    for m, until in kept:
        size = utf8_len(m.content)
        cur = conn.execute("INSERT OR IGNORE INTO history (recipient, message_id, sender_key, sender, content, "
                           "timestamp, queued_at, seq, kept_until, size) VALUES (?, ?, lower(?), ?, ?, ?, ?, ?, ?, ?)",
                           (m.recipient, m.message_id, m.sender, m.sender, m.content, m.timestamp, m.queued_at,
                            m.seq, until, size))
        if cur.rowcount > 0:
            count, added = count + 1, added + size
    return count, (0, added)


def forget(conn: sqlite3.Connection, messages: list[QueuedMessage]) -> int:
    """Forget the kept copies of messages put back in a queue (their delivery did not happen); bytes freed."""
    freed = 0
    for m in messages:
        row = conn.execute("DELETE FROM history WHERE recipient = ? AND message_id = ? AND sender_key = lower(?) "
                           "RETURNING size", (m.recipient, m.message_id, m.sender)).fetchone()
        freed += row[0] if row else 0
    return freed


def page(conn: sqlite3.Connection, recipient: str, limit: int, before_ms: int | None,
         sender: str | None) -> tuple[HistoryPage, Delta]:
    where: list[str] = ["recipient = ?"]
    args: list[str | int] = [recipient]
    if before_ms is not None:
        where.append("timestamp < ?")
        args.append(before_ms)
    if sender is not None:
        where.append("sender_key = lower(?)")
        args.append(sender)
    rows = conn.execute(f"SELECT recipient, sender, message_id, content, timestamp, queued_at, seq FROM history "
                        f"WHERE {' AND '.join(where)} ORDER BY timestamp DESC, seq DESC LIMIT ?",
                        (*args, limit + 1)).fetchall()
    return HistoryPage([QueuedMessage(*row) for row in rows[:limit]], len(rows) > limit), NONE


def delete(conn: sqlite3.Connection, recipient: str, message_ids: list[str] | None) -> tuple[int, Delta]:
    if message_ids is None:
        rows = conn.execute("DELETE FROM history WHERE recipient = ? RETURNING size", (recipient,)).fetchall()
    else:
        rows = []
        for start in range(0, len(message_ids), 500):
            part = message_ids[start:start + 500]
            rows += conn.execute(f"DELETE FROM history WHERE recipient = ? AND message_id IN "
                                 f"({', '.join('?' * len(part))}) RETURNING size", (recipient, *part)).fetchall()
    return len(rows), (0, -sum(r[0] for r in rows))


def expire(conn: sqlite3.Connection, now_ms: int, chunk: int) -> tuple[int, Delta]:
    rows = conn.execute("DELETE FROM history WHERE rowid IN (SELECT rowid FROM history WHERE kept_until <= ? "
                        "ORDER BY kept_until LIMIT ?) RETURNING size", (now_ms, chunk)).fetchall()
    return len(rows), (0, -sum(r[0] for r in rows))


def stored_bytes(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM history").fetchone()[0])

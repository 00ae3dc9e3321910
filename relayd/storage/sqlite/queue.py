"""The offline queue's SQL, run on the writer thread: enqueue within the limits, deletes that keep counters exact,
and the messageIds known as delivered.

Every function takes the writer's connection inside its transaction and
returns ``(value, Delta)``: the change to the store-wide message and byte
totals, applied by the writer only if the transaction commits. Seqs come
from ``SeqCounter``, so the insert needs no AUTOINCREMENT bookkeeping. The
insert finds a stored duplicate by the unique ``messages_ident`` index; a
refused insert that is not the same message stored is a taken seq, an
error, never mistaken for a duplicate.

Senders are compared case-insensitively by SQLite's ``lower()`` on both
sides, as the ``messages_ident`` index and the ``delivered`` table store them.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from typing import NoReturn, TypeVar

from ...frames import utf8_len
from ..store import RECEIPT_BYTES, EnqueueResult, QueuedMessage, QueueLimits, Receipt, StorageUnavailable
from . import history
from .writer import NONE, Delta

log = logging.getLogger("relayd.storage")

IN_CHUNK = 500  # stays far below SQLite's bound-parameter limit on old builds
DROP_CHUNK = 64
EXPIRE_CHUNK = 1000
FEW = 4
"""Batches smaller than this are enqueued a message at a time (see ``enqueue_rows``)."""
SHAPED_ROWS = 128
"""Most rows of a batch read (three bound values each, far below SQLite's limit on old builds)."""

T = TypeVar("T")
_INSERT = ("INSERT INTO messages (seq, recipient, sender, message_id, timestamp, queued_at, size, content) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_COUNT = ("INSERT INTO queues (recipient, count, bytes, receipts) VALUES (?, ?, ?, 0) "
          "ON CONFLICT (recipient) DO UPDATE SET count = count + excluded.count, bytes = bytes + excluded.bytes")
_PROBE = ("SELECT EXISTS (SELECT 1 FROM delivered WHERE recipient = ?1 AND message_id = ?2 AND sender = lower(?3)), "
          "q.count, q.bytes FROM (SELECT 1) LEFT JOIN queues q ON q.recipient = ?1")
"""One statement for what an enqueue must know first: was the same message delivered, and the recipient's
counters. Whether it is stored, the insert finds out (the ``messages_ident`` index refuses it)."""
_STORED = "SELECT seq FROM messages WHERE recipient = ? AND message_id = ? AND lower(sender) = lower(?)"
_FORGET_DELIVERED = "DELETE FROM delivered WHERE recipient = ? AND message_id = ? AND sender = lower(?)"
_LATER_DELIVERY = ("ON CONFLICT (recipient, message_id, sender) DO UPDATE SET "
                   "queued_at = max(queued_at, excluded.queued_at)")
"""A message recorded as delivered twice is remembered from the later ``queued_at``."""
_RANGE = "recipient = ? AND seq BETWEEN ? AND ?"
_RANGE_ROWS = (f"SELECT group_concat(seq), sum(size) FROM (SELECT seq, size FROM messages WHERE {_RANGE} "
               "ORDER BY seq LIMIT ?)")
"""The range's first seqs, one more than asked for (a range of many others is not read through), as one string in
the order they are read in (were it ever another, the range would only go unused), and their sizes."""
_RANGE_DELIVERED = ("INSERT INTO delivered (recipient, message_id, sender, queued_at) SELECT recipient, message_id, "
                    f"lower(sender), queued_at FROM messages WHERE {_RANGE} " + _LATER_DELIVERY)
_RANGE_DELETE = f"DELETE FROM messages WHERE {_RANGE}"
_RECORD_DELIVERED = ("INSERT INTO delivered (recipient, message_id, sender, queued_at) VALUES (?, ?, lower(?), ?) "
                     + _LATER_DELIVERY)


class SeqCounter:
    """The next message seq: one past the largest stored, kept on the writer thread."""

    __slots__ = ("last",)

    def __init__(self, last: int) -> None:
        self.last = last

    def take(self) -> int:
        self.last += 1
        return self.last

    def see(self, seq: int) -> None:
        """A seq given back by ``restore``: never hand it out again."""
        self.last = max(self.last, seq)

    def resync(self, conn: sqlite3.Connection) -> None:
        """Move past every stored seq (after a collision: something else numbered messages)."""
        self.see(int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0]))


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def shaped(items: Sequence[T], most: int) -> Iterable[Sequence[T]]:
    """``items`` in chunks whose sizes are powers of two (largest first, none above ``most``): a statement built
    for a chunk then has one of a few shapes, which stay prepared in the connection's statement cache (a shape
    per batch size overflows it, and preparing a statement of many rows costs more than running it)."""
    start = 0
    while start < len(items):
        size = 1 << min(len(items) - start, most).bit_length() - 1
        yield items[start:start + size]
        start += size


def marks(n: int) -> str:
    return ",".join("?" * n)


def enqueue_row(conn: sqlite3.Connection, msg: QueuedMessage, limits: QueueLimits, seqs: SeqCounter,
                stored_bytes: int) -> tuple[tuple[EnqueueResult, int], Delta]:
    """Insert ``msg`` within ``limits``: one probe (delivered? the counters), the insert, the counter update.

    Returns ((result, seq), delta); the seq is the new one (QUEUED) or the stored one (DUPLICATE). A refusal
    (DELIVERED, NO_SPACE, FULL) first looks for the same message stored, which is DUPLICATE instead.
    """
    delivered, count, used = conn.execute(_PROBE, (msg.recipient, msg.message_id, msg.sender)).fetchone()
    size = utf8_len(msg.content)
    count, used = count or 0, used or 0
    refusal = None
    if delivered:
        refusal = EnqueueResult.DELIVERED
    elif limits.max_total_bytes and stored_bytes + size > limits.max_total_bytes:
        refusal = EnqueueResult.NO_SPACE
    elif size > limits.max_bytes or ((count >= limits.max_messages or used + size > limits.max_bytes)
                                     and not limits.drop_oldest):
        refusal = EnqueueResult.FULL
    if refusal is not None:
        stored = _stored_seq(conn, msg)
        return ((refusal, 0) if stored is None else (EnqueueResult.DUPLICATE, stored)), NONE
    seq = seqs.take()
    stored = _insert(conn, msg, seq, size, seqs)
    if stored is not None:
        return (EnqueueResult.DUPLICATE, stored), NONE
    dropped, freed = _drop_oldest(conn, msg.recipient, count, used, size, limits) if count else (0, 0)
    conn.execute(_COUNT, (msg.recipient, 1 - dropped, size - freed))
    return (EnqueueResult.QUEUED, seq), (1 - dropped, size - freed)


def enqueue_rows(conn: sqlite3.Connection, messages: list[QueuedMessage], limits: QueueLimits, seqs: SeqCounter,
                 stored_bytes: int) -> tuple[list[tuple[EnqueueResult, int]], Delta]:
    """``enqueue_row`` for each message in order, with the same results, in a few statements per batch.

    One read finds which messages of the batch are delivered or stored already, one the counters of their
    recipients; a message that surely fits (neither, within the caps, its identity new in the batch) joins a
    run inserted by ``executemany``, any other goes through ``enqueue_row`` once the run before it is written.
    No savepoint: one costs a copy of every page the run changes. Below ``FEW`` messages the batch reads cost
    more than they save, and each goes through ``enqueue_row``.
    """
    results: list[tuple[EnqueueResult, int]] = []
    added = added_bytes = run_bytes = 0
    if len(messages) < FEW:
        for msg in messages:
            outcome, (n, nbytes) = enqueue_row(conn, msg, limits, seqs, stored_bytes + added_bytes)
            results.append(outcome)
            added, added_bytes = added + n, added_bytes + nbytes
        return results, (added, added_bytes)
    known = _known_among(conn, messages)
    counters = _counters(conn, {m.recipient for m in messages})
    run: list[tuple[QueuedMessage, int]] = []
    seen: set[tuple[str, str, str]] = set()

    def write_run() -> None:
        nonlocal added, added_bytes, run_bytes
        if run:
            for seq, size in _insert_run(conn, run, seqs):
                results.append((EnqueueResult.QUEUED, seq))
                added, added_bytes = added + 1, added_bytes + size
            run.clear()
            run_bytes = 0

    for msg in messages:
        size = utf8_len(msg.content)
        count, used = counters.get(msg.recipient, (0, 0))
        ident = (msg.recipient, msg.message_id, msg.sender.lower())
        fits = ((msg.recipient, msg.message_id, msg.sender) not in known and ident not in seen
                and size <= limits.max_bytes and count < limits.max_messages and used + size <= limits.max_bytes
                and not (limits.max_total_bytes
                         and stored_bytes + added_bytes + run_bytes + size > limits.max_total_bytes))
        seen.add(ident)
        if fits:
            run.append((msg, size))
            run_bytes += size
            counters[msg.recipient] = (count + 1, used + size)
            continue
        write_run()
        outcome, (n, nbytes) = enqueue_row(conn, msg, limits, seqs, stored_bytes + added_bytes)
        results.append(outcome)
        added, added_bytes = added + n, added_bytes + nbytes
        counters.update(_counters(conn, {msg.recipient}))
    write_run()
    return results, (added, added_bytes)


def _known_among(conn: sqlite3.Connection, messages: list[QueuedMessage]) -> set[tuple[str, str, str]]:
    """The (recipient, messageId, sender as given) of these messages that are recorded as delivered or are
    stored."""
    found: set[tuple[str, str, str]] = set()
    for part in shaped(messages, SHAPED_ROWS):
        found.update(conn.execute(
            f"SELECT column1, column2, column3 FROM (VALUES {','.join(['(?, ?, ?)'] * len(part))}) WHERE EXISTS "
            "(SELECT 1 FROM delivered WHERE recipient = column1 AND message_id = column2 AND sender = lower(column3)) "
            "OR EXISTS (SELECT 1 FROM messages WHERE recipient = column1 AND message_id = column2 "
            "AND lower(sender) = lower(column3))",
            [value for m in part for value in (m.recipient, m.message_id, m.sender)]))
    return found


def _counters(conn: sqlite3.Connection, recipients: set[str]) -> dict[str, tuple[int, int]]:
    """The stored (count, bytes) of these recipients' queues (a recipient without a queue is absent)."""
    counters: dict[str, tuple[int, int]] = {}
    for part in shaped(list(recipients), SHAPED_ROWS):
        for recipient, count, used in conn.execute(
                f"SELECT recipient, count, bytes FROM queues WHERE recipient IN ({marks(len(part))})", part):
            counters[recipient] = (count, used)
    return counters


def _insert_run(conn: sqlite3.Connection, run: list[tuple[QueuedMessage, int]],
                seqs: SeqCounter) -> list[tuple[int, int]]:
    """Insert and count messages known to be new and to fit: their (seq, size). A refused insert can only be a
    taken seq, which fails the job as in ``_insert``."""
    rows = [(seqs.take(), m.recipient, m.sender, m.message_id, m.timestamp, m.queued_at, size, m.content)
            for m, size in run]
    per_recipient: dict[str, list[int]] = {}
    for m, size in run:
        counts = per_recipient.setdefault(m.recipient, [0, 0])
        counts[0] += 1
        counts[1] += size
    try:
        conn.executemany(_INSERT, rows)
    except sqlite3.IntegrityError as exc:
        _collided(conn, f"one of the message seqs {rows[0][0]}-{rows[-1][0]} is", exc, seqs)
    conn.executemany(_COUNT, [(recipient, count, nbytes) for recipient, (count, nbytes) in per_recipient.items()])
    return [(row[0], size) for row, (_, size) in zip(rows, run)]


def _stored_seq(conn: sqlite3.Connection, msg: QueuedMessage) -> int | None:
    row = conn.execute(_STORED, (msg.recipient, msg.message_id, msg.sender)).fetchone()
    return None if row is None else int(row[0])


def _insert(conn: sqlite3.Connection, msg: QueuedMessage, seq: int, size: int, seqs: SeqCounter) -> int | None:
    """Insert ``msg`` as ``seq``; returns None, or the seq of the same message when it is stored already.

    A seq taken by another message means something else numbered messages in this file: the job fails with
    StorageUnavailable (nothing of it is written) and the counter moves past every stored seq, so a retry works.
    """
    try:
        conn.execute(_INSERT, (seq, msg.recipient, msg.sender, msg.message_id, msg.timestamp, msg.queued_at, size,
                               msg.content))
        return None
    except sqlite3.IntegrityError as exc:
        stored = _stored_seq(conn, msg)
        if stored is not None:
            return stored
        _collided(conn, f"message seq {seq} is", exc, seqs)


def _collided(conn: sqlite3.Connection, taken: str, exc: sqlite3.IntegrityError, seqs: SeqCounter) -> NoReturn:
    """An insert met a taken seq: move the counter past every stored one and fail the job."""
    seqs.resync(conn)
    log.error("%s already taken (%s): something else numbered messages in this database; "
              "the write failed and new messages now start at seq %d", taken, exc, seqs.last + 1)
    raise StorageUnavailable("message numbering collided with a stored message; nothing was written") from exc


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
    """Put messages back past the per-queue caps, each with its seq when it had one; those still stored are
    skipped, those known as delivered are no longer (their delivery did not happen after all)."""
    restored = added = 0
    for msg in messages:
        seq = msg.seq
        if seq <= 0:
            seq = seqs.take()
        elif conn.execute("SELECT 1 FROM messages WHERE seq = ?", (seq,)).fetchone() is not None:
            if _stored_seq(conn, msg) is not None:
                continue
            log.warning("a message put back had seq %d, which another message holds; it gets a new one", seq)
            seq = seqs.take()
        else:
            seqs.see(seq)
        size = utf8_len(msg.content)
        if _insert(conn, msg, seq, size, seqs) is not None:
            continue
        msg.seq = seq
        conn.execute(_FORGET_DELIVERED, (msg.recipient, msg.message_id, msg.sender))
        conn.execute(_COUNT, (msg.recipient, 1, size))
        restored, added = restored + 1, added + size - history.forget(conn, [msg])
    return restored, (restored, added)


def record_delivered_rows(conn: sqlite3.Connection, messages: list[QueuedMessage],
                          keep_until: int = 0) -> tuple[None, Delta]:
    """Remember messages as delivered (a second record of one keeps the later ``queued_at``), and with
    ``keep_until`` keep them in history."""
    conn.executemany(_RECORD_DELIVERED, [(m.recipient, m.message_id, m.sender, m.queued_at) for m in messages])
    return history.keep_live(conn, messages, keep_until) if keep_until else (None, NONE)


def delete_where(conn: sqlite3.Connection, recipient: str, column: str,
                 values: Sequence[int | str], keep_until: int = 0) -> tuple[int, Delta]:
    """Delete ``recipient``'s messages whose ``column`` is one of ``values``, as delivered (kept in history
    until ``keep_until`` when it is set).

    Without history a chunk is two statements, the delivered records copied from the rows and the rows deleted
    (a flush's removal and an ack, the hot paths); with it, the rows are read first, for ``delete_rows``."""
    if not keep_until:
        if column == "seq":
            ranged = _delete_delivered_range(conn, recipient, values)
            if ranged is not None:
                return ranged
        return _delete_delivered(conn, recipient, column, values)
    rows: list[tuple[int, str, int]] = []
    for part in chunks(values):
        rows += conn.execute(f"SELECT seq, recipient, size FROM messages WHERE recipient = ? "
                             f"AND {column} IN ({marks(len(part))})", (recipient, *part)).fetchall()
    return delete_rows(conn, rows, delivered=True, keep_until=keep_until)


def _delete_delivered_range(conn: sqlite3.Connection, recipient: str,
                            seqs: Sequence[int | str]) -> tuple[int, Delta] | None:
    """Delete these seqs as delivered when they are every message of ``recipient`` from the first to the last (a
    flushed page: the usual case), by that range: no list of values for SQLite to search, and the sizes come
    from the one read that checks it (the range's seqs as one string, compared with theirs: no row reaches
    Python); None (nothing done) when they are not."""
    wanted = sorted(map(int, seqs))
    span = (recipient, wanted[0], wanted[-1])
    found, freed = conn.execute(_RANGE_ROWS, (*span, len(wanted) + 1)).fetchone()
    if found != ",".join(map(str, wanted)):  # another of the recipient's messages between them, or one gone
        return None
    freed = int(freed)
    conn.execute(_RANGE_DELIVERED, span)
    conn.execute(_RANGE_DELETE, span)
    _uncount(conn, recipient, len(wanted), freed)
    return len(wanted), (-len(wanted), -freed)


def _delete_delivered(conn: sqlite3.Connection, recipient: str, column: str,
                      values: Sequence[int | str]) -> tuple[int, Delta]:
    removed = freed = 0
    for part in chunks(values):
        where = f"recipient = ? AND {column} IN ({marks(len(part))})"
        conn.execute(f"INSERT INTO delivered (recipient, message_id, sender, queued_at) SELECT recipient, "
                     f"message_id, lower(sender), queued_at FROM messages WHERE {where} {_LATER_DELIVERY}",
                     (recipient, *part))
        sizes = conn.execute(f"DELETE FROM messages WHERE {where} RETURNING size", (recipient, *part)).fetchall()
        removed, freed = removed + len(sizes), freed + sum(size for size, in sizes)
    if removed:
        _uncount(conn, recipient, removed, freed)
    return removed, (-removed, -freed)


def delete_rows(conn: sqlite3.Connection, rows: list[tuple[int, str, int]], *,
                delivered: bool = False, keep_until: int = 0) -> tuple[int, Delta]:
    """Delete messages given as (seq, recipient, size) and keep the counters exact; ``delivered``: remember
    their (recipient, messageId, sender) as delivered, and with ``keep_until`` keep a copy in history (whose
    bytes stay in the byte total)."""
    per_recipient: dict[str, list[int]] = {}
    freed = 0
    for _, recipient, size in rows:
        counts = per_recipient.setdefault(recipient, [0, 0])
        counts[0] += 1
        counts[1] += size
        freed += size
    for part in chunks([r[0] for r in rows]):
        if delivered and keep_until:
            freed -= history.keep_stored(conn, part, marks(len(part)), keep_until)
        if delivered:
            conn.execute(f"INSERT INTO delivered (recipient, message_id, sender, queued_at) "
                         f"SELECT recipient, message_id, lower(sender), queued_at FROM messages "
                         f"WHERE seq IN ({marks(len(part))}) {_LATER_DELIVERY}", part)
        conn.execute(f"DELETE FROM messages WHERE seq IN ({marks(len(part))})", part)
    for recipient, (count, size) in per_recipient.items():
        _uncount(conn, recipient, count, size)
    return len(rows), (-len(rows), -freed)


def _uncount(conn: sqlite3.Connection, recipient: str, count: int, size: int) -> None:
    """Take ``count`` messages of ``size`` bytes off the recipient's counters (the row goes once it is empty)."""
    conn.execute("UPDATE queues SET count = count - ?, bytes = bytes - ? WHERE recipient = ?",
                 (count, size, recipient))
    _forget_empty_queue(conn, recipient)


def _forget_empty_queue(conn: sqlite3.Connection, recipient: str) -> None:
    conn.execute("DELETE FROM queues WHERE recipient = ? AND count <= 0 AND receipts <= 0", (recipient,))


def expire_chunk(conn: sqlite3.Connection, before_ms: int) -> tuple[tuple[int, int, int], Delta]:
    """Delete up to a chunk each of messages, receipts and delivered records older than ``before_ms``, and
    expired tokens.

    Returns ((messages, receipts, delivered records) removed, delta).
    """
    old = conn.execute("SELECT seq, recipient, size FROM messages WHERE queued_at < ? ORDER BY queued_at LIMIT ?",
                       (before_ms, EXPIRE_CHUNK)).fetchall()
    removed, delta = delete_rows(conn, old)
    gone = conn.execute("SELECT seq, recipient FROM receipts WHERE timestamp < ? ORDER BY timestamp LIMIT ?",
                        (before_ms, EXPIRE_CHUNK)).fetchall()
    delta = (delta[0], delta[1] - _delete_receipts(conn, gone))
    forgotten = conn.execute(
        "DELETE FROM delivered WHERE (recipient, message_id, sender) IN (SELECT recipient, message_id, sender "
        "FROM delivered WHERE queued_at < ? ORDER BY queued_at LIMIT ?)", (before_ms, EXPIRE_CHUNK)).rowcount
    conn.execute("DELETE FROM tokens WHERE expires_at <= ?", (before_ms,))
    return (removed, len(gone), forgotten), delta


def shift_rows(conn: sqlite3.Connection, before_ms: int, delta_ms: int) -> tuple[int, Delta]:
    """Move the times of messages, receipts and delivered records older than ``before_ms`` by ``delta_ms``."""
    moved = 0
    for sql in ("UPDATE messages SET queued_at = queued_at + ? WHERE queued_at < ?",
                "UPDATE receipts SET timestamp = timestamp + ? WHERE timestamp < ?",
                "UPDATE delivered SET queued_at = queued_at + ? WHERE queued_at < ?"):
        moved += conn.execute(sql, (delta_ms, before_ms)).rowcount
    return moved, NONE


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
    return dropped, (0, (len(receipts) - dropped) * RECEIPT_BYTES)


def remove_receipt_rows(conn: sqlite3.Connection, recipient: str, seqs: list[int]) -> tuple[int, Delta]:
    rows: list[tuple[int, str]] = []
    for part in chunks(seqs):
        rows += conn.execute(f"SELECT seq, recipient FROM receipts WHERE recipient = ? AND seq IN "
                             f"({marks(len(part))})", (recipient, *part)).fetchall()
    return len(rows), (0, -_delete_receipts(conn, rows))


def _delete_receipts(conn: sqlite3.Connection, rows: list[tuple[int, str]]) -> int:
    """Delete these receipts; the bytes the storage budget counted for them."""
    per_recipient: dict[str, int] = {}
    for _, recipient in rows:
        per_recipient[recipient] = per_recipient.get(recipient, 0) + 1
    for part in chunks([r[0] for r in rows]):
        conn.execute(f"DELETE FROM receipts WHERE seq IN ({marks(len(part))})", part)
    for recipient, count in per_recipient.items():
        conn.execute("UPDATE queues SET receipts = receipts - ? WHERE recipient = ?", (count, recipient))
        _forget_empty_queue(conn, recipient)
    return len(rows) * RECEIPT_BYTES

"""The durable backend: one SQLite file in WAL mode, written by one thread, owned by one relayd.

Every operation becomes a job for ``SQLiteWriter``, whose futures resolve
after COMMIT, so an awaited ``enqueue`` is on disk. Per-recipient counters
live in their own table so limit checks never count a queue. The message
queue is here (its SQL in ``queue``); keys, locks and tokens are the
``KeyDirectory``'s; ``OwnerLock`` keeps a second relayd off the file. See
``storage.store`` for the contract every method follows.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import BACKSTOP_PAGES, DEFAULT_AUTOCHECKPOINT, Checkpointer
from .file import count_stats, describe_error, inspect, permission_hint
from .keys import KEY_BYTES_SQL, KeyDirectory
from .owner import OwnerLock
from .push import PushTable, push_bytes_total
from .queue import (
    EXPIRE_CHUNK,
    SeqCounter,
    add_receipt_rows,
    delete_rows,
    delete_where,
    enqueue_rows,
    expire_chunk,
    record_delivered_rows,
    remove_receipt_rows,
    restore_rows,
    shift_rows,
)
from . import history
from .schema import migrate
from .writer import NONE, Delta, SQLiteWriter
from ..store import (
    RECEIPT_BYTES,
    EnqueueResult,
    HistoryPage,
    KeyRecord,
    PushSubscription,
    QueuedMessage,
    QueueLimits,
    Receipt,
    StoreOpenError,
)

_SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}


class SQLiteStore:
    """A ``Store`` in one SQLite file; see the module docstring for the threading model."""

    name = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "normal",
                 commit_interval_ms: float = 2.0, busy_timeout_ms: int = 2000) -> None:
        if synchronous.lower() not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {sorted(_SYNC_MODES)}")
        self.path = path
        self._synchronous = _SYNC_MODES[synchronous.lower()]
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._owner = OwnerLock(Path(path))
        self._checkpoints = Checkpointer(path)
        self._writer = SQLiteWriter(self._connect, max(0.0, commit_interval_ms) / 1000, path, self._checkpoints)
        self._keys = KeyDirectory(self._writer)
        self._push = PushTable(self._writer)
        self._seqs = SeqCounter(0)  # set from the database on the writer thread when it opens
        self._history_ms = 0

    @property
    def healthy(self) -> bool:
        return self._writer.healthy

    @property
    def problem(self) -> str | None:
        return self._writer.problem

    @property
    def commits(self) -> int:
        return self._writer.commits

    @property
    def commit_observer(self) -> Callable[[float], None] | None:
        return self._writer.commit_observer

    @commit_observer.setter
    def commit_observer(self, observer: Callable[[float], None] | None) -> None:
        self._writer.commit_observer = observer

    async def open(self) -> None:
        await self._writer.start()

    async def close(self) -> None:
        await self._writer.stop()
        self._owner.release()

    def _connect(self) -> tuple[sqlite3.Connection, int, int]:
        """Runs on the writer thread: check the file, lock it, open it in WAL mode, migrate, read the totals.

        The lock comes after the checks, so a file that is not relayd's is left without one beside it.
        """
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            hint = f"; {permission_hint(path.parent)}" if isinstance(exc, PermissionError) else ""
            raise StoreOpenError(f"cannot create directory {path.parent}: {exc.strerror or exc}{hint}") from exc
        inspect(path)
        for place in (path, path.parent):
            if place.exists() and not os.access(place, os.W_OK):
                raise StoreOpenError(f"database {path} is read-only: relayd needs to write "
                                     f"{'it' if place == path else f'its directory {place}'} (permissions, or a "
                                     f"read-only file system); {permission_hint(path.parent)}")
        self._owner.acquire()
        try:
            return self._open_locked(path)
        except BaseException:
            self._owner.release()
            raise

    def _open_locked(self, path: Path) -> tuple[sqlite3.Connection, int, int]:
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot open database {path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreOpenError(f"cannot switch {path} to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            migrate(conn)
            total, nbytes, receipts = conn.execute(
                "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0), COALESCE(SUM(receipts), 0) "
                "FROM queues").fetchone()
            nbytes += receipts * RECEIPT_BYTES + conn.execute(
                f"SELECT COALESCE(SUM({KEY_BYTES_SQL}), 0) FROM keys").fetchone()[0] + push_bytes_total(conn)
            nbytes += history.stored_bytes(conn)
            self._seqs = SeqCounter(0)
            self._seqs.resync(conn)
            conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
            if not self._checkpoints.start(path, self._synchronous):  # last: nothing after it can fail
                conn.execute(f"PRAGMA wal_autocheckpoint = {DEFAULT_AUTOCHECKPOINT}")
        except StoreOpenError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc).lower():
                raise StoreOpenError(f"database {path} is read-only: relayd needs to write it "
                                     f"(check its permissions and those of {path.parent})") from exc
            raise StoreOpenError(f"cannot open database {path}: {describe_error(exc)}") from exc
        return conn, int(total), int(nbytes)

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        return (await self.enqueue_many([msg], limits))[0]

    async def enqueue_many(self, messages: list[QueuedMessage], limits: QueueLimits) -> list[EnqueueResult]:
        if not messages:
            return []
        results = await self._writer.submit(
            lambda c: enqueue_rows(c, messages, limits, self._seqs, self._writer.bytes), write=True)
        for msg, (result, seq) in zip(messages, results):
            if result is EnqueueResult.QUEUED or result is EnqueueResult.DUPLICATE:
                msg.seq = seq
        return [result for result, _ in results]

    async def restore(self, messages: list[QueuedMessage]) -> int:
        if not messages:
            return 0
        return await self._writer.submit(lambda c: restore_rows(c, messages, self._seqs), write=True)

    async def record_delivered(self, messages: list[QueuedMessage]) -> None:
        if messages:
            until = self._keep_until()
            await self._writer.submit(lambda c: record_delivered_rows(c, messages, until), write=True,
                                      health=False)

    async def pending(self, recipient: str, limit: int, after_seq: int = 0,
                      max_bytes: int | None = None) -> list[QueuedMessage]:
        def job(conn: sqlite3.Connection) -> tuple[list[QueuedMessage], Delta]:
            """One ordered read, stopped once the page holds ``max_bytes`` of content (at least one message)."""
            cursor = conn.execute("SELECT seq, sender, message_id, content, timestamp, queued_at, size FROM messages "
                                  "WHERE recipient = ? AND seq > ? ORDER BY seq LIMIT ?",
                                  (recipient, after_seq, max(limit, 0)))
            page, room = [], max(max_bytes, 1) if max_bytes is not None else None
            for seq, s, m, c, t, q, size in cursor:
                page.append(QueuedMessage(recipient, s, m, c, t, q, seq))
                if room is not None:
                    room -= size
                    if room <= 0:
                        break
            cursor.close()
            return page, NONE
        return await self._writer.submit(job, write=False)

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return await self._delete(recipient, "seq", list(dict.fromkeys(seqs)))

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        return await self._delete(recipient, "message_id", list(dict.fromkeys(message_ids)))

    async def _delete(self, recipient: str, column: str, values: list[int] | list[str]) -> int:
        if not values:
            return 0
        until = self._keep_until()
        return await self._writer.submit(lambda c: delete_where(c, recipient, column, values, until), write=True)

    async def clear(self, recipient: str) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            rows = conn.execute("SELECT seq, recipient, size FROM messages WHERE recipient = ?",
                                (recipient,)).fetchall()
            return delete_rows(conn, rows)
        return await self._writer.submit(job, write=True)

    async def size(self, recipient: str) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, Delta]:
            row = conn.execute("SELECT count FROM queues WHERE recipient = ?", (recipient,)).fetchone()
            return (int(row[0]) if row else 0), NONE
        return await self._writer.submit(job, write=False)

    async def backlog_size(self, recipient: str) -> tuple[int, int]:
        def job(conn: sqlite3.Connection) -> tuple[tuple[int, int], Delta]:
            row = conn.execute("SELECT count, receipts FROM queues WHERE recipient = ?", (recipient,)).fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0), NONE
        return await self._writer.submit(job, write=False)

    def total(self) -> int:
        return self._writer.total

    def stored_bytes(self) -> int:
        return self._writer.bytes

    async def stats(self) -> dict[str, int]:
        def job(conn: sqlite3.Connection) -> tuple[dict[str, int], Delta]:
            return count_stats(conn), NONE
        return await self._writer.submit(job, write=False)

    async def expire(self, before_ms: int) -> int:
        """Delete old messages, receipts, delivered records and tokens a chunk per transaction, so other jobs
        interleave."""
        removed = 0
        while True:
            counts = await self._writer.submit(lambda c: expire_chunk(c, before_ms), write=True)
            removed += counts[0]
            if max(counts) < EXPIRE_CHUNK:
                return removed

    async def shift_times(self, before_ms: int, delta_ms: int) -> int:
        return await self._writer.submit(lambda c: shift_rows(c, before_ms, delta_ms), write=True)

    async def add_receipts(self, receipts: list[Receipt], max_per_recipient: int) -> int:
        if not receipts:
            return 0
        return await self._writer.submit(lambda c: add_receipt_rows(c, receipts, max_per_recipient), write=True)

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        def job(conn: sqlite3.Connection) -> tuple[list[Receipt], Delta]:
            rows = conn.execute(
                "SELECT seq, reader, message_id, timestamp FROM receipts WHERE recipient = ? "
                "ORDER BY seq LIMIT ?", (recipient, max(limit, 0))).fetchall()
            return [Receipt(recipient, reader, mid, ts, seq) for seq, reader, mid, ts in rows], NONE
        return await self._writer.submit(job, write=False)

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        wanted = list(dict.fromkeys(seqs))
        return await self._writer.submit(lambda c: remove_receipt_rows(c, recipient, wanted), write=True)

    # History

    def keep_history(self, ms: int) -> None:
        self._history_ms = ms

    def _keep_until(self) -> int:
        return int(time.time() * 1000) + self._history_ms if self._history_ms else 0

    async def history(self, recipient: str, limit: int, before_ms: int | None = None,
                      sender: str | None = None) -> HistoryPage:
        return await self._writer.submit(lambda c: history.page(c, recipient, limit, before_ms, sender),
                                         write=False)

    async def delete_history(self, recipient: str, message_ids: list[str] | None) -> int:
        return await self._writer.submit(lambda c: history.delete(c, recipient, message_ids), write=True)

    async def expire_history(self, now_ms: int) -> int:
        removed = 0
        while True:
            gone = await self._writer.submit(lambda c: history.expire(c, now_ms, EXPIRE_CHUNK), write=True)
            removed += gone
            if gone < EXPIRE_CHUNK:
                return removed

    async def copy_history(self, kept: list[tuple[QueuedMessage, int]]) -> int:
        """``relayd migrate``: keep these messages, each until its time (ms), unless kept already; how many
        were new."""
        if not kept:
            return 0
        return await self._writer.submit(lambda c: history.keep_copies(c, kept), write=True)

    async def queue_keys(self) -> list[str]:
        def job(conn: sqlite3.Connection) -> tuple[list[str], Delta]:
            rows = conn.execute("SELECT recipient FROM queues WHERE count > 0 OR receipts > 0 "
                                "UNION SELECT DISTINCT recipient FROM history")
            return [r for (r,) in rows], NONE
        return await self._writer.submit(job, write=False)

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

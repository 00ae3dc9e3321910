"""The durable backend: one SQLite file in WAL mode, written by one thread.

The event loop never touches the disk. Every operation becomes a job for a
single writer thread that owns the connection; the thread runs all jobs that
are waiting (group commit) in one transaction and resolves their futures only
after the commit, so an awaited ``enqueue`` is on disk. Per-recipient counters
live in their own table so limit checks never count a queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..frames import utf8_len
from .store import (
    EnqueueResult,
    KeyRecord,
    QueuedMessage,
    QueueLimits,
    Receipt,
    StorageUnavailable,
    StoreOpenError,
)

log = logging.getLogger("relayd.storage")

APPLICATION_ID = 0x524C5944  # "RLYD": marks a file as relayd's
SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_BATCH = 500
KEY_CACHE_SIZE = 4096
_MISSING = object()
FULL_CHECK_BYTES = 64 * 1024 * 1024
EXPIRE_CHUNK = 1000
_IN_CHUNK = 500  # stays far below SQLite's bound-parameter limit on old builds
_DROP_CHUNK = 64

# MIGRATIONS[i] upgrades schema version i to i + 1. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            content TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            queued_at INTEGER NOT NULL,
            size INTEGER NOT NULL,
            UNIQUE (sender, message_id))""",
        "CREATE INDEX messages_recipient_seq ON messages (recipient, seq)",
        "CREATE INDEX messages_recipient_id ON messages (recipient, message_id)",
        "CREATE INDEX messages_queued_at ON messages (queued_at)",
        """CREATE TABLE queues (
            recipient TEXT PRIMARY KEY,
            count INTEGER NOT NULL,
            bytes INTEGER NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE receipts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            reader TEXT NOT NULL,
            message_id TEXT NOT NULL,
            timestamp INTEGER NOT NULL)""",
        "CREATE INDEX receipts_recipient_seq ON receipts (recipient, seq)",
        "CREATE INDEX receipts_timestamp ON receipts (timestamp)",
        """CREATE TABLE keys (
            address TEXT PRIMARY KEY,
            public_key TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            key_type TEXT,
            issued_at INTEGER,
            format TEXT,
            signature TEXT) WITHOUT ROWID""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID",
    ),
    (
        """CREATE TABLE locks (
            address TEXT PRIMARY KEY,
            locked_at INTEGER NOT NULL) WITHOUT ROWID""",
        "INSERT OR IGNORE INTO locks (address, locked_at) "
        "SELECT address, updated_at FROM keys WHERE signature IS NOT NULL",
    ),
    (   # messageIds are idempotent per sender and recipient, not per sender alone
        """CREATE TABLE messages_v3 (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            content TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            queued_at INTEGER NOT NULL,
            size INTEGER NOT NULL,
            UNIQUE (sender, recipient, message_id))""",
        "INSERT INTO messages_v3 SELECT seq, recipient, sender, message_id, content, timestamp, queued_at, size "
        "FROM messages",
        "DROP TABLE messages",
        "ALTER TABLE messages_v3 RENAME TO messages",
        "CREATE INDEX messages_recipient_seq ON messages (recipient, seq)",
        "CREATE INDEX messages_recipient_id ON messages (recipient, message_id)",
        "CREATE INDEX messages_queued_at ON messages (queued_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}
_MESSAGE_COLUMNS = "seq, recipient, sender, message_id, content, timestamp, queued_at"
_KEY_COLUMNS = ("address, public_key, created_at, updated_at, key_type, issued_at, "
                "format, signature")

T = TypeVar("T")
JobFn = Callable[[sqlite3.Connection], tuple[Any, int]]
"""A job returns (value for the caller, change to the queued-message total)."""


@dataclass(slots=True)
class _Job:
    fn: JobFn | None  # None = stop the thread
    write: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    solo: bool = False  # runs alone, outside any transaction


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _is_storage_error(exc: BaseException) -> bool:
    """Errors of the disk or the file, as opposed to bugs in a statement."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _describe(exc: BaseException) -> str:
    """A human reason for an operator; never contains message data."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    low = text.lower()
    if name.startswith("SQLITE_FULL") or "disk is full" in low:
        reason = "disk full"
    elif name.startswith("SQLITE_READONLY") or "readonly" in low or "read-only" in low:
        reason = "database is read-only"
    elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in low:
        reason = "database is locked"
    elif name.startswith("SQLITE_IOERR") or "i/o error" in low:
        reason = "disk I/O error"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in low:
        reason = "database is corrupt"
    else:
        return f"storage error: {type(exc).__name__}: {text}"
    return reason if low == reason.lower() else f"{reason} ({text})"


def _ro_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def _inspect(path: Path) -> int | None:
    """Check that ``path`` is absent, empty or relayd's, without writing to it.

    Returns the stored schema version (0 for an empty database), or None when
    there is nothing to inspect yet. Raises StoreOpenError otherwise.
    """
    if path.is_dir():
        raise StoreOpenError(f"database path {path} is a directory")
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreOpenError(f"cannot read database {path}: {exc.strerror or exc}") from exc
    if not header:
        return None
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise StoreOpenError(f"{path} is not a SQLite database; refusing to touch it")
    try:
        ro = sqlite3.connect(_ro_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise StoreOpenError(f"cannot open database {path}: {exc}") from exc
    try:
        app_id = ro.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and app_id == 0:
            return 0
        if app_id != APPLICATION_ID or "schema_version" not in tables:
            raise StoreOpenError(
                f"{path} is a SQLite database of another application "
                f"(application_id {app_id:#x}); refusing to touch it")
        version = ro.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        _check_integrity(ro, path)
    except sqlite3.DatabaseError as exc:
        raise StoreOpenError(f"database {path} is unreadable or corrupt: {exc}") from exc
    finally:
        ro.close()
    if version > SCHEMA_VERSION:
        raise StoreOpenError(
            f"database {path} has schema version {version}, newer than this relayd "
            f"understands ({SCHEMA_VERSION}); upgrade relayd")
    return version


def _check_integrity(ro: sqlite3.Connection, path: Path) -> None:
    """Refuse a corrupt file at start-up rather than on the first client.

    A full ``quick_check`` reads every page, which is cheap for small
    databases but would delay a start with a million queued messages, so
    large files get a probe of both ends of every table and index instead.
    """
    if path.stat().st_size <= FULL_CHECK_BYTES:
        result = ro.execute("PRAGMA quick_check(1)").fetchone()[0]
        if result != "ok":
            raise StoreOpenError(f"database {path} is corrupt: {result}")
        return
    for name, sql in ro.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall():
        if "WITHOUT ROWID" in (sql or "").upper():
            ro.execute(f'SELECT * FROM "{name}" LIMIT 1').fetchall()
            continue
        for order in ("ASC", "DESC"):
            ro.execute(f'SELECT * FROM "{name}" ORDER BY rowid {order} LIMIT 1').fetchall()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, one recorded step per version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     "version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreOpenError(f"database has schema version {current}, newer than "
                                 f"{SCHEMA_VERSION}; upgrade relayd")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                         (version, int(time.time() * 1000)))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _count_stats(conn: sqlite3.Connection) -> dict[str, int]:
    recipients, messages, nbytes = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) FROM queues").fetchone()
    receipts = conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    keys = conn.execute("SELECT COUNT(*) FROM keys").fetchone()[0]
    return {"recipients": recipients, "messages": messages, "bytes": nbytes,
            "receipts": receipts, "keys": keys}


def read_stats(path: str) -> dict[str, int]:
    """Stats of a database file, opened read-only (for an offline admin command)."""
    p = Path(path)
    version = _inspect(p)
    if version is None:
        raise StoreOpenError(f"no database at {path}")
    if version == 0:
        return {"recipients": 0, "messages": 0, "bytes": 0, "receipts": 0, "keys": 0,
                "schema_version": 0}
    try:
        conn = sqlite3.connect(_ro_uri(p), uri=True)
        try:
            return {**_count_stats(conn), "schema_version": version}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreOpenError(f"cannot read database {path}: {exc}") from exc


def _deliver(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in outcomes:
        if future.done():
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


def _send(loop: asyncio.AbstractEventLoop,
          outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, outcomes)
    except RuntimeError:  # that loop is closed; nobody is waiting any more
        pass


def _send_call(loop: asyncio.AbstractEventLoop, fn: Callable[[float], None], value: float) -> None:
    try:
        loop.call_soon_threadsafe(fn, value)
    except RuntimeError:
        pass


class SQLiteStore:
    """A ``Store`` in one SQLite file; see the module docstring for the threading model."""

    name = "sqlite"
    read_stats = staticmethod(read_stats)

    def __init__(self, path: str, *, synchronous: str = "normal",
                 commit_interval_ms: float = 2.0, busy_timeout_ms: int = 2000) -> None:
        if synchronous.lower() not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {sorted(_SYNC_MODES)}")
        self.path = path
        self._synchronous = _SYNC_MODES[synchronous.lower()]
        self._interval = max(0.0, commit_interval_ms) / 1000
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._open = False
        self._total = 0
        self._healthy = True
        self._problem: str | None = None
        self.commits = 0
        self._key_cache: OrderedDict[str, KeyRecord | None] = OrderedDict()
        self.commit_observer: Callable[[float], None] | None = None
        """Called on the event loop with each write transaction's duration (for metrics)."""
        """Committed write transactions; lets tests and metrics see group commit work."""

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def problem(self) -> str | None:
        return self._problem

    # Lifecycle

    async def open(self) -> None:
        if self._open:
            return
        if self._thread is not None:  # a cancelled open(); its thread is on its way out
            await asyncio.to_thread(self._thread.join)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._jobs = jobs = queue.SimpleQueue()
        self._thread = thread = threading.Thread(target=self._run, args=(loop, ready, jobs),
                                                 name="relayd-sqlite", daemon=True)
        thread.start()
        try:
            await ready
        except StoreOpenError:
            thread.join()
            self._thread = None
            raise
        except BaseException:  # cancelled: the thread stops as soon as it has opened
            jobs.put(_Job(None, False, loop.create_future(), loop, solo=True))
            raise
        self._open = True

    async def close(self) -> None:
        """Finish every job already submitted, then stop the thread and close the file."""
        if not self._open:
            return
        self._open = False
        await self._submit(None, write=False, solo=True)
        assert self._thread is not None
        self._thread.join()
        self._thread = None

    async def backup(self, dest_path: str) -> None:
        """Copy the live database to ``dest_path`` without stopping the store.

        The copy runs on the writer thread, so it is consistent and other jobs
        simply wait for it (about a second per few hundred MB).
        """
        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            dest = Path(dest_path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            target = sqlite3.connect(dest)
            try:
                conn.backup(target)
            finally:
                target.close()
            return None, 0
        await self._submit(job, write=False, solo=True)

    def _connect(self) -> sqlite3.Connection:
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreOpenError(f"cannot create directory {path.parent}: "
                                 f"{exc.strerror or exc}") from exc
        _inspect(path)
        try:
            conn = sqlite3.connect(path, isolation_level=None,
                                   timeout=self._busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot open database {path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreOpenError(f"cannot switch {path} to WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            _migrate(conn)
            self._total = conn.execute("SELECT COALESCE(SUM(count), 0) FROM queues").fetchone()[0]
        except StoreOpenError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise StoreOpenError(f"cannot open database {path}: {_describe(exc)}") from exc
        return conn

    # The writer thread

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None],
             jobs: queue.SimpleQueue[_Job]) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:
            if not isinstance(exc, StoreOpenError):
                exc = StoreOpenError(f"cannot open database {self.path}: {exc}")
            _send(loop, [(ready, None, exc)])
            return
        _send(loop, [(ready, None, None)])
        carry: _Job | None = None
        while True:
            batch, carry = self._collect(jobs, carry)
            if batch[0].fn is None:
                break
            try:
                outcomes = self._run_solo(batch[0]) if batch[0].solo else self._execute(batch)
            except Exception as exc:  # keep the thread alive whatever happens
                outcomes = self._fail(batch, exc)
            self._post(outcomes)
        self._shutdown()
        self._post([(batch[0], None, None)])

    def _collect(self, jobs: queue.SimpleQueue[_Job],
                 carry: _Job | None) -> tuple[list[_Job], _Job | None]:
        """Take every waiting job; while only writes are waiting, linger for more.

        A solo job ends the batch and is handed back to run next, on its own.
        """
        first = carry or jobs.get()
        if first.solo:
            return [first], None
        batch = [first]
        linger = first.write and self._interval > 0
        deadline = time.monotonic() + self._interval
        while len(batch) < MAX_BATCH:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if not linger or remaining <= 0:
                    break
                try:
                    job = jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if job.solo:
                return batch, job
            batch.append(job)
            linger = linger and job.write
        return batch, None

    def _run_solo(self, job: _Job) -> list[tuple[_Job, Any, BaseException | None]]:
        assert job.fn is not None and self._conn is not None
        try:
            value, _ = job.fn(self._conn)
        except Exception as exc:
            return [(job, None, exc)]
        return [(job, value, None)]

    def _execute(self, batch: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        conn = self._conn
        assert conn is not None
        writes = any(job.write for job in batch)
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        delta = 0
        started = time.perf_counter()
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                assert job.fn is not None
                if job.write:
                    conn.execute("SAVEPOINT job")
                try:
                    value, change = job.fn(conn)
                except Exception as exc:
                    if _is_storage_error(exc):
                        raise
                    if job.write:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                    outcomes.append((job, None, exc))
                    continue
                if job.write:
                    conn.execute("RELEASE job")
                outcomes.append((job, value, None))
                delta += change
            if writes:
                conn.execute("COMMIT")
                self.commits += 1
                if self.commit_observer is not None:
                    _send_call(batch[0].loop, self.commit_observer, time.perf_counter() - started)
        except Exception as exc:
            return self._fail(batch, exc)
        self._total += delta
        if writes and not self._healthy:
            log.warning("storage recovered (was: %s)", self._problem)
            self._healthy, self._problem = True, None
        return outcomes

    def _fail(self, batch: list[_Job], exc: BaseException) -> list[tuple[_Job, Any, BaseException | None]]:
        """Roll back and fail every job of the batch with StorageUnavailable."""
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        reason = _describe(exc) if isinstance(exc, sqlite3.Error) else \
            f"storage error: {type(exc).__name__}: {exc}"
        if reason != self._problem:
            log.error("storage unavailable: %s", reason)
        self._healthy, self._problem = False, reason
        return [(job, None, StorageUnavailable(reason)) for job in batch]

    def _post(self, outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for job, value, exc in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, value, exc))
        for loop, items in by_loop.items():
            _send(loop, items)

    def _shutdown(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass
        conn.close()

    async def _submit(self, fn: JobFn | None, *, write: bool, solo: bool = False) -> Any:
        if not self._open and fn is not None:
            raise StorageUnavailable("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put(_Job(fn, write, future, loop, solo))
        return await future

    # Messages

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> EnqueueResult:
        row = (msg.recipient, msg.sender, msg.message_id, msg.content, msg.timestamp, msg.queued_at)
        limit = (limits.max_messages, limits.max_bytes, limits.drop_oldest)
        result, seq = await self._submit(lambda c: _enqueue(c, row, *limit), write=True)
        if result is EnqueueResult.QUEUED:
            msg.seq = seq
        return result

    async def pending(self, recipient: str, limit: int, after_seq: int = 0) -> list[QueuedMessage]:
        def job(conn: sqlite3.Connection) -> tuple[list[QueuedMessage], int]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE recipient = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (recipient, after_seq, max(limit, 0)))
            return [QueuedMessage(r, s, m, c, t, q, seq) for seq, r, s, m, c, t, q in rows], 0
        return await self._submit(job, write=False)

    async def remove(self, recipient: str, seqs: list[int]) -> int:
        return await self._delete(recipient, "seq", seqs)

    async def ack(self, recipient: str, message_ids: list[str]) -> int:
        return await self._delete(recipient, "message_id", message_ids)

    async def _delete(self, recipient: str, column: str, values: list[Any]) -> int:
        if not values:
            return 0
        wanted = list(dict.fromkeys(values))

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            removed = _delete_where(conn, recipient, column, wanted)
            return removed, -removed
        return await self._submit(job, write=True)

    async def clear(self, recipient: str) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            removed = conn.execute("DELETE FROM messages WHERE recipient = ?", (recipient,)).rowcount
            conn.execute("DELETE FROM queues WHERE recipient = ?", (recipient,))
            return removed, -removed
        return await self._submit(job, write=True)

    async def size(self, recipient: str) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute("SELECT count FROM queues WHERE recipient = ?", (recipient,)).fetchone()
            return (row[0] if row else 0), 0
        return await self._submit(job, write=False)

    def total(self) -> int:
        """Queued messages in all queues; from memory, so /health never waits on the disk."""
        return self._total

    async def stats(self) -> dict[str, int]:
        return await self._submit(lambda c: (_count_stats(c), 0), write=False)

    async def expire(self, before_ms: int) -> int:
        """Delete old messages and receipts a chunk per transaction, so other jobs interleave."""
        def job(conn: sqlite3.Connection) -> tuple[tuple[int, int], int]:
            rows = conn.execute(
                "SELECT seq, recipient, size FROM messages WHERE queued_at < ? "
                "ORDER BY queued_at LIMIT ?", (before_ms, EXPIRE_CHUNK)).fetchall()
            _delete_rows(conn, rows)
            receipts = conn.execute(
                "DELETE FROM receipts WHERE seq IN (SELECT seq FROM receipts "
                "WHERE timestamp < ? ORDER BY timestamp LIMIT ?)",
                (before_ms, EXPIRE_CHUNK)).rowcount
            return (len(rows), receipts), -len(rows)

        removed = 0
        while True:
            messages, receipts = await self._submit(job, write=True)
            removed += messages
            if messages < EXPIRE_CHUNK and receipts < EXPIRE_CHUNK:
                return removed

    async def add_receipt(self, receipt: Receipt) -> None:
        row = (receipt.recipient, receipt.reader, receipt.message_id, receipt.timestamp)

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            cur = conn.execute("INSERT INTO receipts (recipient, reader, message_id, timestamp) "
                               "VALUES (?, ?, ?, ?)", row)
            return cur.lastrowid or 0, 0
        receipt.seq = await self._submit(job, write=True)

    async def receipts(self, recipient: str, limit: int) -> list[Receipt]:
        def job(conn: sqlite3.Connection) -> tuple[list[Receipt], int]:
            rows = conn.execute(
                "SELECT seq, reader, message_id, timestamp FROM receipts WHERE recipient = ? "
                "ORDER BY seq LIMIT ?", (recipient, max(limit, 0))).fetchall()
            return [Receipt(recipient, reader, mid, ts, seq) for seq, reader, mid, ts in rows], 0
        return await self._submit(job, write=False)

    async def remove_receipts(self, recipient: str, seqs: list[int]) -> int:
        wanted = list(dict.fromkeys(seqs))

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            removed = 0
            for part in _chunks(wanted):
                removed += conn.execute(f"DELETE FROM receipts WHERE recipient = ? AND seq IN "
                                        f"({_marks(len(part))})", (recipient, *part)).rowcount
            return removed, 0
        return await self._submit(job, write=True)

    # Keys

    async def get_key(self, address: str) -> KeyRecord | None:
        cached = self._key_cache.get(address, _MISSING)
        if cached is not _MISSING:
            self._key_cache.move_to_end(address)
            return cached  # type: ignore[return-value]
        return (await self.get_keys([address])).get(address)

    async def get_keys(self, addresses: list[str]) -> dict[str, KeyRecord]:
        """Lookups are served from a small cache of recent keys (hits and misses);
        every key write passes through this store, so it never goes stale."""
        found: dict[str, KeyRecord] = {}
        wanted = []
        for address in dict.fromkeys(addresses):
            cached = self._key_cache.get(address, _MISSING)
            if cached is _MISSING:
                wanted.append(address)
            elif cached is not None:
                found[address] = cached  # type: ignore[assignment]
        if not wanted:
            return found

        def job(conn: sqlite3.Connection) -> tuple[dict[str, KeyRecord], int]:
            rows: dict[str, KeyRecord] = {}
            for part in _chunks(wanted):
                for row in conn.execute(f"SELECT {_KEY_COLUMNS} FROM keys "
                                        f"WHERE address IN ({_marks(len(part))})", part):
                    rows[row[0]] = KeyRecord(*row)
            return rows, 0
        rows = await self._submit(job, write=False)
        for address in wanted:
            self._cache_key(address, rows.get(address))
        found.update(rows)
        return found

    def _cache_key(self, address: str, record: KeyRecord | None) -> None:
        cache = self._key_cache
        cache[address] = record
        cache.move_to_end(address)
        if len(cache) > KEY_CACHE_SIZE:
            cache.popitem(last=False)

    async def put_key(self, record: KeyRecord) -> KeyRecord:
        """Store ``record``; an existing key keeps its original ``created_at``."""
        row = (record.address, record.public_key, record.created_at, record.updated_at,
               record.key_type, record.issued_at, record.format, record.signature)

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            old = conn.execute("SELECT created_at FROM keys WHERE address = ?", (row[0],)).fetchone()
            created_at = old[0] if old else row[2]
            conn.execute(f"INSERT OR REPLACE INTO keys ({_KEY_COLUMNS}) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*row[:2], created_at, *row[3:]))
            return created_at, 0
        self._key_cache.pop(record.address, None)
        record.created_at = await self._submit(job, write=True)
        self._cache_key(record.address, dataclasses.replace(record))
        return record

    async def delete_key(self, address: str) -> bool:
        def job(conn: sqlite3.Connection) -> tuple[bool, int]:
            return conn.execute("DELETE FROM keys WHERE address = ?", (address,)).rowcount > 0, 0
        self._key_cache.pop(address, None)
        deleted = await self._submit(job, write=True)
        self._cache_key(address, None)
        return deleted

    async def key_count(self) -> int:
        return await self._submit(
            lambda c: (c.execute("SELECT COUNT(*) FROM keys").fetchone()[0], 0), write=False)


    # Ownership locks

    async def is_locked(self, address: str) -> bool:
        return await self._submit(lambda c: (c.execute("SELECT 1 FROM locks WHERE address = ?",
                                                       (address,)).fetchone() is not None, 0), write=False)

    async def lock(self, address: str) -> None:
        stamp = int(time.time() * 1000)

        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.execute("INSERT OR IGNORE INTO locks (address, locked_at) VALUES (?, ?)", (address, stamp))
            return None, 0
        await self._submit(job, write=True)


def backup_database(path: str, dest_path: str) -> None:
    """Copy a consistent snapshot of a live database without joining its writer.

    Uses a read-only connection, so it is safe while relayd runs and never
    stalls relayd's writes for longer than SQLite's own page copying.
    """
    if not Path(path).is_file():
        raise StoreOpenError(f"no database at {path}")
    src = sqlite3.connect(_ro_uri(Path(path)), uri=True)
    try:
        dest = sqlite3.connect(dest_path)
        try:
            src.backup(dest)
        finally:
            dest.close()
    finally:
        src.close()


# Job bodies (run on the writer thread)

def _enqueue(conn: sqlite3.Connection, row: tuple[str, str, str, str, int, int],
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
                              "LIMIT ?", (recipient, _DROP_CHUNK)).fetchall()
        if not oldest:
            count = used = 0
            break
        victims = []
        for seq, victim_size in oldest:
            if not (count and (count >= max_messages or used + size > max_bytes)):
                break
            victims.append(seq)
            count, used = count - 1, used - victim_size
        conn.execute(f"DELETE FROM messages WHERE seq IN ({_marks(len(victims))})", victims)
        dropped += len(victims)
    cur = conn.execute("INSERT INTO messages (recipient, sender, message_id, content, timestamp, "
                       "queued_at, size) VALUES (?, ?, ?, ?, ?, ?, ?)", (*row, size))
    conn.execute("INSERT INTO queues (recipient, count, bytes) VALUES (?, ?, ?) "
                 "ON CONFLICT (recipient) DO UPDATE SET count = excluded.count, "
                 "bytes = excluded.bytes", (recipient, count + 1, used + size))
    return (EnqueueResult.QUEUED, cur.lastrowid), 1 - dropped


def _delete_where(conn: sqlite3.Connection, recipient: str, column: str, values: list[Any]) -> int:
    rows: list[tuple[int, str, int]] = []
    for part in _chunks(values):
        rows += conn.execute(f"SELECT seq, recipient, size FROM messages WHERE recipient = ? "
                             f"AND {column} IN ({_marks(len(part))})", (recipient, *part)).fetchall()
    return _delete_rows(conn, rows)


def _delete_rows(conn: sqlite3.Connection, rows: list[tuple[int, str, int]]) -> int:
    """Delete messages given as (seq, recipient, size) and keep the counters exact."""
    per_recipient: dict[str, list[int]] = {}
    for seq, recipient, size in rows:
        counts = per_recipient.setdefault(recipient, [0, 0])
        counts[0] += 1
        counts[1] += size
    for part in _chunks([r[0] for r in rows]):
        conn.execute(f"DELETE FROM messages WHERE seq IN ({_marks(len(part))})", part)
    for recipient, (count, size) in per_recipient.items():
        conn.execute("UPDATE queues SET count = count - ?, bytes = bytes - ? WHERE recipient = ?",
                     (count, size, recipient))
        conn.execute("DELETE FROM queues WHERE recipient = ? AND count <= 0", (recipient,))
    return len(rows)

"""What only the SQLite backend promises: durability, safe opening, group commit, faults."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import WriteLock, sqlite_file, wait_for_state

from relayd.storage.memory import MemoryStore
from relayd.storage.sqlite.store import SQLiteStore
from relayd.storage.sqlite.checkpoint import BACKSTOP_PAGES
from relayd.storage.sqlite.file import backup_database, read_stats
from relayd.storage.sqlite.owner import lock_path
from relayd.storage.sqlite import queue as sqlite_queue
from relayd.storage.sqlite.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, migrate
from relayd.storage.store import (KEY_OVERHEAD_BYTES, RECEIPT_BYTES, EnqueueResult, KeyRecord, QueuedMessage,
                                  QueueLimits, Receipt, StorageUnavailable, StoreOpenError)

QUEUED = EnqueueResult.QUEUED
ROOMY = QueueLimits(max_messages=100_000, max_bytes=10**9, drop_oldest=False)
ADDRESS = "0x" + "ab" * 20


def msg(message_id: str, content: str = "hello", *, recipient: str = "bob", sender: str = "alice",
        queued_at: int = 1000) -> QueuedMessage:
    return QueuedMessage(recipient, sender, message_id, content, queued_at - 1, queued_at)


async def opened(path: Path, **kwargs: Any) -> SQLiteStore:
    store = SQLiteStore(str(path), **kwargs)
    await store.open()
    return store


async def run_job(store: SQLiteStore, sql: str, write: bool = False) -> Any:
    """Run one statement on the writer thread (test-only access to the connection)."""
    return await store._writer.submit(lambda c: (c.execute(sql).fetchall(), (0, 0)), write=write)


def open_fails(path: Path) -> str:
    return asyncio.run(open_fails_async(path))


async def open_fails_async(path: Path) -> str:
    with pytest.raises(StoreOpenError) as info:
        await SQLiteStore(str(path)).open()
    return str(info.value)


# Durability and the file format

def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "data" / "relay.db"

    async def first() -> int:
        store = await opened(db)
        for i in range(3):
            await store.enqueue(msg(f"m{i}", f"text {i}", queued_at=1000 + i), ROOMY)
        assert await store.ack("bob", ["m2"]) == 1
        await store.add_receipts([Receipt("bob", "carol", "m0", 1234)], 10_000)
        await store.put_key(KeyRecord("bob", "pk1", 100, 100))
        await store.put_key(KeyRecord("bob", "pk2", 200, 200, "secp256k1", 190, "hex", "sig"))
        await store.close()
        await store.close()
        with pytest.raises(StorageUnavailable):
            await store.size("bob")
        return 3

    async def second() -> None:
        store = await opened(db)
        assert store.total() == 2
        pending = await store.pending("bob", 10)
        assert [(m.message_id, m.content, m.timestamp, m.queued_at) for m in pending] == [
            ("m0", "text 0", 999, 1000), ("m1", "text 1", 1000, 1001)]
        receipts = await store.receipts("bob", 10)
        assert [(r.reader, r.message_id, r.timestamp) for r in receipts] == [("carol", "m0", 1234)]
        assert await store.get_key("bob") == KeyRecord("bob", "pk2", 100, 200, "secp256k1", 190,
                                                       "hex", "sig")
        new = msg("m3")
        await store.enqueue(new, ROOMY)
        assert new.seq > max(m.seq for m in pending), "a new message comes after every stored one"
        assert await store.stats() == {"recipients": 1, "messages": 3, "bytes": 17, "receipts": 1,
                                       "keys": 1}
        await store.close()

    asyncio.run(first())
    asyncio.run(second())


def test_wal_application_id_and_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def main() -> None:
        store = await opened(db, synchronous="full")
        assert (await run_job(store, "PRAGMA journal_mode"))[0][0] == "wal"
        assert (await run_job(store, "PRAGMA synchronous"))[0][0] == 2
        assert (await run_job(store, "PRAGMA busy_timeout"))[0][0] > 0
        await store.close()

    asyncio.run(main())
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)]
    conn.close()


def test_version_1_database_migrates_and_locks_signed_keys(tmp_path: Path) -> None:
    """A database written by schema 1 gains the locks table; its signed keys become locks."""
    import relayd.storage.sqlite.schema as sqlite_store
    db = tmp_path / "relay.db"
    signed = "0x" + "ab" * 20
    unsigned = "0x" + "cd" * 20

    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
    conn.execute(f"PRAGMA application_id = {sqlite_store.APPLICATION_ID}")
    for statement in sqlite_store.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.execute("INSERT INTO keys VALUES (?, 'k', 1, 1, 'x25519', 5, 'doubleHash', ?)", (signed, "0x" + "11" * 65))
    conn.execute("INSERT INTO keys VALUES (?, 'k', 1, 1, NULL, NULL, NULL, NULL)", (unsigned,))
    conn.commit()
    conn.close()

    async def reopen() -> tuple[bool, bool]:
        store = await opened(db)
        try:
            return await store.is_locked(signed), await store.is_locked(unsigned)
        finally:
            await store.close()

    assert asyncio.run(reopen()) == (True, False)


def test_bad_synchronous_mode_is_rejected() -> None:
    with pytest.raises(ValueError):
        SQLiteStore("x.db", synchronous="off")


def test_empty_file_is_initialised(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    db.touch()

    async def main() -> None:
        store = await opened(db)
        assert await store.enqueue(msg("m"), ROOMY) is QUEUED
        await store.close()
    asyncio.run(main())
    assert read_stats(str(db))["messages"] == 1


def _assert_untouched(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_text_file_is_refused_and_untouched(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    for content in (b"hello\n" * 100, b"hi"):
        db.write_bytes(content)
        assert "not a SQLite database" in open_fails(db)
        _assert_untouched(db, content)


def test_foreign_sqlite_database_is_refused_and_untouched(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    sqlite_file(db, "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO users (name) VALUES ('x')")
    before = db.read_bytes()
    assert "another application" in open_fails(db)
    _assert_untouched(db, before)
    with pytest.raises(StoreOpenError):
        read_stats(str(db))
    _assert_untouched(db, before)


@pytest.mark.parametrize("setup", [
    "PRAGMA application_id = 1234",
    "CREATE TABLE schema_version (version INTEGER)",
])
def test_other_foreign_shapes_are_refused(tmp_path: Path, setup: str) -> None:
    db = tmp_path / "other.db"
    sqlite_file(db, setup)
    before = db.read_bytes()
    assert "another application" in open_fails(db)
    _assert_untouched(db, before)


def test_corrupt_database_is_refused_and_untouched(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def create() -> None:
        await (await opened(db)).close()
    asyncio.run(create())
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)
    db.write_bytes(bytes(data))
    assert "corrupt" in open_fails(db)
    assert db.read_bytes() == bytes(data)


def test_directory_path_is_refused(tmp_path: Path) -> None:
    assert "directory" in open_fails(tmp_path)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def create() -> None:
        await (await opened(db)).close()
    asyncio.run(create())
    sqlite_file(db, f"INSERT INTO schema_version (version, applied_at) VALUES ({SCHEMA_VERSION + 1}, 0)")
    before = db.read_bytes()
    assert "newer" in open_fails(db)
    assert db.read_bytes() == before


# Group commit and the writer thread

def test_group_commit_groups_concurrent_writes(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        before = store.commits
        sent = [msg(f"m{i}", recipient=f"r{i % 7}") for i in range(200)]
        results = await asyncio.gather(*(store.enqueue(m, ROOMY) for m in sent))
        assert results == [QUEUED] * 200
        assert store.commits - before <= 10
        assert len({m.seq for m in sent}) == 200
        assert store.total() == 200
        await store.close()
    asyncio.run(main())


def test_the_log_is_checkpointed_by_its_own_thread_and_the_writer_only_as_a_backstop(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        assert await run_job(store, "PRAGMA wal_autocheckpoint") == [(BACKSTOP_PAGES,)]
        sent = [msg(f"m{i}", "x" * 500, recipient=f"r{i % 50}") for i in range(4000)]
        for start in range(0, len(sent), 100):
            assert await store.enqueue_many(sent[start:start + 100], ROOMY) == [QUEUED] * 100
        await wait_for_state(lambda: store._checkpoints.checkpoints > 0, "a checkpoint on the checkpoint thread")
        await store.close()
        assert not any(t.name == "relayd-sqlite-checkpoint" for t in threading.enumerate())
        assert not (tmp_path / "relay.db-wal").exists()  # the last connection closed checkpointed it all
        store = await opened(tmp_path / "relay.db")
        assert store.total() == 4000 and await store.size("r7") == 80
        await store.close()
    asyncio.run(main())


def test_reads_do_not_wait_for_the_commit_interval(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db", commit_interval_ms=400)
        start = time.perf_counter()
        await store.enqueue(msg("m"), ROOMY)
        assert time.perf_counter() - start >= 0.35, "a lone write lingers for company"
        start = time.perf_counter()
        for _ in range(5):
            assert await store.size("bob") == 1
        assert time.perf_counter() - start < 0.3
        await store.close()
    asyncio.run(main())


def test_a_failing_job_fails_alone(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db", commit_interval_ms=20)

        def bad(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.execute("INSERT INTO meta (key, value) VALUES ('half', 'done')")
            raise ZeroDivisionError("bug")

        results = await asyncio.gather(store.enqueue(msg("a"), ROOMY),
                                       store._writer.submit(bad, write=True),
                                       store.enqueue(msg("b"), ROOMY), return_exceptions=True)
        assert results[0] is QUEUED and results[2] is QUEUED
        assert isinstance(results[1], ZeroDivisionError)
        assert store.healthy
        assert await run_job(store, "SELECT * FROM meta") == []
        assert [m.message_id for m in await store.pending("bob", 10)] == ["a", "b"]
        await store.close()
    asyncio.run(main())


def test_cancelled_caller_does_not_disturb_the_store(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        task = asyncio.create_task(store.enqueue(msg("a"), ROOMY))
        await asyncio.sleep(0)
        task.cancel()
        assert await store.enqueue(msg("b"), ROOMY) is QUEUED
        assert store.total() == await store.size("bob") == 2
        await store.close()
    asyncio.run(main())


def test_cancelled_open_leaves_the_store_reusable(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(str(tmp_path / "relay.db"))
        task = asyncio.create_task(store.open())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.open()
        assert await store.enqueue(msg("a"), ROOMY) is QUEUED
        await store.close()
    asyncio.run(main())


# Faults

def test_disk_full_makes_store_unhealthy_then_recovers(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relayd.storage")

    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        await store.enqueue(msg("small", recipient=ADDRESS), ROOMY)
        await run_job(store, "PRAGMA max_page_count = 1")  # clamps to the current size
        for attempt in ("big1", "big2"):
            with pytest.raises(StorageUnavailable, match="disk full"):
                await store.enqueue(msg(attempt, "x" * 50_000, recipient=ADDRESS), ROOMY)
        assert not store.healthy and store.problem and "disk full" in store.problem
        assert store.total() == 1
        assert [m.message_id for m in await store.pending(ADDRESS, 10)] == ["small"]
        await run_job(store, "PRAGMA max_page_count = 1000000")
        assert await store.enqueue(msg("big1", "x" * 50_000, recipient=ADDRESS), ROOMY) is QUEUED
        assert store.healthy and store.problem is None
        assert store.total() == 2
        await store.close()

    asyncio.run(main())
    records = [r for r in caplog.records if r.name == "relayd.storage"]
    assert [r.levelno for r in records] == [logging.ERROR, logging.WARNING]
    assert "disk full" in records[0].getMessage()
    assert ADDRESS not in caplog.text


def test_locked_database_fails_fast_and_recovers(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def main() -> None:
        store = await opened(db, busy_timeout_ms=50)
        with WriteLock(db):
            with pytest.raises(StorageUnavailable, match="locked"):
                await store.enqueue(msg("a"), ROOMY)
            assert store.problem == "database is locked"
        assert await store.enqueue(msg("a"), ROOMY) is QUEUED
        assert store.healthy
        await store.close()
    asyncio.run(main())


class _FailingCommit:
    """Wraps the writer's connection so that COMMIT fails like a dying disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_failed_commit_fails_the_whole_batch(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db", commit_interval_ms=20)
        real = store._writer._conn
        assert real is not None
        store._writer._conn = _FailingCommit(real)  # type: ignore[assignment]
        results = await asyncio.gather(*(store.enqueue(msg(f"m{i}"), ROOMY) for i in range(10)),
                                       return_exceptions=True)
        assert all(isinstance(r, StorageUnavailable) for r in results)
        assert store.problem == "disk I/O error"
        assert store.total() == 0
        store._writer._conn = real
        assert await store.size("bob") == 0
        assert await store.enqueue(msg("m0"), ROOMY) is QUEUED
        assert store.healthy and store.total() == 1
        await store.close()
    asyncio.run(main())


# Numbering: a taken seq is an error, never a duplicate

def _plant(seq: int, message_id: str) -> str:
    """SQL for a message row numbered ``seq`` by something other than the store's counter."""
    return (f"INSERT INTO messages (seq, recipient, sender, message_id, timestamp, queued_at, size, content) "
            f"VALUES ({seq}, 'bob', 'mallory', '{message_id}', 1, 1, 1, 'x')")


_BATCH_MESSAGES = st.builds(
    msg, st.sampled_from(["m1", "m2", "m3", "m4"]), st.sampled_from(["", "abc", "abcdefgh", "\u00e9t\u00e9", "x" * 15]),
    recipient=st.sampled_from(["bob", "carol", "dave"]), sender=st.sampled_from(["alice", "Alice", "erin"]))


@settings(max_examples=200, deadline=None)
@given(earlier=st.lists(_BATCH_MESSAGES, max_size=8), delivered=st.lists(_BATCH_MESSAGES, max_size=3),
       batch=st.lists(_BATCH_MESSAGES, min_size=sqlite_queue.FEW, max_size=16),
       max_messages=st.integers(1, 5), max_bytes=st.integers(5, 40), drop_oldest=st.booleans(),
       max_total_bytes=st.sampled_from([0, 30, 60, 120]))
def test_a_batch_is_enqueued_as_its_messages_one_by_one(earlier: list[QueuedMessage], delivered: list[QueuedMessage],
                                                        batch: list[QueuedMessage], max_messages: int,
                                                        max_bytes: int, drop_oldest: bool,
                                                        max_total_bytes: int) -> None:
    """enqueue_rows (batched reads, executemany) gives each message the result, seq and stored state that
    enqueue_row gives it one at a time: duplicates in and across batches, delivered ones, caps, dropping."""
    limits = QueueLimits(max_messages, max_bytes, drop_oldest, max_total_bytes)
    outcomes = []
    for batched in (False, True):
        conn = sqlite3.connect(":memory:", isolation_level=None)
        migrate(conn)
        seqs = sqlite_queue.SeqCounter(0)
        stored = 0
        for m in earlier:
            stored += sqlite_queue.enqueue_row(conn, m, ROOMY, seqs, 0)[1][1]
        sqlite_queue.record_delivered_rows(conn, delivered)
        copies = [QueuedMessage(m.recipient, m.sender, m.message_id, m.content, m.timestamp, m.queued_at)
                  for m in batch]
        if batched:
            results, delta = sqlite_queue.enqueue_rows(conn, copies, limits, seqs, stored)
        else:
            results, delta = [], (0, 0)
            for m in copies:
                result, change = sqlite_queue.enqueue_row(conn, m, limits, seqs, stored + delta[1])
                results.append(result)
                delta = (delta[0] + change[0], delta[1] + change[1])
        outcomes.append((results, delta,
                         conn.execute("SELECT * FROM messages ORDER BY seq").fetchall(),
                         conn.execute("SELECT * FROM queues ORDER BY recipient").fetchall()))
        conn.close()
    assert outcomes[1] == outcomes[0]


def test_a_taken_seq_fails_the_write_is_logged_and_numbering_moves_past_it(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="relayd.storage")

    async def main() -> None:
        store = await opened(tmp_path / "relay.db", commit_interval_ms=0)
        first = msg("m1")
        assert await store.enqueue(first, ROOMY) is QUEUED
        await run_job(store, _plant(first.seq + 1, "planted"), write=True)
        with pytest.raises(StorageUnavailable, match="numbering"):
            await store.enqueue(msg("m2"), ROOMY)
        assert "seq" in caplog.text and "already taken" in caplog.text
        assert store.healthy, "one failed job, not a failing disk"
        await run_job(store, _plant(first.seq + 10, "planted2"), write=True)
        store._seqs.last = first.seq + 9  # behind again: a whole batch fails, none of it is stored
        batch = [msg("m2"), msg("m3")]
        with pytest.raises(StorageUnavailable):
            await store.enqueue_many(batch, ROOMY)
        assert [m.message_id for m in await store.pending("bob", 10)] == ["m1", "planted", "planted2"]
        assert await store.enqueue_many(batch, ROOMY) == [QUEUED, QUEUED]
        assert batch[0].seq > first.seq + 10
        again = msg("m1")
        assert await store.enqueue(again, ROOMY) is EnqueueResult.DUPLICATE and again.seq == first.seq
        await store.close()
    asyncio.run(main())


def test_restore_renumbers_a_message_whose_seq_another_holds(tmp_path: Path) -> None:
    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        sent = [msg(f"m{i}") for i in range(2)]
        assert await store.enqueue_many(sent, ROOMY) == [QUEUED, QUEUED]
        assert await store.remove("bob", [sent[0].seq]) == 1
        stranger = msg("stranger", recipient="carol")
        stranger.seq = sent[1].seq  # numbered elsewhere
        far = msg("far", recipient="carol")
        far.seq = sent[1].seq + 100
        assert await store.restore([sent[0], stranger, far]) == 3
        assert sent[0].seq == 1 and stranger.seq not in (sent[1].seq, far.seq)
        assert [m.message_id for m in await store.pending("carol", 10)] == ["stranger", "far"]
        assert [m.message_id for m in await store.pending("bob", 10)] == ["m0", "m1"]
        later = msg("later")
        assert await store.enqueue(later, ROOMY) is QUEUED and later.seq > far.seq
        await store.close()
    asyncio.run(main())


def test_schema_4_database_learns_delivered_message_ids(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for version, statements in enumerate(MIGRATIONS[:4], 1):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
    conn.execute(_plant(7, "old"))
    conn.execute("INSERT INTO queues (recipient, count, bytes, receipts) VALUES ('bob', 1, 1, 0)")
    conn.close()

    async def main() -> None:
        store = await opened(db)
        assert store.total() == 1
        assert await store.ack("bob", ["old"]) == 1
        assert await store.enqueue(msg("old", sender="MALLORY"), ROOMY) is EnqueueResult.DELIVERED
        new = msg("new")
        assert await store.enqueue(new, ROOMY) is QUEUED and new.seq == 8
        await store.close()
    asyncio.run(main())
    assert read_stats(str(db))["schema_version"] == SCHEMA_VERSION == 8


def test_enqueue_lookups_use_the_indexes(tmp_path: Path) -> None:
    from relayd.storage.sqlite.queue import _PROBE, _STORED

    async def plan(store: SQLiteStore, sql: str, *args: str) -> str:
        for i, arg in enumerate(args, 1):
            sql = sql.replace(f"?{i}", arg, 1) if f"?{i}" in sql else sql.replace("?", arg, 1)
        return " | ".join(row[-1] for row in await run_job(store, "EXPLAIN QUERY PLAN " + sql))

    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        probe = await plan(store, _PROBE.replace("?1", "'b'").replace("?2", "'m'").replace("?3", "'s'"))
        assert "SEARCH delivered USING PRIMARY KEY" in probe and "SEARCH q USING PRIMARY KEY" in probe, probe
        stored = await plan(store, _STORED, "'b'", "'m'", "'s'")
        assert "SEARCH messages USING INDEX messages_ident" in stored, stored
        await store.close()
    asyncio.run(main())


# One relayd per database

def test_a_second_store_on_an_open_database_is_refused_naming_the_holder(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def main() -> None:
        first = await opened(db)
        assert await first.enqueue(msg("m1"), ROOMY) is QUEUED
        reason = await open_fails_async(db)
        assert "in use by another relayd" in reason and f"PID {os.getpid()}" in reason, reason
        assert socket.gethostname() in reason and str(db) in reason
        assert read_stats(str(db))["messages"] == 1, "read-only tools work beside it"
        assert lock_path(db).read_text().startswith(f"pid {os.getpid()} host ")
        await first.close()
        assert not lock_path(db).exists(), "a clean close leaves only the database"
        second = await opened(db)
        assert [m.message_id for m in await second.pending("bob", 10)] == ["m1"]
        await second.close()
    asyncio.run(main())


def test_a_lock_file_left_by_a_killed_relayd_is_reused(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    lock_path(db).write_text("pid 999999 host elsewhere since 0\n")

    async def main() -> None:
        store = await opened(db)
        assert lock_path(db).read_text().startswith(f"pid {os.getpid()} ")
        await store.close()
    asyncio.run(main())


def test_a_file_system_without_locks_starts_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING, logger="relayd.storage")

    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        assert await store.enqueue(msg("m"), ROOMY) is QUEUED
        await store.close()
    asyncio.run(main())
    assert "no locks" in caplog.text and "only one" in caplog.text


def test_an_open_that_fails_releases_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import relayd.storage.sqlite.store as store_module
    db = tmp_path / "relay.db"

    def broken(conn: sqlite3.Connection) -> None:
        raise StoreOpenError("migration failed")

    async def main() -> None:
        with monkeypatch.context() as patch:
            patch.setattr(store_module, "migrate", broken)
            assert "migration failed" in await open_fails_async(db)
        store = await opened(db)
        await store.close()
    asyncio.run(main())


# Counters, expiry, backup, offline stats

def test_total_stays_exact(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def check(store: SQLiteStore) -> None:
        assert store.total() == (await store.stats())["messages"]
        queued = [len(await store.pending(r, 1000)) for r in ("bob", "carol")]
        assert store.total() == sum(queued)

    async def main() -> None:
        store = await opened(db)
        sent = [msg(f"m{i}", recipient="bob" if i % 3 else "carol", queued_at=i) for i in range(30)]
        for m in sent:
            await store.enqueue(m, ROOMY)
        await check(store)
        await store.remove("bob", [sent[1].seq, sent[2].seq, 10**9])
        await check(store)
        await store.ack("carol", ["m0", "m3", "zzz"])
        await check(store)
        await store.expire(10)
        await check(store)
        dropping = QueueLimits(max_messages=4, max_bytes=10**6, drop_oldest=True)
        await store.enqueue(msg("new", recipient="bob"), dropping)
        await check(store)
        await store.clear("carol")
        await check(store)
        assert store.total() == 4
        await store.close()
        store = await opened(db)
        assert store.total() == 4
        await check(store)
        await store.close()
    asyncio.run(main())


def test_a_page_is_removed_by_its_range_only_when_it_holds_every_message_of_it(tmp_path: Path) -> None:
    """A flushed page (every message of the recipient from its first seq to its last, other recipients' between)
    goes by range; a list that skips one of the recipient's messages, or names one gone, removes only those named.
    Either way the removed are known as delivered and the counters stay exact."""
    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        sent = [msg(f"m{i}", recipient="bob" if i % 3 else "carol") for i in range(30)]
        for m in sent:
            await store.enqueue(m, ROOMY)
        bob = [m.seq for m in sent if m.recipient == "bob"]
        assert await store.remove("bob", [bob[2], bob[0], bob[1], bob[1]]) == 3
        assert await store.remove("bob", [bob[3], bob[5]]) == 2  # skips bob[4]
        assert await store.remove("bob", [bob[6], bob[7], 10**9]) == 2
        assert await store.remove("carol", bob[8:12]) == 0
        assert [m.seq for m in await store.pending("bob", 100)] == [bob[4], *bob[8:]]
        assert len(await store.pending("carol", 100)) == 10
        assert store.total() == (await store.stats())["messages"] == 10 + len(bob) - 7
        assert await store.size("bob") == len(bob) - 7
        for removed in ("m1", "m8", "m11"):  # bob[0], bob[5], bob[7]
            assert await store.enqueue(msg(removed, recipient="bob"), ROOMY) is EnqueueResult.DELIVERED
        assert await store.enqueue(msg("m7", recipient="bob"), ROOMY) is EnqueueResult.DUPLICATE  # bob[4]
        for sql in (sqlite_queue._RANGE_ROWS, sqlite_queue._RANGE_DELIVERED, sqlite_queue._RANGE_DELETE):
            bound = sql.replace("?", "'bob'", 1).replace("?", "1").replace("LIMIT 1", "LIMIT 2")
            plan = " | ".join(row[-1] for row in await run_job(store, "EXPLAIN QUERY PLAN " + bound))
            assert "SEARCH messages USING INDEX messages_recipient_seq" in plan and "SCAN messages" not in plan, plan
        await store.close()
    asyncio.run(main())


def test_expire_works_in_batches_and_lets_other_jobs_through(tmp_path: Path) -> None:
    rows = 20_000

    async def main() -> None:
        store = await opened(tmp_path / "relay.db", commit_interval_ms=0)
        for start in range(0, rows, 2000):
            await asyncio.gather(*(store.enqueue(msg(f"m{i}", "x" * 20, recipient=f"r{i % 50}",
                                                     queued_at=i), ROOMY)
                                   for i in range(start, start + 2000)))
        for i in range(2500):
            await store.add_receipts([Receipt("bob", "carol", f"m{i}", i)], 10_000)
        assert store.total() == rows
        commits = store.commits
        expiring = asyncio.create_task(store.expire(rows))
        await asyncio.sleep(0)
        assert await store.enqueue(msg("late", queued_at=10**12), ROOMY) is QUEUED
        assert not expiring.done(), "the enqueue overtook the expiry"
        assert await expiring == rows
        assert store.commits - commits >= rows // 1000
        assert store.total() == 1
        assert await store.stats() == {"recipients": 1, "messages": 1, "bytes": 5, "receipts": 0,
                                       "keys": 0}
        await store.close()
    asyncio.run(main())


def test_backup_while_running(tmp_path: Path) -> None:
    copy = tmp_path / "backups" / "copy.db"

    async def main() -> None:
        store = await opened(tmp_path / "relay.db")
        for i in range(50):
            await store.enqueue(msg(f"m{i}", f"text {i}"), ROOMY)
        await store.add_receipts([Receipt("bob", "carol", "m1", 5)], 10_000)
        await store.put_key(KeyRecord("bob", "pk", 1, 2))
        copy.parent.mkdir()
        results = await asyncio.gather(asyncio.to_thread(backup_database, str(tmp_path / "relay.db"), str(copy)),
                                       store.enqueue(msg("during"), ROOMY))
        assert results[1] is QUEUED
        original = [m.message_id for m in await store.pending("bob", 100)]
        await store.close()

        restored = await opened(copy)
        got = [m.message_id for m in await restored.pending("bob", 100)]
        assert got == original or got == original[:-1]
        assert got[:50] == [f"m{i}" for i in range(50)]
        assert restored.total() == len(got)
        assert await restored.get_key("bob") == KeyRecord("bob", "pk", 1, 2)
        assert len(await restored.receipts("bob", 10)) == 1
        await restored.close()
    asyncio.run(main())


def test_read_stats_is_read_only(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"

    async def main() -> None:
        store = await opened(db)
        for i in range(5):
            await store.enqueue(msg(f"m{i}", "abc", recipient=f"r{i % 2}"), ROOMY)
        await store.put_key(KeyRecord("bob", "pk", 1, 2))
        assert read_stats(str(db)) == {"recipients": 2, "messages": 5, "bytes": 15,
                                       "receipts": 0, "keys": 1,
                                       "schema_version": SCHEMA_VERSION}
        await store.close()

    asyncio.run(main())
    before = db.read_bytes()
    assert read_stats(str(db))["messages"] == 5
    assert db.read_bytes() == before
    with pytest.raises(StoreOpenError, match="no database"):
        read_stats(str(tmp_path / "missing.db"))


# The SQLite store behaves like the reference MemoryStore

_RECIPIENTS = st.sampled_from(["bob", "carol", "dave"])
_SENDERS = st.sampled_from(["alice", "Alice", "eve"])
_OPS = st.one_of(
    st.tuples(st.just("enqueue"), _RECIPIENTS, _SENDERS,
              st.integers(0, 9), st.integers(0, 5), st.integers(0, 20),
              st.sampled_from([(3, 8, False), (3, 8, True), (100, 1000, False), (1, 5, True)])),
    st.tuples(st.just("pending"), _RECIPIENTS, st.integers(0, 4), st.integers(0, 3)),
    st.tuples(st.just("remove"), _RECIPIENTS, st.lists(st.integers(0, 4), max_size=3)),
    st.tuples(st.just("ack"), _RECIPIENTS, st.lists(st.integers(0, 9), max_size=3)),
    st.tuples(st.just("clear"), _RECIPIENTS),
    st.tuples(st.just("expire"), st.integers(0, 21)),
    st.tuples(st.just("receipt"), _RECIPIENTS, st.integers(0, 20)),
    st.tuples(st.just("take"), _RECIPIENTS, st.integers(0, 3)),
    st.tuples(st.just("delivered"), _RECIPIENTS, _SENDERS, st.integers(0, 9), st.integers(0, 20)),
    st.tuples(st.just("restore"), _RECIPIENTS, _SENDERS, st.integers(0, 9), st.integers(0, 20)),
    st.tuples(st.just("shift"), st.integers(0, 21), st.integers(-5, 5)),
)


async def _apply(store: Any, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "enqueue":
        _, recipient, sender, n, size, when, (max_messages, max_bytes, drop) = op
        m = QueuedMessage(recipient, sender, f"id{n}", "x" * min(size, max_bytes), when, when)
        return await store.enqueue(m, QueueLimits(max_messages, max_bytes, drop))
    if kind == "pending":
        _, recipient, limit, skip = op
        everything = await store.pending(recipient, 100)
        after = everything[skip - 1].seq if 0 < skip <= len(everything) else 0
        return [(m.sender, m.message_id, m.queued_at) for m in await store.pending(recipient, limit, after)]
    if kind == "remove":
        everything = await store.pending(op[1], 100)
        return await store.remove(op[1], [everything[i].seq for i in op[2] if i < len(everything)])
    if kind == "ack":
        return await store.ack(op[1], [f"id{n}" for n in op[2]])
    if kind == "clear":
        return await store.clear(op[1])
    if kind == "expire":
        return await store.expire(op[1])
    if kind == "receipt":
        return await store.add_receipts([Receipt(op[1], "reader", f"r{op[2]}", op[2])], 10_000)
    if kind in ("delivered", "restore"):
        _, recipient, sender, n, when = op
        m = QueuedMessage(recipient, sender, f"id{n}", "x", when, when)
        return await (store.record_delivered([m]) if kind == "delivered" else store.restore([m]))
    if kind == "shift":
        return await store.shift_times(op[1], op[2])
    taken = await store.receipts(op[1], op[2])
    await store.remove_receipts(op[1], [r.seq for r in taken])
    return [(r.message_id, r.timestamp) for r in taken]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OPS, max_size=25))
def test_matches_memory_store(ops: list[tuple[Any, ...]]) -> None:
    async def main(path: str) -> None:
        model, store = MemoryStore(), SQLiteStore(path, commit_interval_ms=0)
        await store.open()
        try:
            for op in ops:
                assert await _apply(store, op) == await _apply(model, op), op
                assert store.total() == model.total()
            assert await store.stats() == await model.stats()
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(f"{tmp}/relay.db"))


def test_what_the_budget_counts_is_read_back_at_open(tmp_path: Path) -> None:
    """Keys and receipts count in the storage budget after a restart too (issue 20: they were outside it)."""
    db = tmp_path / "relay.db"

    async def main() -> None:
        store = await opened(db)
        await store.put_key(KeyRecord("carol", "k" * 300, 1, 1))
        await store.add_receipts([Receipt("bob", "reader", f"m{i}", 1000) for i in range(4)], 100)
        assert await store.enqueue(QueuedMessage("bob", "alice", "m1", "hello", 1, 1), ROOMY) is QUEUED
        counted = store.stored_bytes()
        assert counted == 300 + KEY_OVERHEAD_BYTES + 4 * RECEIPT_BYTES + 5
        await store.close()
        again = await opened(db)
        assert again.stored_bytes() == counted
        await again.close()
    asyncio.run(main())

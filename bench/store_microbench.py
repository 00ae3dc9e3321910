"""Enqueue throughput of MemoryStore vs SQLiteStore, and open() time on a 1M-message file.

Run from the repository root: ``python bench/store_microbench.py [--seconds 3]``. Single enqueues from many
producers (the writer groups their jobs), then ``enqueue_many`` batches as the message path sends them (one per
loop iteration); CPU is the whole process's (the writer thread included) per message.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.storage.memory import MemoryStore  # noqa: E402
from relayd.storage.sqlite.store import SQLiteStore  # noqa: E402
from relayd.storage.sqlite.file import backup_database  # noqa: E402
from relayd.storage.store import QueuedMessage, QueueLimits, Store  # noqa: E402

LIMITS = QueueLimits(max_messages=10**9, max_bytes=10**12, drop_oldest=False)
CONTENT = "x" * 200


async def throughput(store: Store, producers: int, seconds: float, batch: int = 1) -> tuple[float, float]:
    """(messages/s, process CPU µs per message); ``batch`` > 1: each producer stores that many at a time, to
    as many recipients."""
    await store.open()
    ids = itertools.count()
    deadline = time.perf_counter() + seconds
    done = 0

    async def produce(n: int) -> None:
        nonlocal done
        recipients = [f"0x{n * batch + k:040x}" for k in range(batch)]
        while time.perf_counter() < deadline:
            now = int(time.time() * 1000)
            messages = [QueuedMessage(r, "0xsender", f"m{next(ids)}", CONTENT, now, now) for r in recipients]
            if batch == 1:
                await store.enqueue(messages[0], LIMITS)
            else:
                await store.enqueue_many(messages, LIMITS)
            done += batch

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(produce(n) for n in range(producers)))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await store.close()
    return done / elapsed, cpu / done * 1e6


def build_big(path: Path, rows: int, recipients: int) -> None:
    asyncio.run(_init(path))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO messages (recipient, sender, message_id, content, timestamp, queued_at, size) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        ((f"0x{i % recipients:040x}", "0xsender", f"m{i}", CONTENT, i, i, len(CONTENT))
         for i in range(rows)))
    conn.execute("INSERT INTO queues (recipient, count, bytes) "
                 "SELECT recipient, COUNT(*), SUM(size) FROM messages GROUP BY recipient")
    conn.execute("COMMIT")
    conn.close()


async def _init(path: Path) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    await store.close()


async def time_open(path: Path) -> tuple[float, int]:
    store = SQLiteStore(str(path))
    start = time.perf_counter()
    await store.open()
    elapsed = time.perf_counter() - start
    total = store.total()
    await store.close()
    return elapsed, total


async def time_backup(path: Path, dest: Path) -> float:
    start = time.perf_counter()
    await asyncio.to_thread(backup_database, str(path), str(dest))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--producers", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=16, help="messages per enqueue_many in the batch rows")
    parser.add_argument("--batch-producers", type=int, default=20, help="producers in the batch rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        memory, memory_cpu = asyncio.run(throughput(MemoryStore(), args.producers, args.seconds))
        print(f"{'memory':<32} {memory:9,.0f} msg/s  {memory_cpu:6.1f} us CPU/msg")
        rows = [(sync, interval, 1, args.producers) for sync, interval in
                (("normal", 2.0), ("full", 2.0), ("normal", 0.0))]
        rows.append(("normal", 2.0, args.batch, args.batch_producers))
        for sync, interval, batch, producers in rows:
            store = SQLiteStore(f"{tmp}/{sync}{interval}-{batch}.db", synchronous=sync,
                                commit_interval_ms=interval)
            rate, cpu = asyncio.run(throughput(store, producers, args.seconds, batch))
            label = f"sqlite {sync} {interval:g}ms" + (f", {producers} x {batch}" if batch > 1 else "")
            print(f"{label:<32} {rate:9,.0f} msg/s  {cpu:6.1f} us CPU/msg   sqlite/memory = {rate / memory:.3f}")
        big = Path(tmp) / "big.db"
        start = time.perf_counter()
        build_big(big, args.rows, recipients=1000)
        print(f"built {args.rows:,} rows in {time.perf_counter() - start:.1f} s "
              f"({big.stat().st_size / 1e6:.0f} MB)")
        elapsed, total = asyncio.run(time_open(big))
        print(f"open() with {total:,} queued messages: {elapsed * 1000:.0f} ms")
        elapsed = asyncio.run(time_backup(big, Path(tmp) / "copy.db"))
        print(f"backup() of that file: {elapsed * 1000:.0f} ms")


if __name__ == "__main__":
    main()

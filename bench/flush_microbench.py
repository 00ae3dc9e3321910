"""A plain session's flush at the SQLite store alone: pages of 256 against pages of 1,024, alternated in one run.

Run from the repository root: ``python bench/flush_microbench.py [--messages 10000] [--pairs 3]``. Each run fills
a fresh file with one recipient's messages (4 senders, 200 B), then reads and removes them as ``Backlog`` does (a
first page of 32; each later page's read submitted with the removal of the page before it) and prints the CPU of
the whole process (the writer thread included) per message, with the WAL's growth per message (no checkpoint
thread runs out of its way: the file is closed and reopened first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.frames import message_text  # noqa: E402
from relayd.storage.sqlite.store import SQLiteStore  # noqa: E402
from relayd.storage.store import QueuedMessage, QueueLimits  # noqa: E402

LIMITS = QueueLimits(max_messages=10**9, max_bytes=10**12, drop_oldest=False)
RECIPIENT = "0x" + "7" * 40
PAGE_BYTES = 256 * 1024


async def fill(path: str, n: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    now = int(time.time() * 1000)
    for start in range(0, n, 256):
        await store.enqueue_many([QueuedMessage(RECIPIENT, f"0x{i % 4:040x}", f"f{i % 4}-{i}", f"{i}|" + "x" * 194,
                                                now, now) for i in range(start, min(n, start + 256))], LIMITS)
    await store.close()


async def flush(path: str, page: int) -> tuple[int, float, int]:
    """(messages flushed, process CPU seconds, WAL bytes written)."""
    store = SQLiteStore(path)
    await store.open()
    wal = Path(path + "-wal")
    wal_before = wal.stat().st_size if wal.exists() else 0
    cpu = time.process_time()
    done, after = 0, 0
    reading = None
    while True:
        batch = await (reading or store.pending(RECIPIENT, 32 if not after else page, after, PAGE_BYTES))
        reading = None
        if not batch:
            break
        for m in batch:
            message_text(m.sender, m.content, m.message_id, m.timestamp, queued=True)
        done += len(batch)
        after = batch[-1].seq
        reading = asyncio.ensure_future(store.pending(RECIPIENT, page, after, PAGE_BYTES))
        await store.remove(RECIPIENT, [m.seq for m in batch])
    cpu = time.process_time() - cpu
    grown = (wal.stat().st_size if wal.exists() else 0) - wal_before
    await store.close()
    return done, cpu, grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for page in (256, 1024):
                path = os.path.join(tmp, f"{pair}-{page}.db")
                asyncio.run(fill(path, args.messages))
                done, cpu, grown = asyncio.run(flush(path, page))
                assert done == args.messages, done
                print(f"pair {pair + 1} pages of {page:>5}: {cpu / done * 1e6:5.2f} us CPU/msg, "
                      f"WAL grew {grown / done:6.0f} B/msg")


if __name__ == "__main__":
    main()

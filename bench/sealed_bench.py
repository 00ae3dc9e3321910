"""Encryption at rest and message history: stored messages per second and CPU per message with ``SealedStore``,
and with ``[history] days`` on, vs the same backend with neither, in the same run (memory, SQLite, Redis when
redis-server is on PATH, PostgreSQL when its server binaries and relayd's postgres extra are installed: a server
of the run's own, fsync on, started as the tests start it).

Each round, for each backend, plain and sealed in turn (the order alternates by round): N messages of
``--content`` bytes for 1000 recipients, enqueued in batches of ``--batch`` as the relay's delivery does
(``enqueue_many`` once per loop turn), then each recipient's queue read and removed (a flush: with history
on, the removal keeps a copy of each message). Reported:
queued/s and CPU of this process per message (the sealing work is here; the database server's own CPU is not
counted), for
the writes and for the reads; every figure is the median over the rounds.

Run from the repository root: ``python bench/sealed_bench.py [--messages 20000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis_pack_bench import start_redis  # noqa: E402

from relayd.storage.memory import MemoryStore  # noqa: E402
from relayd.storage.sealed import SealedStore  # noqa: E402
from relayd.storage.sealing import generate_key_file, load_keys  # noqa: E402
from relayd.storage.sqlite.store import SQLiteStore  # noqa: E402
from relayd.storage.store import EnqueueResult, QueuedMessage, QueueLimits, Store  # noqa: E402

LIMITS = QueueLimits(max_messages=10**9, max_bytes=10**12, drop_oldest=False)
RECIPIENTS = 1000


async def one_run(store: Store, messages: int, batch: int, content: str) -> dict[str, float]:
    await store.open()
    try:
        now = int(time.time() * 1000)
        recipients = [f"0x{i:040x}" for i in range(RECIPIENTS)]
        msgs = [QueuedMessage(recipients[i % RECIPIENTS], "0x" + "a1" * 20, f"m{i}-{now}", content, now, now)
                for i in range(messages)]
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, messages, batch):
            results = await store.enqueue_many(msgs[start:start + batch], LIMITS)
            assert all(r is EnqueueResult.QUEUED for r in results), results
        write_wall, write_cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        read = 0
        for recipient in recipients:
            page = await store.pending(recipient, 10_000)
            read += len(page)
            await store.remove(recipient, [m.seq for m in page])
        read_wall, read_cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert read == messages, (read, messages)
        return {"queued/s": messages / write_wall, "write cpu us/msg": write_cpu / messages * 1e6,
                "flushed/s": messages / read_wall, "read cpu us/msg": read_cpu / messages * 1e6}
    finally:
        await store.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="messages per enqueue_many (default 64)")
    ap.add_argument("--content", type=int, default=600, help="content bytes per message (default 600)")
    args = ap.parse_args()
    content = "y" * args.content
    tmp = tempfile.mkdtemp(prefix="sealed-bench-")
    load_before = os.getloadavg()[0]
    redis: Any = None
    pg: Any = None
    try:
        key = os.path.join(tmp, "storage.key")
        generate_key_file(key)
        keys = load_keys([key])
        backends: dict[str, Callable[[str], Store]] = {
            "memory": lambda tag: MemoryStore(),
            "sqlite": lambda tag: SQLiteStore(os.path.join(tmp, f"{tag}.db")),
        }
        redis_version = "not measured (no redis-server on PATH)"
        pg_version = "not measured (no PostgreSQL server binaries, or no relayd[postgres])"
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from pg_support import PgServer, pg_bindir
        if pg_bindir() is not None and importlib.util.find_spec("asyncpg") is not None:
            from relayd.storage.postgres.store import PostgresStore
            pg = PgServer(fsync=True)
            backends["postgres"] = lambda tag: PostgresStore(pg.new_database())
            pg_version = Path(str(pg_bindir())).parent.name
        if shutil.which("redis-server"):
            from relayd.storage.redis import RedisStore
            redis, port = start_redis(tmp)
            backends["redis"] = lambda tag: RedisStore(f"redis://127.0.0.1:{port}/0", key_prefix=f"{tag}:")
            import subprocess
            redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout \
                .split()[2]
        figures: dict[str, dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for name, make in backends.items():
                variants = ["plain", "sealed", "history"]
                order = variants if r % 2 == 0 else variants[::-1]
                for variant in order:
                    tag = f"{name}-{variant}-{r}"
                    store = make(tag)
                    if variant == "sealed":
                        store = SealedStore(store, keys)
                    if variant == "history":
                        store.keep_history(7 * 86_400_000)  # type: ignore[attr-defined]
                    result = asyncio.run(one_run(store, args.messages, args.batch, content))
                    for metric, value in result.items():
                        figures.setdefault(f"{name} {variant}", {}).setdefault(metric, []).append(value)
                    print(f"round {r + 1} {name} {variant}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()),
                          file=sys.stderr)
        import cryptography
        import redis as redis_py
        print(f"# bench/sealed_bench.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
              f"cryptography {cryptography.__version__}, redis-py {redis_py.__version__}, Redis server "
              f"{redis_version}, PostgreSQL {pg_version}; {args.messages} messages of {args.content} bytes, batches of {args.batch}, "
              f"{RECIPIENTS} recipients, median of {args.rounds} rounds")
        print(f"# load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
              f"{os.cpu_count()} cores")
        metrics = ["queued/s", "write cpu us/msg", "flushed/s", "read cpu us/msg"]
        print(f"{'':16}" + "".join(f"{m:>18}" for m in metrics))
        for label, values in figures.items():
            print(f"{label:16}" + "".join(f"{statistics.median(values[m]):>18.1f}" for m in metrics))
        def med(label: str, metric: str) -> float:
            return statistics.median(figures[label][metric])
        for name in backends:
            for variant in ("sealed", "history"):
                if f"{name} {variant}" not in figures:
                    continue
                on, off = f"{name} {variant}", f"{name} plain"
                print(f"{name} {variant}/plain: queued/s x{med(on, 'queued/s') / med(off, 'queued/s'):.2f}, "
                      f"write cpu {med(on, 'write cpu us/msg') - med(off, 'write cpu us/msg'):+.1f} us/msg, "
                      f"flushed/s x{med(on, 'flushed/s') / med(off, 'flushed/s'):.2f}, "
                      f"read cpu {med(on, 'read cpu us/msg') - med(off, 'read cpu us/msg'):+.1f} us/msg")
        return 0
    finally:
        if redis is not None:
            os.kill(redis.pid, signal.SIGTERM)
            redis.wait(10)
        if pg is not None:
            pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""RESP packing of Redis writes: relayd's ``write_queue.pack`` against redis-py's ``pack_commands`` and the
unguarded packer relayd had before.

Starts a redis-server of its own (no persistence) on a free loopback port, then
sends N enqueues through ``RedisStore`` in waves of ``--wave`` concurrent
writes (so they share batches, as under load) and one at a time, with each
packer in turn patched into the write queue, and reports wall time, CPU
of this process and CPU per message. A micro-benchmark packs the same enqueue
commands without Redis.

Run from the repository root: ``python bench/redis_pack_bench.py [--messages 20000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayd.storage.redis import RedisStore, write_queue  # noqa: E402
from relayd.storage.store import EnqueueResult, QueuedMessage, QueueLimits  # noqa: E402

LIMITS = QueueLimits(max_messages=10**9, max_bytes=10**12, drop_oldest=False)
CONTENT = "x" * 200


GUARDED = write_queue.pack


def home_made_pack(commands: Sequence[Sequence[Any]], encoder: Any = None) -> bytes:
    """The packer write_queue.py had before (no guard against bools or other types)."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir, "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    raise SystemExit("redis-server did not start")


async def run(url: str, packer: str, messages: int, wave: int) -> dict[str, float]:
    store = RedisStore(url, key_prefix=f"bench{packer}{time.monotonic_ns()}:", probe_interval_s=3600,
                       refresh_interval_s=3600)
    await store.open()
    try:
        writer = store.link.writes.writer
        assert writer is not None
        write_queue.pack = {"guarded": GUARDED, "home-made": home_made_pack,  # type: ignore[assignment]
                            "redis-py": lambda commands, encoder: writer.pack_commands(commands)}[packer]
        now = int(time.time() * 1000)
        msgs = [QueuedMessage(f"0x{i % 1000:040x}", "0x" + "a1" * 20, f"m{i}", CONTENT, now, now)
                for i in range(messages)]
        figures: dict[str, float] = {}
        for mode in ("waves", "serial"):
            part = msgs[:messages] if mode == "waves" else msgs[:messages // 10]
            wall, cpu = time.perf_counter(), time.process_time()
            if mode == "waves":
                for start in range(0, len(part), wave):
                    results = await asyncio.gather(*(store.enqueue(m, LIMITS) for m in part[start:start + wave]))
                    assert all(r in (EnqueueResult.QUEUED, EnqueueResult.DUPLICATE) for r in results)
            else:
                for m in part:
                    m.message_id += "s"
                    await store.enqueue(m, LIMITS)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            figures[f"{mode} msg/s"] = len(part) / wall
            figures[f"{mode} cpu us/msg"] = cpu / len(part) * 1e6
        return figures
    finally:
        await store.close()


def micro(n: int) -> dict[str, float]:
    """Packing alone: n enqueue commands as the store builds them, in batches of 256."""
    from redis.asyncio.connection import Connection
    conn = Connection(decode_responses=True)
    args = ("EVALSHA", "0" * 40, 14, *(f"relayd:{{0x{'b0' * 20}}}:{k}" for k in range(14)), "0x" + "b0" * 20,
            "0x" + "a1" * 20, "m123", '["0xa1",["m123"],200,1,2]\n' + CONTENT, 200, 1700000000000, 1000, 10**6,
            0, 64, 0, "", 0, "", 0)
    batch = [args] * 256
    out = {}
    for name, pack in (("redis-py", lambda b: conn.pack_commands(b)), ("home-made", home_made_pack),
                       ("guarded", lambda b: GUARDED(b, conn.encoder))):
        start = time.process_time()
        for _ in range(n // 256):
            pack(batch)
        out[f"micro {name} us/command"] = (time.process_time() - start) / (n // 256 * 256) * 1e6
    return out


def main() -> None:
    import logging
    logging.getLogger("relayd.storage").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--wave", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_redis(workdir)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for k, v in micro(200_000).items():
                print(f"{k:40s} {v:10.2f}")
            best: dict[str, dict[str, float]] = {}
            for _ in range(options.rounds):
                for packer in ("guarded", "redis-py", "home-made"):
                    figures = asyncio.run(run(url, packer, options.messages, options.wave))
                    kept = best.setdefault(packer, figures)
                    for k, v in figures.items():  # best of the rounds: msg/s highest, CPU lowest
                        kept[k] = max(kept[k], v) if "msg/s" in k else min(kept[k], v)
            for packer, figures in best.items():
                for k, v in figures.items():
                    print(f"{packer + ' ' + k:40s} {v:10.1f}")
        finally:
            write_queue.pack = GUARDED
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)


if __name__ == "__main__":
    main()

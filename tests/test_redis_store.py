"""The Redis store against real redis-server processes: durability, faults, layout, expiry, clusters."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis as redis_py
from redis_support import RedisServer, redis_binary
from support import connect, free_port, msg as frame_to, scaled, wait_until

from relayd.storage.redis import RedisStore
from relayd.storage.redis import scripts
from relayd.storage.redis.layout import key_slot
from relayd.storage.store import (KEY_OVERHEAD_BYTES, EnqueueResult, KeyRecord, QueuedMessage, QueueLimits, Receipt,
                                  StorageOutcomeUnknown, StorageUnavailable)

ROOMY = QueueLimits(max_messages=1000, max_bytes=1_000_000, drop_oldest=False)
BOB = "0x" + "b0" * 20
CAROL = "0x" + "c0" * 20


def msg(recipient: str, message_id: str, content: str = "hello", *, sender: str = "0x" + "a0" * 20,
        queued_at: int | None = None) -> QueuedMessage:
    stamp = queued_at if queued_at is not None else int(time.time() * 1000)
    return QueuedMessage(recipient, sender, message_id, content, stamp - 5, stamp)


def with_store(url: str, body: Callable[[RedisStore], Awaitable[Any]], *, timeout: float = 60,
               **options: Any) -> Any:
    """Open a RedisStore on ``url``, run ``body`` on it (failing after ``timeout`` seconds), close it."""
    async def main() -> Any:
        store = RedisStore(url, **{"probe_interval_s": 0.05, **options})
        await store.open()
        try:
            async with asyncio.timeout(scaled(timeout)):
                return await body(store)
        finally:
            await store.close()

    async def bounded() -> Any:  # opening and closing too
        async with asyncio.timeout(scaled(timeout + 30)):
            return await main()
    return asyncio.run(bounded())


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "") -> None:
    """Poll an async predicate until it holds (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return
        except StorageUnavailable:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


async def enqueue_succeeds(store: RedisStore, message_id: str) -> bool:
    return await store.enqueue(msg(BOB, message_id), ROOMY) is EnqueueResult.QUEUED


def test_acknowledged_messages_survive_a_redis_crash_with_appendonly(durable_redis):
    async def write(store: RedisStore) -> list[int]:
        sent = [msg(BOB, f"m{i}", f"text {i}") for i in range(50)]
        for m in sent:
            assert await store.enqueue(m, ROOMY) is EnqueueResult.QUEUED
        await store.add_receipts([Receipt(BOB, CAROL, "m1", 5)], 10_000)
        await store.put_key(KeyRecord(BOB, "pk", 1, 2))
        return [m.seq for m in sent]
    seqs = with_store(durable_redis.url, write)
    durable_redis.stop(signal.SIGKILL)
    durable_redis.start()

    async def read(store: RedisStore) -> None:
        got = await store.pending(BOB, 100)
        assert [m.message_id for m in got] == [f"m{i}" for i in range(50)]
        assert [m.seq for m in got] == seqs
        assert [r.message_id for r in await store.receipts(BOB, 10)] == ["m1"]
        assert (await store.get_key(BOB)) == KeyRecord(BOB, "pk", 1, 2)
        assert store.total() == 50
    with_store(durable_redis.url, read)


def test_redis_down_is_storage_unavailable_and_the_same_store_recovers(fresh_redis):
    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "before")
        assert store.healthy and store.problem is None
        fresh_redis.stop()
        with pytest.raises(StorageUnavailable, match="Redis is unreachable"):
            await store.enqueue(msg(BOB, "during"), ROOMY)
        assert not store.healthy
        assert "unreachable" in (store.problem or "")
        with pytest.raises(StorageUnavailable):
            await store.pending(BOB, 10)
        fresh_redis.start()
        await eventually(lambda: enqueue_succeeds(store, "after"), what="a write after Redis came back")
        assert store.healthy and store.problem is None
    with_store(fresh_redis.url, body)


def test_health_follows_redis_without_traffic(fresh_redis):
    async def body(store: RedisStore) -> None:
        fresh_redis.stop()
        await eventually(lambda: _is(not store.healthy), what="the probe to notice Redis is gone")
        fresh_redis.start()
        await eventually(lambda: _is(store.healthy), what="the probe to notice Redis is back")
    with_store(fresh_redis.url, body)


async def _is(value: bool) -> bool:
    return value


def test_a_store_opened_while_redis_is_down_starts_unhealthy_and_recovers(tmp_path):
    server = RedisServer(tmp_path / "late")
    server.stop()

    async def body(store: RedisStore) -> None:
        assert not store.healthy and "unreachable" in (store.problem or "")
        server.start()
        await eventually(lambda: enqueue_succeeds(store, "m1"), what="the first write")
        assert store.healthy
    try:
        with_store(server.url, body)
    finally:
        server.stop()


def test_a_hung_redis_times_out_instead_of_hanging(fresh_redis):
    async def body(store: RedisStore) -> None:
        assert fresh_redis.proc is not None
        os.kill(fresh_redis.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StorageUnavailable, match="did not answer"):
                await store.enqueue(msg(BOB, "m1"), ROOMY)
        finally:
            os.kill(fresh_redis.proc.pid, signal.SIGCONT)
        await eventually(lambda: enqueue_succeeds(store, "m2"), what="a write after SIGCONT")
    with_store(fresh_redis.url, body, socket_timeout_s=0.2, probe_interval_s=3600)


def test_out_of_memory_refusal_and_recovery(fresh_redis):
    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m0")
        fresh_redis.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        fresh_redis.cli("CONFIG", "SET", "maxmemory", "1mb")
        with pytest.raises(StorageUnavailable, match=r"out of memory \(.*OOM\)"):
            for i in range(1000):  # fill past the limit if the empty server is still under it
                await store.enqueue(msg(BOB, f"fill{i}", "x" * 4096), ROOMY)
        assert not store.healthy and "OOM" in (store.problem or "")
        fresh_redis.cli("CONFIG", "SET", "maxmemory", "0")
        await eventually(lambda: enqueue_succeeds(store, "m1"), what="a write after maxmemory 0")
        assert store.healthy
    with_store(fresh_redis.url, body, probe_interval_s=3600)


def test_read_only_replica_refusal_and_recovery(fresh_redis):
    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m0")
        fresh_redis.cli("REPLICAOF", "127.0.0.1", str(free_port()))  # nothing listens there
        with pytest.raises(StorageUnavailable, match="read-only replica"):
            await store.enqueue(msg(BOB, "m1"), ROOMY)
        assert not store.healthy
        fresh_redis.cli("REPLICAOF", "NO", "ONE")
        await eventually(lambda: enqueue_succeeds(store, "m2"), what="a write after REPLICAOF NO ONE")
        assert [m.message_id for m in await store.pending(BOB, 10)] == ["m0", "m2"]
    with_store(fresh_redis.url, body, probe_interval_s=3600)


def test_failed_snapshot_refusal_and_recovery(tmp_path):
    server = RedisServer(tmp_path / "misconf", extra=("--enable-protected-configs", "yes"))
    gone = tmp_path / "vanishing"
    gone.mkdir()

    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m0")
        server.cli("CONFIG", "SET", "save", "3600 1")
        server.cli("CONFIG", "SET", "dir", str(gone))
        shutil.rmtree(gone)
        server.cli("BGSAVE")
        wait_until(lambda: server.info("persistence").get("rdb_last_bgsave_status") == "err", "the snapshot to fail", timeout=10)
        with pytest.raises(StorageUnavailable, match=r"cannot save its snapshot.*MISCONF"):
            await store.enqueue(msg(BOB, "m1"), ROOMY)
        assert not store.healthy
        server.cli("CONFIG", "SET", "dir", str(server.workdir))
        server.cli("BGSAVE")
        wait_until(lambda: server.info("persistence").get("rdb_last_bgsave_status") == "ok", "the snapshot to succeed", timeout=10)
        await eventually(lambda: enqueue_succeeds(store, "m2"), what="a write after a good snapshot")
        assert store.healthy
    try:
        with_store(server.url, body, probe_interval_s=3600)
    finally:
        server.stop()


def test_min_replicas_without_a_replica_is_storage_unavailable(fresh_redis):
    async def body(store: RedisStore) -> None:
        with pytest.raises(StorageUnavailable, match=r"only 0 of \[redis\] min_replicas = 1"):
            await store.enqueue(msg(BOB, "m1"), ROOMY)
        assert not store.healthy
    with_store(fresh_redis.url, body, min_replicas=1, wait_timeout_ms=50, probe_interval_s=3600)


def test_min_replicas_on_a_cluster_without_replicas_is_storage_unavailable(redis_cluster, redis_prefix):
    async def body(store: RedisStore) -> None:
        with pytest.raises(StorageUnavailable, match=r"only 0 of \[redis\] min_replicas = 1"):
            await store.lock(BOB)
    with_store(redis_cluster.url, body, cluster=True, key_prefix=redis_prefix, min_replicas=1,
               wait_timeout_ms=50, probe_interval_s=3600)


def test_min_replicas_with_a_replica_acknowledges(fresh_redis, tmp_path):
    replica = RedisServer(tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(fresh_redis.port)))
    try:
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up", "the replica", timeout=10)

        async def body(store: RedisStore) -> None:
            assert await enqueue_succeeds(store, "m1")
            assert store.healthy
        with_store(fresh_redis.url, body, min_replicas=1, wait_timeout_ms=5000, probe_interval_s=3600)
        assert replica.cli("HGET", f"relayd:{{{BOB}}}:n", "count") == "1"
    finally:
        replica.stop()


def test_the_stores_connections_read_from_the_heap(fresh_redis):
    """relayd.reads: reads and writes, over TCP and over a Unix socket (the subscriber's connections are made the
    same way)."""
    from relayd.reads import READ_SIZE
    from relayd.storage.redis.connection import HeapConnection, HeapUnixConnection

    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m1")
        assert await store.size(BOB) == 1
        client, writer = store.link.client, store.link.writes.writer
        assert client is not None and writer is not None
        pool = client.connection_pool  # type: ignore[union-attr]
        assert pool.connection_class in (HeapConnection, HeapUnixConnection)
        assert type(writer) in (HeapConnection, HeapUnixConnection)
        sizes = {c._writer.transport.max_size for c in [*pool._available_connections, writer]}
        assert sizes == {READ_SIZE}
    with_store(fresh_redis.url, body)


def test_scripts_reload_after_script_flush(fresh_redis):
    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m1")
        fresh_redis.cli("SCRIPT", "FLUSH")
        assert await enqueue_succeeds(store, "m2")
        assert fresh_redis.cli("SCRIPT", "EXISTS", scripts.ENQUEUE.sha) == "1"
    with_store(fresh_redis.url, body)


def test_pipelined_writes_keep_their_order_across_a_script_flush(fresh_redis):
    """Batches in flight when Redis forgot the scripts fail with NOSCRIPT and go again as EVAL; nothing sent
    after that overtakes them."""
    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m0")
        fresh_redis.cli("SCRIPT", "FLUSH")
        posted: list[asyncio.Future[Any]] = []
        for tick in range(60):  # a few writes per loop turn: one batch each, several in flight
            posted += [asyncio.ensure_future(store.enqueue(msg(BOB, f"t{tick}-{i}"), ROOMY)) for i in range(3)]
            await asyncio.sleep(0)
        assert set(await asyncio.gather(*posted)) == {EnqueueResult.QUEUED}
        expected = ["m0"] + [f"t{tick}-{i}" for tick in range(60) for i in range(3)]
        assert [m.message_id for m in await store.pending(BOB, 1000)] == expected
        assert store.link.batches > 2
    with_store(fresh_redis.url, body)


def _evalsha_calls(server: RedisServer) -> int:
    stats = server.info("commandstats").get("cmdstat_evalsha", "calls=0")
    return int(str(stats).split("calls=")[1].split(",")[0])


def test_enqueues_submitted_together_share_one_script_call_with_every_answer_exact(fresh_redis):
    """Enqueues queued in one loop turn go as one merged ENQUEUE (a slot note goes before it): the answers are
    those of one call per message, caps and duplicates within the batch included, order kept per recipient."""
    capped = QueueLimits(max_messages=2, max_bytes=1_000_000, drop_oldest=False)

    async def body(store: RedisStore) -> None:
        await store.enqueue(msg(CAROL, "warm"), ROOMY)  # scripts loaded, slots of BOB and CAROL noted
        await store.enqueue(msg(BOB, "warm"), ROOMY)
        recipients = [f"0x{i:040x}" for i in range(40)]
        for who in recipients:
            await store.enqueue(msg(who, "warm"), ROOMY)
        before = _evalsha_calls(fresh_redis)
        batch = [msg(who, "m1") for who in recipients] + [msg(BOB, f"b{i}") for i in range(5)]
        batch += [msg(BOB, "b1"), msg(CAROL, "c1"), msg(CAROL, "c2")]
        results = await asyncio.gather(*(store.enqueue(m, ROOMY) for m in batch[:-2]),
                                       *(store.enqueue(m, capped) for m in batch[-2:]))
        calls = _evalsha_calls(fresh_redis) - before
        assert results == [EnqueueResult.QUEUED] * 45 + [EnqueueResult.DUPLICATE, EnqueueResult.QUEUED,
                                                         EnqueueResult.FULL]
        assert batch[-3].seq == batch[41].seq  # the duplicate answers with the stored one's seq
        assert calls <= 3, calls  # two limits: two merged calls (and perhaps one more as the sender was busy)
        assert [m.message_id for m in await store.pending(BOB, 10)] == ["warm", "b0", "b1", "b2", "b3", "b4"]
        assert [m.message_id for m in await store.pending(CAROL, 10)] == ["warm", "c1"]
        for who in recipients:
            assert [m.message_id for m in await store.pending(who, 10)] == ["warm", "m1"]
        assert (await store.stats())["messages"] == 2 + 40 * 2 + 5 + 1
    with_store(fresh_redis.url, body, probe_interval_s=3600)  # no health probe's script call among those counted


def test_first_enqueues_into_new_slots_note_them_in_one_call_before_theirs(fresh_redis):
    """Each first write into a hash slot notes the slot; enqueues submitted together into 40 new slots are one
    call noting the slots and one enqueueing the messages, and every slot is listed."""
    async def body(store: RedisStore) -> None:
        await store.enqueue(msg(BOB, "warm"), ROOMY)  # both scripts loaded
        recipients = [f"0x{i:040x}" for i in range(40)]
        slots = {store.layout.slot_of(who) for who in recipients} - {store.layout.slot_of(BOB)}
        before = _evalsha_calls(fresh_redis)
        results = await asyncio.gather(*(store.enqueue(msg(who, "m1"), ROOMY) for who in recipients))
        assert results == [EnqueueResult.QUEUED] * 40
        assert _evalsha_calls(fresh_redis) - before <= 2
        assert slots <= set(await store.core.slots())
    with_store(fresh_redis.url, body, probe_interval_s=3600)  # no health probe's script call among those counted


def test_a_write_refused_while_its_connection_was_being_made_is_never_sent(fresh_redis):
    """A batch waits for the writes' connection to be made again; a write whose deadline passed meanwhile (it
    had waited its turn before) is answered storage_unavailable, not stored, so it must not go out once the
    connection is there."""
    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m1")
        writer = store.link.writes.writer
        assert writer is not None
        connect, answer_s = writer.connect, store.link.writes.answer_s

        async def slow_connect() -> None:
            await asyncio.sleep(answer_s * 0.8)
            await connect()

        async def stale() -> bool:  # as if the server had closed the idle connection: made again, slowly
            return True
        writer.connect = slow_connect  # type: ignore[method-assign]
        writer.can_read = stale  # type: ignore[method-assign]
        first = asyncio.ensure_future(store.enqueue(msg(BOB, "m2"), ROOMY))
        await asyncio.sleep(answer_s / 3)
        second = asyncio.ensure_future(store.enqueue(msg(BOB, "m3"), ROOMY))
        assert await first is EnqueueResult.QUEUED
        with pytest.raises(StorageUnavailable) as refused:
            await second
        assert not isinstance(refused.value, StorageOutcomeUnknown)
        writer.connect = connect  # type: ignore[method-assign]
        del writer.can_read
        await eventually(lambda: enqueue_succeeds(store, "m4"), what="a write after the refusal")
        assert [m.message_id for m in await store.pending(BOB, 10)] == ["m1", "m2", "m4"]
    with_store(fresh_redis.url, body, socket_timeout_s=1.0, probe_interval_s=3600)


def test_a_refused_enqueue_in_a_merged_call_fails_alone(fresh_redis):
    """Redis refusing one message's command (a key of the wrong type) answers that message with an error; the
    others in the same script call are stored and answered as usual."""
    async def body(store: RedisStore) -> None:
        await store.enqueue(msg(BOB, "warm"), ROOMY)
        await store.enqueue(msg(CAROL, "warm"), ROOMY)
        fresh_redis.cli("DEL", store.layout.recipient(CAROL).counters)
        fresh_redis.cli("SET", store.layout.recipient(CAROL).counters, "not a hash")
        results = await asyncio.gather(store.enqueue(msg(BOB, "b1"), ROOMY), store.enqueue(msg(CAROL, "c1"), ROOMY),
                                       store.enqueue(msg(BOB, "b2"), ROOMY), return_exceptions=True)
        assert results[0] is EnqueueResult.QUEUED and results[2] is EnqueueResult.QUEUED, results
        assert isinstance(results[1], StorageUnavailable) and "WRONGTYPE" in str(results[1]), results
        assert [m.message_id for m in await store.pending(BOB, 10)] == ["warm", "b1", "b2"]
        fresh_redis.cli("DEL", store.layout.recipient(CAROL).counters)
        assert await store.enqueue(msg(BOB, "b3"), ROOMY) is EnqueueResult.QUEUED
        assert store.healthy
    with_store(fresh_redis.url, body)


def test_every_key_is_under_the_prefix_and_one_address_is_one_slot(fresh_redis):
    async def body(store: RedisStore) -> None:
        for who in (BOB, CAROL):
            await store.enqueue(msg(who, "m1"), ROOMY)
            await store.add_receipts([Receipt(who, "0x" + "d0" * 20, "m1", int(time.time() * 1000))], 10_000)
            await store.put_key(KeyRecord(who, "pk", 1, 1))
            await store.lock(who)
    with_store(fresh_redis.url, body, key_prefix="relay-one:")
    keys = fresh_redis.cli("--scan").split()
    assert keys and all(k.startswith("relay-one:") for k in keys), keys
    for who in (BOB, CAROL):
        own = [k for k in keys if f"{{{who}}}" in k]
        assert {k.rsplit(":", 1)[1] for k in own} >= {"q", "t", "m", "i", "n", "rq", "rt", "rm", "key", "lock"}
        slot = key_slot(own[0])
        assert {key_slot(k) for k in own} == {slot}
        slot_keys = [k for k in keys if "{~" in k and key_slot(k) == slot]
        assert {k.rsplit(":", 1)[1] for k in slot_keys} == {"expiry", "stats", "ukeys"}
    assert key_slot(f"{{{BOB}}}") != key_slot(f"{{{CAROL}}}")


def test_cluster_keys_of_one_address_live_on_one_node(redis_cluster, redis_prefix):
    async def body(store: RedisStore) -> None:
        for i in range(20):
            who = f"0x{i:040x}"
            await store.enqueue(msg(who, "m1"), ROOMY)
            await store.add_receipts([Receipt(who, BOB, "m1", int(time.time() * 1000))], 10_000)
    with_store(redis_cluster.url, body, cluster=True, key_prefix=redis_prefix)
    holders: dict[str, set[int]] = {}
    for index, node in enumerate(redis_cluster.nodes):
        for key in node.cli("--scan", "--pattern", f"{redis_prefix}*").split():
            assert int(node.cli("CLUSTER", "KEYSLOT", key)) == key_slot(key)
            holders.setdefault(key.split("}")[0], set()).add(index)
    addresses = [h for h in holders if "{0x" in h]
    assert len(addresses) == 20
    assert all(len(nodes) == 1 for nodes in holders.values())
    assert len(set().union(*holders.values())) == 3, "twenty addresses should spread over all three masters"


def test_cluster_enqueues_submitted_together_each_reach_their_own_node(redis_cluster, redis_prefix):
    """On a Cluster calls of the merged ENQUEUE go one per message (addresses need not share a slot)."""
    recipients = [f"0x{i:040x}" for i in range(30)]

    async def body(store: RedisStore) -> None:
        results = await asyncio.gather(*(store.enqueue(msg(who, f"m{n}"), ROOMY)
                                         for n in range(2) for who in recipients))
        assert results == [EnqueueResult.QUEUED] * 60
        for who in recipients:
            assert [m.message_id for m in await store.pending(who, 10)] == ["m0", "m1"]
    with_store(redis_cluster.url, body, cluster=True, key_prefix=redis_prefix)


def test_the_retention_index_holds_each_address_s_oldest_entry_whatever_order_messages_come_in(fresh_redis):
    """An enqueue that only adds a message updates the index from what it held (no scan of the queue), so the
    index must stay exact through enqueues out of time order, drops and expiry."""
    now = int(time.time() * 1000)

    async def body(store: RedisStore) -> None:
        expiry = store.layout.recipient(BOB).expiry

        def oldest() -> int | None:
            score = fresh_redis.cli("ZSCORE", expiry, BOB)
            return int(float(score)) if score else None
        for at in (now - 3000, now - 5000, now - 4000):
            await store.enqueue(msg(BOB, f"m{at}", queued_at=at), ROOMY)
        assert oldest() == now - 5000
        assert await store.expire(now - 4500) == 1
        assert oldest() == now - 4000
        capped = QueueLimits(max_messages=2, max_bytes=1_000_000, drop_oldest=True)
        await store.enqueue(msg(BOB, "late", queued_at=now), capped)  # drops the first queued (now - 3000)
        assert [m.message_id for m in await store.pending(BOB, 10)] == [f"m{now - 4000}", "late"]
        assert oldest() == now - 4000
        assert await store.expire(now + 1) == 2
        assert oldest() is None
    with_store(fresh_redis.url, body)


def test_expiry_touches_only_old_recipients_in_bounded_batches(fresh_redis):
    now = int(time.time() * 1000)
    for script in (scripts.EXPIRE, scripts.DUE_MEMBERS):
        fresh_redis.cli("SCRIPT", "LOAD", script.source)

    async def body(store: RedisStore) -> None:
        for i in range(35):
            await store.enqueue(msg(BOB, f"old{i}", queued_at=now - 10_000 + i), ROOMY)
        for i in range(5):
            await store.enqueue(msg(BOB, f"new{i}", queued_at=now + i), ROOMY)
        for i in range(200):
            await store.enqueue(msg(f"0x{i:040x}", "m", queued_at=now), ROOMY)
        before = _script_calls(fresh_redis)
        assert await store.expire(now - 1) == 35
        # 10 + 10 + 10 + 5, and one read of all slots' retention indexes and one of their tokens' indexes
        assert _script_calls(fresh_redis) - before == 4 + 2
        assert [m.message_id for m in await store.pending(BOB, 100)] == [f"new{i}" for i in range(5)]
        assert store.total() == 205
        assert (await store.stats())["messages"] == 205
        before = _script_calls(fresh_redis)
        assert await store.expire(now - 1) == 0
        assert _script_calls(fresh_redis) - before == 2  # the two reads
    with_store(fresh_redis.url, body, expire_chunk=10, probe_interval_s=3600)


def _script_calls(server: RedisServer) -> int:
    calls = server.command_calls()
    return calls.get("evalsha", 0) + calls.get("eval", 0)


def test_instances_share_queues_idempotency_caps_and_totals(redis_server, redis_prefix):
    """Two stores on one Redis behave as one relay (phase 1 of several relayd instances)."""
    async def body(first: RedisStore) -> None:
        second = RedisStore(redis_server.url, key_prefix=redis_prefix, probe_interval_s=0.05,
                            refresh_interval_s=0.05)
        await second.open()
        try:
            limits = QueueLimits(max_messages=2, max_bytes=1000, drop_oldest=False)
            assert await first.enqueue(msg(BOB, "m1"), limits) is EnqueueResult.QUEUED
            assert await second.enqueue(msg(BOB, "m1"), limits) is EnqueueResult.DUPLICATE
            assert await second.enqueue(msg(BOB, "m2"), limits) is EnqueueResult.QUEUED
            assert await first.enqueue(msg(BOB, "m3"), limits) is EnqueueResult.FULL
            assert [m.message_id for m in await second.pending(BOB, 10)] == ["m1", "m2"]
            await eventually(lambda: _is(second.total() == 2), what="the other instance's total")
            await second.put_key(KeyRecord(CAROL, "pk", 7, 7))
            assert (await first.get_key(CAROL)) == KeyRecord(CAROL, "pk", 7, 7)
            await second.lock(CAROL)
            assert await first.is_locked(CAROL)
            assert await first.ack(BOB, ["m1", "m2"]) == 2
            assert await second.pending(BOB, 10) == []
        finally:
            await second.close()
    with_store(redis_server.url, body, key_prefix=redis_prefix)


def test_concurrent_writes_for_one_recipient_keep_call_order(redis_server, redis_prefix):
    async def body(store: RedisStore) -> None:
        sent = [msg(BOB, f"m{i}", "x" * (i % 7 * 500)) for i in range(200)]
        results = await asyncio.gather(*(store.enqueue(m, ROOMY) for m in sent))
        assert set(results) == {EnqueueResult.QUEUED}
        assert [m.message_id for m in await store.pending(BOB, 1000)] == [m.message_id for m in sent]
        assert store.link.batches < 100, "writes submitted together should share round trips"
    with_store(redis_server.url, body, key_prefix=redis_prefix)


def test_a_write_that_cannot_get_its_turn_is_refused_unsent(fresh_redis):
    """A Redis that stops answering fails every queued write within a bound; nothing waits for ever. The batch
    on its way has an unknown outcome; the writes queued behind it were never sent."""
    async def body(store: RedisStore) -> None:
        assert fresh_redis.proc is not None
        os.kill(fresh_redis.proc.pid, signal.SIGSTOP)
        try:
            outcomes = await asyncio.gather(*(store.enqueue(msg(BOB, f"m{i}"), ROOMY) for i in range(600)),
                                            return_exceptions=True)
        finally:
            os.kill(fresh_redis.proc.pid, signal.SIGCONT)
        assert {type(o) for o in outcomes} == {StorageUnavailable, StorageOutcomeUnknown}
        await eventually(lambda: enqueue_succeeds(store, "after"), what="a write after SIGCONT")
        assert "after" in [m.message_id for m in await store.pending(BOB, 1000)]
    with_store(fresh_redis.url, body, socket_timeout_s=0.1, probe_interval_s=3600)


def test_close_ends_the_probe_loop_even_when_redis_py_loses_its_cancellation(redis_server, redis_prefix,
                                                                             monkeypatch):
    """redis-py's BlockingConnectionPool.get_connection can swallow a cancellation that lands while it opens a
    connection (about one run in fifteen of the concurrent-writes test above: close() then waited for ever on a
    probe loop that went on probing). Here the pool swallows the cancellation close() sends."""
    from redis.asyncio.connection import BlockingConnectionPool
    original = BlockingConnectionPool.get_connection
    inside = asyncio.Event()
    swallowed = []

    async def losing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not swallowed:  # the race, once: a cancellation that lands here is lost
            inside.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed.append(asyncio.current_task())
        return await original(self, *args, **kwargs)

    async def main() -> None:
        store = RedisStore(redis_server.url, key_prefix=redis_prefix, probe_interval_s=0.01, refresh_interval_s=0)
        await store.open()
        prober = store.lifecycle.prober
        monkeypatch.setattr(BlockingConnectionPool, "get_connection", losing)
        async with asyncio.timeout(scaled(10)):
            await inside.wait()  # the probe loop waits in the pool, where close() will cancel it
            await store.close()
        assert swallowed == [prober] and prober is not None and prober.done()
    asyncio.run(main())


def test_queued_path_costs_at_most_three_redis_round_trips_per_message(fresh_redis, start_relay):
    """The issue's target for the queued path: at most 3 Redis round trips per message.

    Messages go one at a time, so each round trip (a batch of writes, or a read) belongs to one message. The
    first message to a recipient also spends the cluster-wide new-queue budgets (sender and client IP, in one
    round trip) and notes the recipient's hash slot; later ones cost one script each.
    """
    store = RedisStore(fresh_redis.url, probe_interval_s=3600, refresh_interval_s=3600)
    relay = start_relay(store=store, auth={"mode": "open"})
    count = 100

    def send_all(sender: Any, tag: str) -> tuple[int, int]:
        """(round trips, scripts Redis ran) for ``count`` messages sent one by one."""
        scripts_before, trips_before = _script_calls(fresh_redis), store.link.batches + store.link.reads
        for i in range(count):
            sender.send(frame_to(f"0x{i:040x}", f"{tag}{i}"))
            assert sender.recv_type("queued")["messageId"] == f"{tag}{i}"
        return store.link.batches + store.link.reads - trips_before, _script_calls(fresh_redis) - scripts_before

    with connect(relay, "0x" + "a1" * 20) as sender:
        trips, scripts_run = send_all(sender, "first")
        assert trips <= 3 * count and scripts_run <= 5 * count, (trips, scripts_run)
        trips, scripts_run = send_all(sender, "again")
        assert trips == count and scripts_run == count, (trips, scripts_run)


def test_wrong_password_stops_start_up(tmp_path):
    from relayd.storage.store import StoreOpenError
    server = RedisServer(tmp_path / "locked", extra=("--requirepass", "s3cret"))
    try:
        for url in (server.url, f"redis://:wrong@127.0.0.1:{server.port}/0"):
            with pytest.raises(StoreOpenError) as caught:
                with_store(url, lambda store: asyncio.sleep(0))
            assert "wrong" not in str(caught.value) and ("password" in str(caught.value)
                                                         or "credentials" in str(caught.value))
        assert with_store(f"redis://:s3cret@127.0.0.1:{server.port}/0",
                          lambda store: enqueue_succeeds(store, "m1"))
    finally:
        server.stop()


def test_sync_client_sees_the_documented_record_layout(redis_server, redis_prefix):
    """Operators may inspect a queue with redis-cli; docs/scaling.md ("Key layout") documents these keys."""
    async def body(store: RedisStore) -> None:
        await store.enqueue(msg(BOB, "m1", "ciphertext"), ROOMY)
    with_store(redis_server.url, body, key_prefix=redis_prefix)
    client = redis_py.Redis(port=redis_server.port, decode_responses=True)
    try:
        assert client.hget(f"{redis_prefix}{{{BOB}}}:n", "count") == "1"
        seq = client.zrange(f"{redis_prefix}{{{BOB}}}:q", 0, -1)
        record = client.hget(f"{redis_prefix}{{{BOB}}}:m", seq[0])
        assert record is not None and record.endswith("\nciphertext")
    finally:
        client.close()


# Packing

def test_pack_matches_redis_py_and_refuses_what_redis_would_misread():
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from relayd.storage.redis.layout import ScriptKeys
    from relayd.storage.redis.write_queue import flat, pack
    conn = Connection(decode_responses=True)
    commands = [("EVALSHA", "ab" * 20, 1, "k\u00e9y", b"raw\r\n", 0, -7, 1.5, 10**18, ""), ("PING",)]
    assert pack(commands, conn.encoder) == b"".join(conn.pack_commands(commands))
    keyed = [("EVALSHA", "ab" * 20, 2, ScriptKeys(["{\u00e9}:q", "{x}:n"]), "arg", 3), ("PING",)]
    assert pack(keyed, conn.encoder) == b"".join(conn.pack_commands([flat(c) for c in keyed]))
    for bad in (True, None, object()):
        with pytest.raises(DataError):
            pack([("SET", "k", bad)], conn.encoder)


# Idempotency for the retention period

@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(url, cluster) of the shared single server or the local three-master Cluster."""
    cluster = request.param == "redis-cluster"
    return request.getfixturevalue("redis_cluster" if cluster else "redis_server").url, cluster


def test_messages_stay_known_as_delivered_until_they_expire(any_redis, redis_prefix):
    url, cluster = any_redis
    now = int(time.time() * 1000)

    async def body(store: RedisStore) -> None:
        first = msg(BOB, "m1", queued_at=now)
        assert await store.enqueue(first, ROOMY) is EnqueueResult.QUEUED
        again = msg(BOB, "m1", "other", sender=("0x" + "a0" * 20).upper().replace("0X", "0x"), queued_at=now)
        assert await store.enqueue(again, ROOMY) is EnqueueResult.DUPLICATE
        assert again.seq == first.seq
        assert await store.remove(BOB, [first.seq]) == 1
        assert await store.enqueue(msg(BOB, "m1", queued_at=now), ROOMY) is EnqueueResult.DELIVERED
        assert await store.enqueue(msg(BOB, "m1", sender=CAROL, queued_at=now), ROOMY) is EnqueueResult.QUEUED

        assert await store.enqueue(msg(BOB, "m2", queued_at=now), ROOMY) is EnqueueResult.QUEUED
        assert await store.ack(BOB, ["m2"]) == 1
        routed, _ = await store.enqueue_routed(msg(BOB, "m2", queued_at=now), ROOMY)
        assert routed is EnqueueResult.DELIVERED
        assert await store.enqueue_many([msg(BOB, "m2", queued_at=now), msg(BOB, "m3", queued_at=now)],
                                        ROOMY) == [EnqueueResult.DELIVERED, EnqueueResult.QUEUED]

        assert await store.enqueue(msg(BOB, "m4", queued_at=now), ROOMY) is EnqueueResult.QUEUED
        assert await store.clear(BOB) == 3  # m1 from carol, m3, m4: cleared, not delivered
        assert await store.enqueue(msg(BOB, "m4", queued_at=now), ROOMY) is EnqueueResult.QUEUED
        assert await store.size(BOB) == 1

        assert await store.expire(now - 1) == 0  # not old yet: still known
        assert await store.enqueue(msg(BOB, "m1", queued_at=now), ROOMY) is EnqueueResult.DELIVERED
        await store.clear(BOB)
        await store.expire(now + 1)
        for mid in ("m1", "m2"):
            assert await store.enqueue(msg(BOB, mid, queued_at=now), ROOMY) is EnqueueResult.QUEUED
    with_store(url, body, cluster=cluster, key_prefix=redis_prefix)


def test_record_delivered_is_one_round_trip_and_restore_stores_again(any_redis, redis_prefix):
    url, cluster = any_redis
    now = int(time.time() * 1000)

    async def body(store: RedisStore) -> None:
        live = [msg(BOB, "l1", queued_at=now), msg(CAROL, "l2", queued_at=now), msg(BOB, "l3", queued_at=now)]
        batches = store.link.batches
        await store.record_delivered(live)
        assert store.link.batches - batches == 1
        for m in live:
            assert await store.enqueue(msg(m.recipient, m.message_id, queued_at=now), ROOMY) is \
                EnqueueResult.DELIVERED
        assert await store.size(BOB) == 0 and await store.size(CAROL) == 0
        assert await store.restore([live[0]]) == 1
        assert await store.enqueue(msg(BOB, "l1", queued_at=now), ROOMY) is EnqueueResult.DUPLICATE
        assert [m.message_id for m in await store.pending(BOB, 10)] == ["l1"]
        assert await store.expire(now + 1) == 1
        assert await store.enqueue(msg(BOB, "l3", queued_at=now), ROOMY) is EnqueueResult.QUEUED
        assert await store.enqueue(msg(CAROL, "l2", queued_at=now), ROOMY) is EnqueueResult.QUEUED
    with_store(url, body, cluster=cluster, key_prefix=redis_prefix)


def test_a_clock_step_moves_delivered_records_too(redis_server, redis_prefix):
    now = int(time.time() * 1000)

    async def body(store: RedisStore) -> None:
        await store.record_delivered([msg(BOB, f"d{i}", queued_at=now - i) for i in range(25)])
        await store.shift_times(now + 1, 60_000)
        assert await store.expire(now + 30_000) == 0
        assert await store.enqueue(msg(BOB, "d0", queued_at=now), ROOMY) is EnqueueResult.DELIVERED
        assert await store.enqueue(msg(BOB, "d24", queued_at=now), ROOMY) is EnqueueResult.DELIVERED
        await store.expire(now + 70_000)
        assert await store.enqueue(msg(BOB, "d24", queued_at=now), ROOMY) is EnqueueResult.QUEUED
    with_store(redis_server.url, body, key_prefix=redis_prefix, expire_chunk=10)


# Honest outcomes, bounded writes, health during a hang

def _answers(port: int, within_s: float) -> bool:
    """Whether the server answers a PING within ``within_s`` (False: it hangs)."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=within_s) as s:
        s.sendall(b"PING\r\n")
        try:
            return s.recv(16).startswith(b"+PONG")
        except TimeoutError:
            return False


def test_a_write_sent_to_a_sleeping_redis_has_an_unknown_outcome_within_socket_timeout(tmp_path):
    server = RedisServer(tmp_path / "sleepy", extra=("--enable-debug-command", "yes"))

    async def body(store: RedisStore) -> None:
        assert await enqueue_succeeds(store, "m0")
        sleeper = subprocess.Popen([redis_binary("redis-cli"), "-p", str(server.port), "DEBUG", "SLEEP", "5"],
                                   stdout=subprocess.DEVNULL)
        try:
            wait_until(lambda: not _answers(server.port, 0.2), "DEBUG SLEEP to start", timeout=5)
            started = time.monotonic()
            with pytest.raises(StorageOutcomeUnknown, match="did not answer a write"):
                await store.enqueue(msg(BOB, "m1"), ROOMY)
            assert time.monotonic() - started < 4, "the write should be answered before Redis wakes up"
            assert not store.healthy
        finally:
            sleeper.wait(30)
        await eventually(lambda: enqueue_succeeds(store, "m2"), what="a write after DEBUG SLEEP")
        assert store.healthy
    try:
        with_store(server.url, body, socket_timeout_s=0.5, probe_interval_s=3600)
    finally:
        server.stop()


def test_a_write_that_never_left_is_plain_storage_unavailable(fresh_redis):
    async def body(store: RedisStore) -> None:
        fresh_redis.stop()
        with pytest.raises(StorageUnavailable) as caught:
            await store.enqueue(msg(BOB, "m1"), ROOMY)
        assert not isinstance(caught.value, StorageOutcomeUnknown)
    with_store(fresh_redis.url, body, probe_interval_s=3600)


def test_client_pause_makes_the_store_unhealthy_within_a_second_and_writes_bounded(fresh_redis):
    """Under CLIENT PAUSE WRITE the probe is overdue after about a second (before socket_timeout_s = 2 s), a
    client's write gets its answer (outcome unknown) within socket_timeout_s, and health returns after."""
    async def body(store: RedisStore) -> None:
        assert store.healthy
        fresh_redis.cli("CLIENT", "PAUSE", "6000", "WRITE")
        await eventually(lambda: _is(not store.healthy), what="the overdue probe to make the store unhealthy")
        assert "waited" in (store.problem or "") or "did not answer" in (store.problem or "")
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await store.enqueue(msg(BOB, "m1"), ROOMY)
        assert time.monotonic() - started < 5, "the write should be answered before the pause ends"
        fresh_redis.cli("CLIENT", "UNPAUSE")
        await eventually(lambda: _is(store.healthy), what="the store to be healthy after the pause")
        assert await enqueue_succeeds(store, "m2")
    with_store(fresh_redis.url, body, socket_timeout_s=2.0, probe_interval_s=0.2)


def test_ready_is_503_while_redis_is_paused(fresh_redis, start_relay):
    store = RedisStore(fresh_redis.url, probe_interval_s=0.2, socket_timeout_s=2.0)
    relay = start_relay(store=store, auth={"mode": "open"})
    wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready")
    fresh_redis.cli("CLIENT", "PAUSE", "6000", "WRITE")
    try:
        wait_until(lambda: relay.http("GET", "/health/ready").status == 503, "not ready during the pause",
                   timeout=scaled(5))
    finally:
        fresh_redis.cli("CLIENT", "UNPAUSE")
    wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready after the pause", timeout=scaled(10))


# Durability at open

def test_open_says_queued_means_memory_only_without_appendonly(fresh_redis, caplog):
    caplog.set_level(logging.INFO, logger="relayd.storage")
    with_store(fresh_redis.url, lambda store: asyncio.sleep(0), probe_interval_s=3600)
    lines = [r for r in caplog.records if "Redis durability" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "queued = in memory only (appendonly no)" in lines[0].getMessage()


def test_open_says_queued_means_the_aof(durable_redis, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="relayd.storage")
    with_store(durable_redis.url, lambda store: asyncio.sleep(0), probe_interval_s=3600)
    lines = [r for r in caplog.records if "Redis durability" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "queued = in the AOF, fsynced before Redis answers (appendfsync always)" in lines[0].getMessage()

    everysec = RedisServer(tmp_path / "everysec", appendonly=True, extra=("--appendfsync", "everysec"))
    caplog.clear()
    try:
        with_store(everysec.url, lambda store: asyncio.sleep(0), probe_interval_s=3600, min_replicas=1,
                   wait_timeout_ms=50)
    finally:
        everysec.stop()
    line = next(r.getMessage() for r in caplog.records if "Redis durability" in r.getMessage())
    assert "appendfsync everysec" in line and "acknowledged by 1 replica(s)" in line and "0 connected" in line


def test_waitaof_is_detected_as_the_installed_redis_has_it(durable_redis):
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    version = tuple(int(p) for p in out.split("v=")[1].split()[0].split(".")[:2])

    async def body(store: RedisStore) -> None:
        assert store.durability is not None
        assert store.durability.waitaof is (version >= (7, 2))
        assert store.link.writes.acks.aof is (version >= (7, 2))  # appendonly yes, appendfsync always
        assert (store.link.writes.acks.command or ("",))[0] == ("WAITAOF" if version >= (7, 2) else "")
        assert await enqueue_succeeds(store, "m1")
    with_store(durable_redis.url, body, probe_interval_s=3600)


# The cluster inbox (relayd.cluster.bus) on redis-py's PubSub

def test_the_inbox_resubscribes_after_a_redis_restart_and_says_so(fresh_redis):
    from relayd.cluster.bus import Bus
    from relayd.cluster.redis_backplane import RedisBackplane

    async def body(store: RedisStore) -> None:
        bus = Bus(RedisBackplane(store), "i1", reply_timeout_s=1.0)
        confirmed: list[float] = []
        heard: list[dict[str, Any]] = []
        bus.on_subscribed = lambda: confirmed.append(time.monotonic())
        bus.handler = heard.append
        await bus.start()
        try:
            assert bus.subscribed and len(confirmed) == 1
            bus.send("i1", {"k": "hello"})
            await eventually(lambda: _is(len(heard) == 1), what="the message to arrive")
            assert heard[0]["k"] == "hello" and heard[0]["from"] == "i1"
            fresh_redis.stop()
            await eventually(lambda: _is(not bus.subscribed), what="the inbox to notice Redis is gone")
            fresh_redis.start()
            back = time.monotonic()
            await eventually(lambda: _is(len(confirmed) == 2 and bus.subscribed), what="the inbox to subscribe again")
            assert confirmed[1] - back < scaled(3), "a lost inbox should be back within about a second"
            bus.send("i1", {"k": "again"})
            await eventually(lambda: _is(len(heard) == 2), what="a message after the restart")
        finally:
            await bus.close()
    with_store(fresh_redis.url, body, probe_interval_s=3600)


class InboxTap:
    """A second subscriber to instances' inboxes on the Redis at ``url``: ``async with`` gives, per instance,
    the envelopes that reached its inbox so far, decoded, in order."""

    def __init__(self, url: str, backplane: Any, *instances: str) -> None:
        self.url = url
        self.channels = {backplane.inbox(instance): instance for instance in instances}
        self.sharded = backplane.sharded  # as the instances' inboxes are (Redis 7)
        self.seen: dict[str, list[Any]] = {instance: [] for instance in instances}

    async def __aenter__(self) -> dict[str, list[Any]]:
        from redis.asyncio import Redis

        self.raw = Redis.from_url(self.url, decode_responses=True)
        self.pubsub = self.raw.pubsub()
        await (self.pubsub.ssubscribe if self.sharded else self.pubsub.subscribe)(*self.channels)
        self.reader = asyncio.get_running_loop().create_task(self._read())
        return self.seen

    async def _read(self) -> None:
        import json

        while True:
            m = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if m is not None:
                self.seen[self.channels[m["channel"]]].append(json.loads(m["data"]))

    async def __aexit__(self, *exc: object) -> None:
        self.reader.cancel()
        await self.pubsub.aclose()
        await self.raw.aclose()


def test_instances_of_the_older_envelope_form_and_of_the_compact_one_understand_each_other(redis_server):
    """A rolling upgrade: an older instance sends and reads only objects ({"f", "b"}). A newer one reads them,
    answers it in objects, and speaks compact arrays only with a peer that said it reads them."""
    import json

    from redis.asyncio import Redis

    from relayd.cluster.bus import Bus
    from relayd.cluster.redis_backplane import RedisBackplane

    async def body(store: RedisStore) -> None:
        backplane = RedisBackplane(store)
        new, peer = Bus(backplane, "new#1", reply_timeout_s=2.0), Bus(backplane, "new#2", reply_timeout_s=2.0)
        heard: list[dict[str, Any]] = []
        new.handler = heard.append
        peer.handler = lambda message: peer.reply(message, 1)
        async with InboxTap(redis_server.url, backplane, "old#1", "new#2") as seen, Redis.from_url(
                redis_server.url, decode_responses=True) as raw:
            old_inbox, wire = seen["old#1"], seen["new#2"]
            await new.start()
            await peer.start()
            try:
                await raw.execute_command("SPUBLISH" if backplane.sharded else "PUBLISH", backplane.inbox("new#1"),
                                          json.dumps({"f": "old#1", "b": [{"k": "offer", "to": "0xabc", "s": 0, "w": 0,
                                                                            "rid": "5"}]}))
                await eventually(lambda: _is(len(heard) == 1), what="the older instance's envelope to be read")
                assert heard[0]["k"] == "offer" and heard[0]["from"] == "old#1" and heard[0]["rid"] == "5"
                new.reply(heard[0], 1, False)
                await eventually(lambda: _is(len(old_inbox) == 1), what="the answer to the older instance")
                answer = old_inbox[0]
                assert isinstance(answer, dict) and answer["f"] == "new#1", answer
                assert answer["b"] == [{"n": 1, "k": "re", "rid": "5"}]

                # the newer one's request carries a numeric rid; the older one echoes it in its one-message answer
                asked = asyncio.ensure_future(new.request(["old#1"], {"k": "drain", "to": "0xabc"}))
                await eventually(lambda: _is(len(old_inbox) == 2), what="the request to the older instance")
                [request] = old_inbox[1]["b"]
                assert type(request["rid"]) is int, request
                await raw.execute_command("SPUBLISH" if backplane.sharded else "PUBLISH", backplane.inbox("new#1"),
                                          json.dumps({"f": "old#1", "b": [{"n": 1, "k": "re", "rid": request["rid"]}]}))
                taken = await asyncio.wait_for(asked, 5)
                assert taken.silent == () and taken.count == 1

                for attempt in range(2):  # the first request says "I read compact"; the next one is compact
                    taken = await new.request(["new#2"], {"k": "drain", "to": "0xabc"})
                    assert taken.silent == () and taken.count == 1
                await eventually(lambda: _is(len(wire) == 2), what="both requests on the wire")
                assert isinstance(wire[0], dict) and wire[0]["v"] == 2, wire[0]
                assert isinstance(wire[1], list) and wire[1][0] == "new#1" and wire[1][1][0] == "drain", wire[1]
            finally:
                await new.close()
                await peer.close()
    with_store(redis_server.url, body, probe_interval_s=3600, key_prefix="envelopes:")


def test_replies_made_in_one_loop_iteration_travel_as_one_batched_message(redis_server):
    """A request's numeric rid says its sender reads batched replies: the replies a peer makes to it in one loop
    iteration go back as one ``res`` message (rid, n, a triples), in order with what else is sent; a string rid
    (an older instance's) gets one ``re`` each."""
    from relayd.cluster.bus import Bus
    from relayd.cluster.redis_backplane import RedisBackplane

    async def body(store: RedisStore) -> None:
        backplane = RedisBackplane(store)
        asker, peer = Bus(backplane, "new#1", reply_timeout_s=2.0), Bus(backplane, "new#2", reply_timeout_s=2.0)
        peer.handler = lambda message: peer.reply(message, 1 if message["to"] != "0xnone" else 0)
        async with InboxTap(redis_server.url, backplane, "new#1") as seen:
            wire = seen["new#1"]  # what reaches new#1's inbox
            await asker.start()
            await peer.start()
            try:
                await asker.request(["new#2"], {"k": "drain", "to": "0xa"})  # each learns the other reads compact
                await eventually(lambda: _is(len(wire) == 1), what="the first reply")
                wire.clear()
                outcomes = await asyncio.gather(*(asker.request(["new#2"], {"k": "drain", "to": to})
                                                  for to in ("0xa", "0xnone", "0xb")))
                assert [(taken.count, taken.silent, taken.nobody) for taken in outcomes] == [(1, (), False), (0, (), True),
                                                                                           (1, (), False)]
                await eventually(lambda: _is(len(wire) == 1), what="the batched reply")
                [envelope_] = wire
                assert envelope_[0] == "new#2" and len(envelope_) == 2 and envelope_[1][0] == "res", envelope_
                rids, ns, acks = envelope_[1][1][0::3], envelope_[1][1][1::3], envelope_[1][1][2::3]
                assert all(type(r) is int for r in rids) and rids == sorted(rids) and ns == [1, 0, 1] and acks == [0] * 3

                peer.send("new#1", {"k": "ping"})  # a reply made after another message joins no batch before it
                peer.reply({"rid": 1000, "from": "new#1", "k": "drain"}, 1)
                peer.reply({"rid": "7", "from": "new#1", "k": "drain"}, 1)  # an older instance's request
                peer.reply({"rid": 1001, "from": "new#1", "k": "drain"}, 2, True)
                await eventually(lambda: _is(len(wire) == 2), what="the mixed envelope")
                assert wire[1][1:] == [["ping"], ["res", [1000, 1, 0]], ["re", "7", 1], ["res", [1001, 2, 1]]], wire[1]
            finally:
                await asker.close()
                await peer.close()
    with_store(redis_server.url, body, probe_interval_s=3600, key_prefix="batched:")


def test_compact_envelopes_carry_every_kind_and_leave_unknown_ones_as_objects():
    from relayd.cluster import envelope

    messages = [{"k": "offer", "to": "0xa", "m": ["0xb", "m1", "c", 1, 2, 0], "s": 0, "w": 3, "rid": "9", "o": 4},
                {"k": "offer", "to": "0xa", "m": ["0xb", "m2", "c", 1, 2, 7], "s": 1, "w": 0, "keep": 1},
                {"k": "re", "rid": "9", "n": 1, "a": 0}, {"k": "re", "rid": "10"}, {"k": "ping"},
                {"k": "res", "r": [11, 1, 0, 12, 0, 1]},
                {"k": "pull", "to": "0xa", "since": -1, "seqs": [1, 2]}, {"k": "inv", "a": "0xa"},
                {"k": "later", "x": 1}, {"k": "push", "to": "0xa", "m": [], "s": 0, "extra": True}]
    data = envelope.encode("i#1", messages, compact=True)
    assert data.startswith('["i#1",["offer",') and '"later"' in data
    assert envelope.decode(data) == ("i#1", messages, True)
    assert envelope.decode(envelope.encode("i#1", messages, compact=False)) == ("i#1", messages, True)
    assert envelope.decode('{"f":"old","b":[{"k":"ping"},3]}') == ("old", [{"k": "ping"}], False)
    for bad in ("", "[]", "{}", '{"f":"x"}', "[1]", "null"):
        with pytest.raises(envelope.Malformed):
            envelope.decode(bad)


def test_acknowledgements_wait_and_waitaof_and_their_shortfalls():
    from relayd.storage.redis.write_queue import Acks
    assert Acks().command is None and Acks().wait_s == 0
    wait = Acks(replicas=2, timeout_ms=300)
    assert wait.command == ("WAIT", 2, 300) and wait.wait_s == 0.3
    assert wait.shortfall(2) is None
    assert "only 1 of [redis] min_replicas = 2" in str(wait.shortfall(1))
    aof = Acks(replicas=1, timeout_ms=1500, aof=True)
    assert aof.command == ("WAITAOF", 1, 1, 1500)
    assert aof.shortfall([1, 1]) is None
    assert isinstance(aof.shortfall([0, 1]), StorageOutcomeUnknown) and "AOF" in str(aof.shortfall([0, 1]))
    assert isinstance(aof.shortfall([1, 0]), StorageOutcomeUnknown)
    refused = RuntimeError("boom")
    assert aof.apply([1, 0], [refused, "ok"])[0] is refused
    assert isinstance(aof.apply([1, 0], [refused, "ok"])[1], StorageOutcomeUnknown)


def test_keys_stored_before_the_budget_counted_them_count_nothing_until_written_again(fresh_redis):
    """A key record without its counted size (field b, written since keys count in the storage budget) adds
    nothing to the budget, and deleting or replacing it takes nothing away."""
    async def body(store: RedisStore) -> None:
        await store.put_key(KeyRecord("bob", "pk", 1, 1))
        legacy, stats, _, _ = store.layout.key("carol")
        fresh_redis.cli("HSET", legacy, "public_key", "x" * 500, "created_at", "1", "updated_at", "1")
        fresh_redis.cli("HINCRBY", stats, "keys", "1")
        counted = 2 + KEY_OVERHEAD_BYTES
        await store.stats()
        assert store.stored_bytes() == counted
        assert (await store.get_key("carol")) == KeyRecord("carol", "x" * 500, 1, 1)
        await store.put_key(KeyRecord("carol", "y" * 100, 2, 2))  # written again: counted from now on
        assert store.stored_bytes() == counted + 100 + KEY_OVERHEAD_BYTES
        assert await store.delete_key("carol") is True
        await store.stats()
        assert store.stored_bytes() == counted
    with_store(fresh_redis.url, body)

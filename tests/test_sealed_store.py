"""Encryption at rest (``[storage] encryption_key_file``): what a stolen disk or dump shows, restarts, rotation.

The store files and dumps are searched byte for byte for every address,
messageId and content sent; relays are real child processes on SQLite, on a
real redis-server and on a real PostgreSQL server (several instances for the
cluster's presence).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import (ProcessRelay, SealedDatabase, assert_read, clean_env, cli_ok, connect, frames_until_pong, ids_of,
                     msg, new_address, now_ms, present_and_forgotten, read_backlog, run_cli, status_frame, storage_key,
                     wait_until, without_modules)

from relayd.storage.sealed import CHECK_ADDRESS, SealedStore
from relayd.storage.sealing import load_keys
from relayd.storage.sqlite.store import SQLiteStore
from relayd.storage.store import EnqueueResult, QueuedMessage, QueueLimits, Receipt, StoreOpenError

ROOMY = QueueLimits(max_messages=1000, max_bytes=1_000_000, drop_oldest=False)

CONFIG = """\
[auth]
mode = open

[limits]
frames_per_s = 0
connections_per_ip_per_s = 0

[storage]
max_bytes = 0
encryption_key_file = {keys}
"""


class Load:
    """Senders that queue messages for offline recipients; remembers every secret a dump must not show."""

    def __init__(self, senders: int = 4, recipients: int = 12, per_sender: int = 30) -> None:
        self.senders = [new_address() for _ in range(senders)]
        self.recipients = [new_address() for _ in range(recipients)]
        self.per_sender = per_sender
        self.sent: dict[str, list[tuple[str, str, str]]] = {r: [] for r in self.recipients}
        """Per recipient: (sender, messageId, content), in the order sent."""
        self.others: list[str] = []
        """Addresses, messageIds and contents of other traffic (live messages) a dump must not show either."""

    def run(self, *relays: Any) -> None:
        """Each sender (on the relays in turn) pipelines all its messages, then reads every answer (each must be
        ``queued``)."""
        clients = [connect(relays[i % len(relays)], s) for i, s in enumerate(self.senders)]
        try:
            for i in range(self.per_sender):
                for sender, ws in zip(self.senders, clients):
                    to = self.recipients[(i + self.senders.index(sender)) % len(self.recipients)]
                    mid, content = str(uuid.uuid4()), f"secret-{uuid.uuid4().hex}"
                    self.sent[to].append((sender, mid, content))
                    ws.send(msg(to, mid, content, timestamp=now_ms()))
            for ws in clients:
                for _ in range(self.per_sender):
                    frame = ws.recv(10)
                    assert frame["type"] == "queued", frame
        finally:
            for ws in clients:
                ws.close()

    def secrets(self) -> list[bytes]:
        found = []
        for address in [*self.senders, *self.recipients, *(o for o in self.others if o.startswith("0x"))]:
            found += [address.encode(), address[2:].encode(), bytes.fromhex(address[2:])]
        for stored in self.sent.values():
            for _, mid, content in stored:
                found += [mid.encode(), content.encode()]
        return found + [o.encode() for o in self.others if not o.startswith("0x")]

    def assert_absent(self, blob: bytes, what: str) -> None:
        shown = [s for s in self.secrets() if s in blob]
        assert not shown, f"{what} shows {len(shown)} secrets, e.g. {shown[:3]}"

    def assert_delivered(self, *relays: Any) -> None:
        """Every recipient (on the relays in turn), signing in with ack, gets exactly what was sent to it, in
        order, as sent."""
        for i, (to, stored) in enumerate(self.sent.items()):
            with connect(relays[i % len(relays)], to, ack=True) as ws:
                frames = read_backlog(ws)
                got = [(f["from"], f["messageId"], f["content"]) for f in frames]
                assert sorted(got) == sorted(stored)
                for sender in self.senders:  # each sender's messages in the order it sent them
                    assert [g for g in got if g[0] == sender] == [s for s in stored if s[0] == sender]
                ws.send({"type": "ack", "messageIds": ids_of(frames)})


def files_of(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))


# SQLite, end to end


def test_a_sqlite_file_under_load_shows_no_address_message_id_or_content(tmp_path):
    keys = storage_key(tmp_path)
    load = Load()
    relay = ProcessRelay(tmp_path, config_text=CONFIG.format(keys=keys))
    load.run(relay)
    reader = load.recipients[0]
    writer, first, _ = load.sent[reader][0]
    with connect(relay, reader, ack=True) as ws:  # a read receipt for an offline sender is stored, sealed
        frames = read_backlog(ws)
        ws.send({"type": "ack", "messageIds": ids_of(frames)})
        ws.send({"type": "read_receipt", "to": writer, "messageId": first})
        frames_until_pong(ws)
    load.sent[reader] = []
    db = tmp_path / "relayd-data" / "relayd.db"
    assert relay.stop() == 0
    load.assert_absent(files_of(db), "the SQLite database")
    relay = ProcessRelay(tmp_path, config_text=CONFIG.format(keys=keys))
    try:
        load.assert_delivered(relay)
        with connect(relay, writer) as ws:
            assert_read(ws.recv_type("read", timeout=10), reader, first)
    finally:
        relay.stop()


def test_a_wrong_or_missing_key_refuses_to_start_and_changes_nothing(tmp_path):
    keys = storage_key(tmp_path)
    relay = ProcessRelay(tmp_path, config_text=CONFIG.format(keys=keys))
    to, mid = new_address(), str(uuid.uuid4())
    with connect(relay, new_address()) as ws:
        ws.send(msg(to, mid, "kept"))
        status_frame(ws.recv(), "queued", mid, to)
    assert relay.stop() == 0
    db = tmp_path / "relayd-data" / "relayd.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    other = storage_key(tmp_path, "other.key")
    for text, says in ((CONFIG.format(keys=other), "none of the configured key files"),
                       (CONFIG.format(keys=""), "encryption_key_file is not set"),
                       (CONFIG.format(keys=tmp_path / "gone.key"), "gone.key")):
        (tmp_path / "relayd.conf").write_text(text)
        result = run_cli(tmp_path, "--config", str(tmp_path / "relayd.conf"),
                         env=clean_env(RELAYD_SERVER_PORT="0"))
        assert result.returncode == 2, result
        assert says in result.stderr, result.stderr
        assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    relay = ProcessRelay(tmp_path, config_text=CONFIG.format(keys=keys))
    try:
        with connect(relay, to, ack=True) as ws:
            assert [f["content"] for f in read_backlog(ws)] == ["kept"]
    finally:
        relay.stop()


# The layer itself: rotation, reseal, sizes


def sealed(path: Path | str, *keys: str) -> SealedStore:
    """The sealing layer over a SQLite file, or over the PostgreSQL database a ``postgresql://`` URL names."""
    if isinstance(path, str):
        from relayd.storage.postgres import PostgresStore
        return SealedStore(PostgresStore(path, pool_size=4), load_keys(keys))
    return SealedStore(SQLiteStore(str(path), commit_interval_ms=0.5), load_keys(keys))


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a rotation test's store lives: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "postgres":
        pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")
        return str(request.getfixturevalue("pg_database"))
    return tmp_path / "store.db"


def message(to: str, mid: str, content: str = "hello", sender: str = "0xAbC") -> QueuedMessage:
    return QueuedMessage(to, sender, mid, content, 1, now_ms())


def test_rotation_reads_old_records_writes_new_ones_and_reseal_loses_nothing(tmp_path, database):
    db, old, new = database, storage_key(tmp_path, "old.key"), storage_key(tmp_path, "new.key")

    async def body() -> None:
        store = sealed(db, old)
        await store.open()
        for i in range(5):
            assert await store.enqueue(message("bob", f"m{i}"), ROOMY) is EnqueueResult.QUEUED
        await store.add_receipts([Receipt("carol", "0xBoB", "m0", 5)], 100)
        await store.close()

        store = sealed(db, new, old)  # rotation: the new key writes, the old one still reads
        await store.open()
        assert await store.enqueue(message("bob", "m1"), ROOMY) is EnqueueResult.DUPLICATE
        assert await store.enqueue(message("bob", "m5"), ROOMY) is EnqueueResult.QUEUED
        assert [m.message_id for m in await store.pending("bob", 100)] == [f"m{i}" for i in range(6)]
        assert [m.message_id for m in await store.pending("bob", 3)] == ["m0", "m1", "m2"]
        assert await store.ack("bob", ["m0"]) == 1 and await store.size("bob") == 5
        await store.close()

        with pytest.raises(StoreOpenError, match="none of the configured key files"):
            await sealed(db, new).open()  # old records, old key missing: refused
        counts = await sealed(db, new, old).reseal()
        assert counts == {"queues": 2, "messages": 4, "receipts": 1, "unreadable": 0, "history_left": 0}
        assert (await sealed(db, new, old).reseal())["messages"] == 0  # re-runnable: nothing left

        store = sealed(db, new)  # the old key may go now
        await store.open()
        # the copies come after what the new key wrote meanwhile, in their own order (docs/security.md)
        assert [m.message_id for m in await store.pending("bob", 100)] == ["m5", "m1", "m2", "m3", "m4"]
        assert [(r.reader, r.message_id) for r in await store.receipts("carol", 10)] == [("0xBoB", "m0")]
        assert (await store.pending("bob", 1))[0].sender == "0xAbC"
        await store.close()
        with pytest.raises(StoreOpenError):
            await sealed(db, old).open()
    asyncio.run(body())


def test_history_kept_under_an_old_key_stays_readable_and_keeps_that_key_required(tmp_path, database):
    db, old, new = database, storage_key(tmp_path, "old.key"), storage_key(tmp_path, "new.key")

    async def body() -> None:
        store = sealed(db, old)
        store.keep_history(60_000)
        await store.open()
        kept = message("bob", "kept-1")
        await store.enqueue(kept, ROOMY)
        await store.remove("bob", [kept.seq])  # delivered: history keeps it, sealed with the old key
        await store.close()
        counts = await sealed(db, new, old).reseal()
        assert counts["history_left"] == 1 and counts["messages"] == 0
        with pytest.raises(StoreOpenError, match="none of the configured key files"):
            await sealed(db, new).open()  # the old key still opens kept history: still required
        store = sealed(db, new, old)
        store.keep_history(60_000)
        await store.open()
        page = await store.history("bob", 10)
        assert [(m.message_id, m.sender, m.content) for m in page.messages] == [("kept-1", "0xAbC", "hello")]
        assert await store.delete_history("bob", ["kept-1"]) == 1
        await store.close()
        assert (await sealed(db, new, old).reseal())["history_left"] == 0
        store = sealed(db, new)  # nothing needs the old key any more
        await store.open()
        await store.close()
    asyncio.run(body())


def test_reseal_seals_a_store_written_without_encryption(tmp_path):
    db, key = tmp_path / "plain.db", storage_key(tmp_path)

    async def body() -> None:
        plain = SQLiteStore(str(db))
        await plain.open()
        await plain.enqueue(message("0xb0b", "m-clear", "clear-content"), ROOMY)
        await plain.close()
        with pytest.raises(StoreOpenError, match="relayd reseal"):
            await sealed(db, key).open()
        assert (await sealed(db, key).reseal())["messages"] == 1
        store = sealed(db, key)
        await store.open()
        [got] = await store.pending("0xb0b", 10)
        assert (got.sender, got.message_id, got.content) == ("0xAbC", "m-clear", "clear-content")
        await store.close()
    asyncio.run(body())
    # freed pages keep old bytes until reused: VACUUM after reseal is the operator's step (docs/security.md)
    conn = sqlite3.connect(db)
    conn.execute("VACUUM")
    conn.close()
    assert b"clear-content" not in files_of(db) and b"m-clear" not in files_of(db)


def test_caps_count_what_fits_and_stats_hide_the_check_record(tmp_path):
    async def body() -> None:
        store = sealed(tmp_path / "s.db", storage_key(tmp_path))
        await store.open()
        tight = QueueLimits(max_messages=10, max_bytes=100, drop_oldest=False)
        assert await store.enqueue(message("bob", "fits", "x" * 100), tight) is EnqueueResult.QUEUED
        assert await store.enqueue(message("bob", "huge", "x" * 101), tight) is EnqueueResult.FULL
        assert await store.enqueue_many([message("bob", "a", "x" * 101), message("bob", "b")], tight) == \
            [EnqueueResult.FULL, EnqueueResult.QUEUED]
        assert await store.key_count() == 0 and (await store.stats())["keys"] == 0
        assert await store.inner.get_key(CHECK_ADDRESS) is not None
        assert (await store.stats())["bytes"] > 100  # sealed bytes are what the disk holds
        await store.close()
    asyncio.run(body())


# Command line


def test_keygen_writes_a_storage_key_with_mode_0600_and_never_overwrites(tmp_path):
    path = tmp_path / "storage.key"
    cli_ok(tmp_path, "keygen", "--storage-key", str(path))
    assert len(path.read_bytes()) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    result = run_cli(tmp_path, "keygen", "--storage-key", str(path))
    assert result.returncode == 2 and "already exists" in result.stderr and path.read_bytes() == before
    (tmp_path / "short.key").write_bytes(b"x" * 31)
    result = run_cli(tmp_path, "reseal", env=clean_env(RELAYD_STORAGE_ENCRYPTION_KEY_FILE=str(tmp_path / "short.key")))
    assert result.returncode == 2 and "31 bytes, not 32" in result.stderr, result.stderr
    result = run_cli(tmp_path, "reseal")
    assert result.returncode == 2 and "needs [storage] encryption_key_file" in result.stderr


def test_a_key_without_the_encryption_extra_is_a_clear_start_up_error(tmp_path):
    env = clean_env(**without_modules(tmp_path, "cryptography"), RELAYD_STORAGE_ENCRYPTION_KEY_FILE=storage_key(tmp_path))
    result = run_cli(tmp_path, env=env)
    assert result.returncode == 2 and "optional extra encryption" in result.stderr, result.stderr


# Redis: a dump, a restart, and several instances


def redis_env(url: str, keys: str, **extra: str) -> dict[str, str]:
    return {"RELAYD_STORAGE_BACKEND": "redis", "RELAYD_REDIS_URL": url, "RELAYD_STORAGE_ENCRYPTION_KEY_FILE": keys,
            "RELAYD_AUTH_MODE": "open", "RELAYD_LIMITS_FRAMES_PER_S": "0",
            "RELAYD_LIMITS_CONNECTIONS_PER_IP_PER_S": "0", **extra}


def rdb_dump(redis: Any) -> bytes:
    """Everything the server holds, as an uncompressed RDB file (compression would hide clear strings); a clear
    control value proves the search would see one."""
    redis.cli("CONFIG", "SET", "rdbcompression", "no")
    redis.cli("SET", "control", "clear-control-value")
    redis.cli("SAVE")
    dump = (Path(redis.workdir) / "dump.rdb").read_bytes()
    assert b"clear-control-value" in dump
    return dump


def test_a_redis_dump_under_load_shows_no_address_message_id_or_content(tmp_path, fresh_redis):
    keys = storage_key(tmp_path)
    load = Load()
    relay = ProcessRelay(tmp_path / "one", env=redis_env(fresh_redis.url, keys))
    try:
        load.run(relay)
        online = [new_address() for _ in range(3)]
        load.others += online
        with contextlib.ExitStack() as stack:  # the presence registry holds them while they are connected
            for address in online:
                stack.enter_context(connect(relay, address))
            wait_until(lambda: fresh_redis.cli("KEYS", "*:on:*").strip(), "this instance's presence entries")
            load.assert_absent(rdb_dump(fresh_redis), "the Redis dump")
    finally:
        assert relay.stop() == 0
    relay = ProcessRelay(tmp_path / "two", env=redis_env(fresh_redis.url, keys))
    try:
        load.assert_delivered(relay)
    finally:
        relay.stop()
    other = storage_key(tmp_path, "other.key")
    result = run_cli(tmp_path, env=clean_env(**redis_env(fresh_redis.url, other), RELAYD_SERVER_PORT="0"))
    assert result.returncode == 2 and "none of the configured key files" in result.stderr, result.stderr


def test_several_instances_on_sealed_redis_deliver_live_and_stored(tmp_path, fresh_redis, relay_cluster):
    keys = storage_key(tmp_path)
    one, two = relay_cluster(fresh_redis, RELAYD_STORAGE_ENCRYPTION_KEY_FILE=keys, RELAYD_AUTH_MODE="open")
    alice, bob, carol = new_address(), new_address(), new_address()
    with connect(one, alice) as a, connect(two, bob) as b:
        a.send(msg(bob, "live-1", "across instances"))  # bob's presence is found under his blind queue key
        status_frame(a.recv(), "delivered", "live-1", bob)
        assert b.recv_type("message")["content"] == "across instances"
        a.send(msg(carol, "stored-1", "for later"))
        status_frame(a.recv(), "queued", "stored-1", carol)
        with connect(two, carol, ack=True) as c:
            assert [f["content"] for f in read_backlog(c)] == ["for later"]
            a.send(msg(carol, "live-2", "now"))
            assert a.recv()["type"] in ("delivered", "queued")
            assert c.recv_type("message")["content"] == "now"
            dump = rdb_dump(fresh_redis)  # all three online: presence entries on both instances, watches
    for secret in (alice, bob, carol, "across instances", "for later", "stored-1"):
        assert secret.encode() not in dump and secret[2:].encode() not in dump


def test_a_sealed_redis_backplane_keeps_no_address_and_reads_addresses_back(redis_server, redis_prefix, tmp_path):
    """With encryption at rest, presence and watches as the cluster uses them, on a real Redis, whose keys and
    values show no address; the online list and forgetting a dead instance give the addresses back; an entry
    that does not open with the key (an instance with other keys) is skipped, not fatal."""
    from relayd.cluster.redis_backplane import RedisBackplane
    from relayd.storage.redis.store import RedisStore
    from relayd.storage.sealing import Sealer

    async def body() -> None:
        store = SealedStore(RedisStore(redis_server.url, key_prefix=redis_prefix), load_keys([storage_key(tmp_path)]))
        await store.open()
        try:
            inner = store.inner
            assert isinstance(inner, RedisStore)
            plane = RedisBackplane(inner, sealed=store, queue_key=store.queue, seals=store.sealer)
            foreign = RedisBackplane(inner, sealed=store, queue_key=store.queue,
                                     seals=Sealer(load_keys([storage_key(tmp_path, "other.key")])))

            async def dump() -> str:  # every key of this test's prefix and what it holds
                assert await foreign.addresses_of(["i1"]) == []  # labels that do not open with its key: skipped
                client = inner.link.client
                read = {"hash": client.hgetall, "set": client.smembers, "string": client.get,
                        "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}
                keys = [k async for k in client.scan_iter(match=redis_prefix + "*")]
                assert any(":on:" in k for k in keys)
                return repr({k: await read[await client.type(k)](k) for k in keys})

            carol = (await present_and_forgotten(plane, dump))[2]
            assert await plane.addresses_of(["i1"]) == []
            await plane.join(carol, "i3", "p", 60_000)
            await plane.join(carol, "i3", "", 60_000)  # its last session left: no entry, no label left behind
            assert await plane.addresses_of(["i3"]) == [] and [c async for c in plane.forget("i3", 10)] == []
        finally:
            await store.close()
    asyncio.run(body())


# PostgreSQL, end to end


def pg_dump(pg_server: Any, url: str) -> bytes:
    database = url.rsplit("/", 1)[1]
    return subprocess.run([os.path.join(pg_server.bindir, "pg_dump"), "-h", "127.0.0.1", "-p", str(pg_server.port),
                           "-U", "postgres", "-d", database], capture_output=True, timeout=120, check=True).stdout


def test_a_pg_dump_under_load_shows_no_address_message_id_or_content(tmp_path, pg_server, pg_database):
    """With history on, a delivered message's kept copy and a stored receipt are in the dump too."""
    pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")
    keys = storage_key(tmp_path)
    env = {**redis_env("", keys), "RELAYD_STORAGE_BACKEND": "postgres", "RELAYD_POSTGRES_URL": pg_database,
           "RELAYD_HISTORY_DAYS": "7"}
    del env["RELAYD_REDIS_URL"]
    load = Load()
    relay = ProcessRelay(tmp_path / "one", env=env)
    try:
        load.run(relay)
        reader = load.recipients[0]
        writer, first, _ = load.sent[reader][0]
        with connect(relay, reader, ack=True) as ws:  # delivered: kept in history, sealed
            frames = read_backlog(ws)
            ws.send({"type": "ack", "messageIds": ids_of(frames)})
            ws.send({"type": "read_receipt", "to": writer, "messageId": first})
            frames_until_pong(ws)
    finally:
        assert relay.stop() == 0
    load.sent[reader] = []
    database = pg_database.rsplit("/", 1)[1]
    assert int(pg_server.psql("SELECT count(*) FROM history", database)) > 0
    assert int(pg_server.psql("SELECT count(*) FROM receipts", database)) == 1
    dump = pg_dump(pg_server, pg_database)
    assert b"COPY public.history" in dump and b"COPY public.messages" in dump
    load.assert_absent(dump, "the pg_dump")
    relay = ProcessRelay(tmp_path / "two", env=env)
    try:
        load.assert_delivered(relay)
        with connect(relay, writer) as ws:
            assert_read(ws.recv_type("read", timeout=10), reader, first)
    finally:
        relay.stop()


def test_relayd_migrate_copies_a_sealed_sqlite_store_to_postgres_as_stored(tmp_path, pg_database):
    """Records are copied as stored (sealed, blind-indexed, the check record with them): the PostgreSQL copy
    opens with the same key, delivers everything and still shows nothing in clear."""
    pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")
    keys = storage_key(tmp_path)
    load = Load(per_sender=10)
    relay = ProcessRelay(tmp_path / "sqlite", config_text=CONFIG.format(keys=keys))
    try:
        load.run(relay)
    finally:
        assert relay.stop() == 0
    db = tmp_path / "sqlite" / "relayd-data" / "relayd.db"
    env = {**redis_env("", keys), "RELAYD_STORAGE_BACKEND": "postgres", "RELAYD_POSTGRES_URL": pg_database}
    del env["RELAYD_REDIS_URL"]
    done = cli_ok(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", pg_database, env=clean_env(**env))
    assert '"messages_copied": 40' in done.stdout, done.stdout
    relay = ProcessRelay(tmp_path / "pg", env=env)
    try:
        load.assert_delivered(relay)
    finally:
        relay.stop()


# PostgreSQL: several instances on one sealed database ([postgres] cluster = true)

OPEN = {"RELAYD_AUTH_MODE": "open", "RELAYD_LIMITS_FRAMES_PER_S": "0", "RELAYD_LIMITS_CONNECTIONS_PER_IP_PER_S": "0"}


def test_a_pg_dump_of_a_sealed_cluster_under_load_shows_no_address_message_id_or_content(tmp_path, pg_server,
                                                                                      pg_database, relay_cluster):
    """Taken while sessions are online on both instances (presence, watches), after live messages, typing and a
    read receipt across instances, offline messages queued through both and read on the other, and a stored
    receipt; PostgreSQL's notification queue (``pg_notify/``, which reaches the disk) is searched too. Both
    instances restarted with the key then deliver everything."""
    pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")
    db = SealedDatabase(pg_database, storage_key(tmp_path))
    one, two = relay_cluster(db, 2, RELAYD_HISTORY_DAYS="7", **OPEN)
    load = Load()
    load.run(one, two)
    alice, bob = new_address(), new_address()
    load.others += [alice, bob]
    reader = load.recipients[0]
    writer, first, _ = load.sent[reader][0]
    with connect(one, alice) as a, connect(two, bob) as b, connect(two, reader, ack=True) as r:
        for _ in range(20):  # 600 kB of notices: more than PostgreSQL's notification buffers, some reach the disk
            mid, secret = str(uuid.uuid4()), f"live-{uuid.uuid4().hex}"
            load.others += [mid, secret]
            content = secret + "." * 30_000
            a.send(msg(bob, mid, content))
            status_frame(a.recv(), "delivered", mid, bob)
            assert b.recv_type("message")["content"] == content
        b.send({"type": "typing", "to": alice, "isTyping": True})
        assert a.recv() == {"type": "typing", "from": bob, "isTyping": True}
        b.send({"type": "read_receipt", "to": alice, "messageId": mid})
        assert_read(a.recv_type("read"), bob, mid)
        frames = read_backlog(r)  # queued through both instances, read on one: kept in history, sealed
        assert len(frames) == len(load.sent[reader])
        r.send({"type": "ack", "messageIds": ids_of(frames)})
        r.send({"type": "read_receipt", "to": writer, "messageId": first})  # the writer is offline: stored
        frames_until_pong(r)
        database = pg_database.rsplit("/", 1)[1]
        wait_until(lambda: int(pg_server.psql("SELECT count(*) FROM cluster_presence", database)) == 3,
                   "the three online addresses in presence")
        assert int(pg_server.psql("SELECT count(*) FROM receipts", database)) == 1
        dump = pg_dump(pg_server, pg_database)
    assert b"COPY public.cluster_presence" in dump and b"COPY public.history" in dump
    load.assert_absent(dump, "the pg_dump of the cluster")
    notify = pg_server.data / "pg_notify"
    load.assert_absent(b"".join(p.read_bytes() for p in notify.iterdir()), "PostgreSQL's notification queue")
    load.sent[reader] = []
    for relay in (one, two):
        assert relay.stop() == 0
    one, two = relay_cluster(db, 2, RELAYD_HISTORY_DAYS="7", **OPEN)
    load.assert_delivered(two, one)
    with connect(one, writer) as ws:
        assert_read(ws.recv_type("read", timeout=10), reader, first)


def test_rotating_the_key_of_a_sealed_postgres_cluster_loses_nothing(tmp_path, pg_database, relay_cluster):
    """Old key; then the new key listed first on every instance (new records sealed with it, live traffic across
    instances); then ``relayd reseal`` with the cluster stopped; then the new key alone delivers everything."""
    pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")
    old, new = storage_key(tmp_path, "old.key"), storage_key(tmp_path, "new.key")
    before, during = Load(per_sender=10), Load(per_sender=10)
    relays = relay_cluster(SealedDatabase(pg_database, old), 2, **OPEN)
    before.run(*relays)
    for relay in relays:
        assert relay.stop() == 0
    rotated = SealedDatabase(pg_database, f"{new},{old}")
    relays = relay_cluster(rotated, 2, **OPEN)
    during.run(*reversed(relays))
    alice, bob = new_address(), new_address()
    with connect(relays[0], alice) as a, connect(relays[1], bob) as b:
        a.send(msg(bob, "live-after-rotation", "across"))
        status_frame(a.recv(), "delivered", "live-after-rotation", bob)
        assert b.recv_type("message")["content"] == "across"
    for relay in relays:
        assert relay.stop() == 0
    env = {"RELAYD_STORAGE_BACKEND": "postgres", "RELAYD_POSTGRES_URL": pg_database, "RELAYD_POSTGRES_CLUSTER": "true",
           **rotated.env}
    done = cli_ok(tmp_path, "reseal", env=clean_env(**env))
    assert '"messages": 40' in done.stdout and '"unreadable": 0' in done.stdout, done.stdout
    relays = relay_cluster(SealedDatabase(pg_database, new), 2, **OPEN)
    before.assert_delivered(*relays)
    during.assert_delivered(*reversed(relays))

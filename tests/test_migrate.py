"""``relayd migrate`` between any two persistent backends (SQLite, Redis, PostgreSQL), safe to re-run.

Every pair: a real relay fills the source (queued messages, a message delivered live and kept in history, a
stored receipt, a signed key and its lock, a push subscription); ``relayd migrate`` runs twice; the copy reads
back as its source (every record, read the same way from each backend) and the second run changes nothing; a
relay on the destination delivers every message once and in order, serves the key, the receipt, the history and
the push subscription, and answers a resend of a delivered messageId as the first one was. Sealed stores
(encryption at rest) migrate as stored under the same key, and a destination sealed with another key is refused
before anything is copied.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from support import (ADDR_B, KEY_B, assert_read, clean_env, connect, frames_until_pong, key_body, msg, new_address,
                     run_cli, signed_login, storage_key, wait_until)

from relayd.storage.snapshot import open_snapshot
from relayd.storage.store import PushSubscription, Store

BACKENDS = ("sqlite", "redis", "postgres")
PAIRS = [(source, dest) for source in BACKENDS for dest in BACKENDS if source != dest]
PUB_KEY = base64.b64encode(bytes(range(32))).decode()
DAY_MS = 86_400_000


@dataclass
class Place:
    """One backend's database: what the CLI names it by, and a new (unopened) store on it."""

    cli: str
    store: Callable[[], Store]


def place(kind: str, tmp: Path, request: pytest.FixtureRequest, prefix: str, *, own_redis: bool = False) -> Place:
    if kind == "sqlite":
        from relayd.storage.sqlite.store import SQLiteStore
        path = str(tmp / f"{tmp.name}.db")
        return Place(f"sqlite:{path}", lambda: SQLiteStore(path, commit_interval_ms=0.5))
    if kind == "postgres":
        from relayd.storage.postgres import PostgresStore
        url = request.getfixturevalue("pg_server").new_database()
        return Place(url, lambda: PostgresStore(url, pool_size=4))
    from relayd.storage.redis import RedisStore
    url = request.getfixturevalue("fresh_redis" if own_redis else "redis_server").url
    return Place(url, lambda: RedisStore(url, key_prefix=prefix))


def read_back(where: str, prefix: str) -> dict[str, Any]:
    """Everything a store holds, as ``relayd migrate`` reads it (the same read for every backend)."""
    async def main() -> dict[str, Any]:
        snapshot = await open_snapshot(where, key_prefix=prefix)
        try:
            return {"messages": [m async for m in snapshot.messages()],
                    "receipts": [r async for r in snapshot.receipts()],
                    "keys": sorted([k async for k in snapshot.keys()], key=lambda k: k.address),
                    "locks": sorted([a async for a in snapshot.locks()]),
                    "floors": sorted([f async for f in snapshot.floors()]),
                    "tokens": [t async for t in snapshot.tokens(0)],
                    "delivered": sorted([(d.recipient, d.sender, d.message_id, d.queued_at)
                                         async for d in snapshot.delivered()]),
                    "history": sorted([(repr(m), until) async for m, until in snapshot.history()]),
                    "push": [p async for p in snapshot.push_subscriptions()]}
        finally:
            await snapshot.close()
    return asyncio.run(main())


def as_kept(data: dict[str, Any]) -> dict[str, Any]:
    """What must be the same in a source and its copy (seqs of queued messages and receipts are the store's)."""
    return {**data, "messages": [(m.recipient, m.sender, m.message_id, m.content, m.timestamp, m.queued_at)
                                 for m in data["messages"]],
            "receipts": sorted((r.recipient, r.reader, r.message_id, r.timestamp) for r, _ in data["receipts"])}


def migrate(tmp: Path, source: str, dest: str, prefix: str, **env: str) -> dict[str, int]:
    done = run_cli(tmp, "migrate", "--from", source, "--to", dest,
                   env=clean_env(RELAYD_REDIS_KEY_PREFIX=prefix, **env))
    assert done.returncode == 0, done.stderr
    counts: dict[str, int] = json.loads(done.stdout)
    return counts


def fill(relay: Any, sender: str, reader: str, push: PushSubscription) -> dict[str, Any]:
    """Through a real relay: d0 delivered live to B (kept in history), q0..q2 queued for B, a receipt of d0
    stored for the sender (offline), B's signed key (and lock); a push subscription through the store API."""
    b, _ = signed_login(relay, KEY_B)
    with b, connect(relay, sender) as c:
        c.send(msg(ADDR_B, "d0", "delivered live", timestamp=1_700_000_000_000))
        assert c.recv()["type"] in ("delivered", "queued")  # SQLite stores first, then pushes
        assert b.recv_type("message")["messageId"] == "d0"
        store = relay.server.store
        wait_until(lambda: relay.call(store.history(ADDR_B, 10)).messages, "d0 kept in history")
    with connect(relay, sender) as c:
        for i in range(3):
            c.send(msg(ADDR_B, f"q{i}", f"queued {i}", timestamp=1_700_000_000_001 + i))
            assert c.recv_type("queued")["messageId"] == f"q{i}"
    with connect(relay, reader) as r:
        r.send({"type": "read_receipt", "to": sender, "messageId": "d0"})
        wait_until(lambda: relay.call(store.receipts(sender, 10)), "the receipt stored for the offline sender")
    assert relay.http("POST", "/api/public-keys", key_body(KEY_B, PUB_KEY, int(time.time()))).status == 200
    relay.call(store.put_push_subscription(push, 5))
    key: dict[str, Any] = relay.http("GET", f"/api/public-keys/{ADDR_B}").json
    return key


def check_destination(relay: Any, sender: str, reader: str, push: PushSubscription, key: dict[str, Any]) -> None:
    assert relay.http("GET", f"/api/public-keys/{ADDR_B}").json == key
    assert relay.call(relay.server.store.push_subscriptions(ADDR_B, int(time.time() * 1000))) == [push]
    with relay.ws() as plain:  # the lock came along: B's unsigned sign-in is refused
        plain.send({"type": "auth", "address": ADDR_B})
        assert plain.recv_type("error")["code"] == "auth_required"
    b, _ = signed_login(relay, KEY_B, ack=True)
    with b:
        got = [b.recv_type("message") for _ in range(3)]
        assert [(m["messageId"], m["content"]) for m in got] == [(f"q{i}", f"queued {i}") for i in range(3)]
        b.recv_type("queue_empty")
        b.send({"type": "ack", "messageIds": ["q0", "q1", "q2"]})
        b.send({"type": "history"})
        kept = b.recv_type("history")["messages"]
        assert [m["messageId"] for m in kept if m["messageId"] == "d0"] == ["d0"], kept
        with connect(relay, sender) as c:
            assert_read(c.recv_type("read"), reader, "d0")
            for mid in ("d0", "q0"):  # delivered before (d0 on the source, q0 just now): answered as then
                c.send(msg(ADDR_B, mid, "sent again"))
                assert c.recv()["type"] == "delivered"
        assert frames_until_pong(b) == []  # and not delivered again


@pytest.mark.parametrize("source,dest", PAIRS)
def test_migrate_every_pair_twice_then_serve_from_the_destination(source, dest, tmp_path, request, redis_prefix,
                                                                  start_relay):
    sender, reader = new_address(), new_address()
    now = int(time.time() * 1000)
    push = PushSubscription("p1", ADDR_B, "fcm", "device-token-b", created_at=now, expires_at=now + DAY_MS)
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    src = place(source, tmp_path / "src", request, redis_prefix, own_redis=source == dest == "redis")
    dst = place(dest, tmp_path / "dst", request, redis_prefix)

    relay = start_relay(store=src.store(), history={"days": 7})
    key = fill(relay, sender, reader, push)
    relay.stop()

    first = migrate(tmp_path, src.cli, dst.cli, redis_prefix)
    assert {k: first[k] for k in ("messages_copied", "receipts_copied", "keys_copied", "history_copied",
                                  "push_subscriptions")} == {"messages_copied": 3, "receipts_copied": 1,
                                                             "keys_copied": 1, "history_copied": 1,
                                                             "push_subscriptions": 1}, first
    assert first["locks"] == 1 and first["key_floors"] == 1 and first["delivered_records"] == 1, first
    copied = read_back(dst.cli, redis_prefix)
    assert as_kept(copied) == as_kept(read_back(src.cli, redis_prefix)), "the copy differs from its source"
    assert copied["tokens"] and copied["delivered"] and copied["history"]
    again = migrate(tmp_path, src.cli, dst.cli, redis_prefix)
    assert again["messages_copied"] == again["receipts_copied"] == again["keys_copied"] == 0, again
    assert again["messages_already_copied"] == 3 and again["history_already_copied"] == 1, again
    assert read_back(dst.cli, redis_prefix) == copied, "a second run changed the destination"
    assert [m.message_id for m in copied["messages"]] == ["q0", "q1", "q2"]

    check_destination(start_relay(store=dst.store(), history={"days": 7}), sender, reader, push, key)


def sealed(make: Callable[[], Store], key: str) -> Store:
    from relayd.storage.sealed import SealedStore
    from relayd.storage.sealing import load_keys
    return SealedStore(make(), load_keys([key]))  # type: ignore[return-value]


def test_sealed_records_migrate_as_stored_to_a_destination_with_the_same_key(tmp_path, request, redis_prefix,
                                                                             start_relay):
    """Redis (blind-indexed keys) to PostgreSQL, both sealed with one key: copied as stored, twice without a change,
    and a relay with that key serves everything, while the copy shows no address in clear."""
    pytest.importorskip("cryptography")
    key = storage_key(tmp_path, "storage.key")
    sender, reader = new_address(), new_address()
    now = int(time.time() * 1000)
    push = PushSubscription("p1", ADDR_B, "webpush", "https://push.example/b", "p256", "auth", now, now + DAY_MS)
    src = place("redis", tmp_path, request, redis_prefix)
    dst = place("postgres", tmp_path, request, redis_prefix)
    relay = start_relay(store=sealed(src.store, key), history={"days": 7})
    answer = fill(relay, sender, reader, push)
    relay.stop()

    first = migrate(tmp_path, src.cli, dst.cli, redis_prefix)
    assert (first["messages_copied"], first["history_copied"], first["receipts_copied"]) == (3, 1, 1), first
    copied = read_back(dst.cli, redis_prefix)
    migrate(tmp_path, src.cli, dst.cli, redis_prefix)
    assert read_back(dst.cli, redis_prefix) == copied
    clear = repr([copied[part] for part in ("messages", "receipts", "delivered", "history")])
    # messageId "q1" is searched as a field would show it in clear: two characters alone turn up in base64
    assert ADDR_B not in clear and sender not in clear and "message_id='q1'" not in clear and "queued 1" not in clear

    check_destination(start_relay(store=sealed(dst.store, key), history={"days": 7}), sender, reader, push, answer)


def test_a_destination_that_would_not_open_the_records_is_refused_before_anything_is_copied(tmp_path, start_relay):
    """Sealed with another key, or sealed while the source is in clear (and the other way round): exit 1 with the
    reason and what to do; the destination is left as it was."""
    pytest.importorskip("cryptography")
    from relayd.storage.sqlite.store import SQLiteStore
    one, other = storage_key(tmp_path, "one.key"), storage_key(tmp_path, "other.key")
    paths = {name: str(tmp_path / f"{name}.db") for name in ("sealed", "clear", "elsewhere", "clear-dest")}

    def store_on(name: str, key: str | None = None) -> Callable[[], Store]:
        make = lambda: SQLiteStore(paths[name], commit_interval_ms=0.5)  # noqa: E731
        return (lambda: sealed(make, key)) if key else make

    for name, key in (("sealed", one), ("clear", None), ("elsewhere", other), ("clear-dest", None)):
        relay = start_relay(store=store_on(name, key)())
        with connect(relay, new_address()) as c:
            c.send(msg(ADDR_B, f"m-{name}", "secret"))
            assert c.recv_type("queued")
        relay.stop()

    for source, dest, needle in (
            ("sealed", "elsewhere", "sealed with key id"),
            ("clear", "elsewhere", "the source's are not"),
            ("sealed", "clear-dest", "holds records in clear")):
        before = read_back(f"sqlite:{paths[dest]}", "relayd:")
        done = run_cli(tmp_path, "migrate", "--from", f"sqlite:{paths[source]}", "--to", f"sqlite:{paths[dest]}",
                       env=clean_env())
        assert done.returncode == 1 and needle in done.stderr and "nothing was copied" in done.stderr, done.stderr
        assert read_back(f"sqlite:{paths[dest]}", "relayd:") == before


def test_a_redis_cluster_is_read_on_every_primary(tmp_path, redis_cluster, redis_prefix):
    """Queues spread over the three primaries (one hash slot per address) all come along, each in order, with
    the delivered records and kept history of every node."""
    from relayd.storage.redis import RedisStore
    from relayd.storage.store import QueuedMessage, QueueLimits
    roomy = QueueLimits(max_messages=100, max_bytes=1_000_000, drop_oldest=False)
    recipients = [new_address() for _ in range(12)]
    sender = new_address()

    async def fill() -> None:
        store = RedisStore(redis_cluster.url, key_prefix=redis_prefix, cluster=True)
        store.keep_history(DAY_MS)
        await store.open()
        try:
            now = int(time.time() * 1000)
            for to in recipients:
                for i in range(3):
                    assert (await store.enqueue(QueuedMessage(to, sender, f"{to}-{i}", f"c{i}", now + i, now),
                                                roomy)).value == "queued"
                await store.record_delivered([QueuedMessage(to, sender, f"{to}-live", "kept", now, now)])
        finally:
            await store.close()
    asyncio.run(fill())
    holding = [n for n in redis_cluster.nodes
               if any(n.cli("EXISTS", f"{redis_prefix}{{{to}}}:q") == "1" for to in recipients)]
    assert len(holding) > 1, "the queues should sit on several primaries"
    db = tmp_path / "copy.db"
    counts = migrate(tmp_path, redis_cluster.url, f"sqlite:{db}", redis_prefix)
    assert (counts["messages_copied"], counts["delivered_records"], counts["history_copied"]) == (36, 12, 12), counts
    copied = read_back(f"sqlite:{db}", redis_prefix)
    assert sorted(m.message_id for m in copied["messages"]) == sorted(f"{to}-{i}" for to in recipients
                                                                      for i in range(3))
    for to in recipients:
        assert [m.content for m in copied["messages"] if m.recipient == to] == ["c0", "c1", "c2"]


def test_a_redis_source_with_nothing_under_the_prefix_or_unreachable_is_a_clear_failure(tmp_path, redis_server,
                                                                                        redis_prefix):
    from support import free_port
    for source, needle in ((redis_server.url, f"holds no relayd data under the key prefix '{redis_prefix}'"),
                           (f"redis://127.0.0.1:{free_port()}/0", "cannot read Redis")):
        done = run_cli(tmp_path, "migrate", "--from", source, "--to", f"sqlite:{tmp_path / 'x.db'}",
                       env=clean_env(RELAYD_REDIS_KEY_PREFIX=redis_prefix))
        assert done.returncode == 1 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_source_that_fails_while_it_is_read_is_storage_unavailable_naming_it(kind, tmp_path, request,
                                                                                redis_prefix):
    """The copy stops with the reason (exit 1 in the CLI), never a traceback; closing the source still works."""
    from relayd.storage.store import QueuedMessage, QueueLimits, StorageUnavailable
    source = place(kind, tmp_path, request, redis_prefix, own_redis=True)

    async def main() -> None:
        store = source.store()
        await store.open()
        try:
            await store.enqueue(QueuedMessage(ADDR_B, new_address(), "m1", "c", 1, int(time.time() * 1000)),
                                QueueLimits(max_messages=10, max_bytes=1000, drop_oldest=False))
        finally:
            await store.close()
        snapshot = await open_snapshot(source.cli, key_prefix=redis_prefix)
        try:
            if kind == "redis":
                request.getfixturevalue("fresh_redis").stop()
            else:
                pid = snapshot._conn.get_server_pid()  # type: ignore[attr-defined]
                request.getfixturevalue("pg_server").psql(f"SELECT pg_terminate_backend({pid})",
                                                          source.cli.rsplit("/", 1)[1])
            named = "Redis" if kind == "redis" else "PostgreSQL"
            with pytest.raises(StorageUnavailable, match=f"reading the source {named} failed"):
                async for _ in snapshot.messages():
                    pass
        finally:
            await snapshot.close()
    asyncio.run(main())


def test_a_postgres_source_of_schema_version_1_has_no_history_and_still_migrates(tmp_path, pg_database):
    """A database an older relayd wrote (before message history) is read as it is, never upgraded."""
    asyncpg = pytest.importorskip("asyncpg")
    from relayd.storage.postgres.schema import MIGRATIONS

    async def old_relayd() -> None:
        conn = await asyncpg.connect(pg_database)
        try:
            await conn.execute("CREATE TABLE relayd_schema_version (version INTEGER PRIMARY KEY, "
                               "applied_at BIGINT NOT NULL)")
            for statement in MIGRATIONS[0]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO relayd_schema_version VALUES (1, 0)")
            await conn.execute("INSERT INTO messages VALUES (1, $1, $2, 'm1', 1, $3, 1, 'c')", ADDR_B,
                               new_address(), int(time.time() * 1000))
        finally:
            await conn.close()
    asyncio.run(old_relayd())
    counts = migrate(tmp_path, pg_database, f"sqlite:{tmp_path / 'x.db'}", "relayd:")
    assert (counts["messages_copied"], counts["history_copied"]) == (1, 0), counts

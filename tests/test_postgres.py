"""relayd on PostgreSQL: a real server started by the tests, relayd processes on it, and the server stopped under load.

The store contract itself runs in test_store_contract.py (parametrized over ``postgres``); here: the schema's
versions, the configuration (URL, environment, libpq's variables and password file, redaction), a relay that keeps
what it answered queued across its restart, and PostgreSQL going away and coming back without relayd restarting.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from support import (ADDR_A, A, B, C, ProcessRelay, clean_env, msg, present_and_forgotten, received_once,
                     run_cli, scaled, storage_key, wait_until, without_modules)

pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")

from relayd.storage.postgres import PostgresStore  # noqa: E402
from relayd.storage.postgres.schema import SCHEMA_VERSION  # noqa: E402
from relayd.storage.store import QueuedMessage, QueueLimits, StoreOpenError  # noqa: E402

ROOMY = QueueLimits(max_messages=1000, max_bytes=1_000_000, drop_oldest=False)


def pg_env(url: str, **extra: str) -> dict[str, str]:
    return {"RELAYD_STORAGE_BACKEND": "postgres", "RELAYD_POSTGRES_URL": url, **extra}


def start_pg_relay(tmp: Path, url: str, **extra: str) -> ProcessRelay:
    tmp.mkdir(parents=True, exist_ok=True)
    return ProcessRelay(tmp, env=pg_env(url, **extra))


def send_expect(client: Any, frame: dict[str, Any], answer: str) -> dict[str, Any]:
    client.send(frame)
    reply = client.recv_type(answer) if answer != "error" else client.recv()
    assert reply["type"] == answer, reply
    return reply


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(scaled(60)):
            return await coro
    return asyncio.run(bounded())


# The schema


def test_the_schema_is_versioned_migrated_once_and_kept_across_reopening(pg_database, pg_server):
    async def body() -> None:
        store = PostgresStore(pg_database)
        await store.open()
        m = QueuedMessage("bob", "alice", "m1", "hello", 1, 2)
        assert await store.enqueue(m, ROOMY) is not None
        await store.close()
        again = PostgresStore(pg_database)
        await again.open()  # a second open migrates nothing and keeps the rows and the numbering
        assert [x.message_id for x in await again.pending("bob", 10)] == ["m1"]
        later = QueuedMessage("bob", "alice", "m2", "hello", 1, 2)
        await again.enqueue(later, ROOMY)
        assert later.seq > m.seq and again.total() == 2
        await again.close()
    run(body())
    name = pg_database.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT string_agg(version::text, ',' ORDER BY version) FROM relayd_schema_version",
                          name) == ",".join(str(v) for v in range(1, SCHEMA_VERSION + 1))


def test_pooled_and_single_connections_read_from_the_heap(pg_database):
    """relayd.reads, through asyncpg's ``_transport`` (the pool's connections and those outside it)."""
    from relayd.reads import READ_SIZE

    async def body() -> None:
        store = PostgresStore(pg_database)
        await store.open()
        try:
            async with store.link._pool.acquire() as conn:
                assert conn._transport.max_size == READ_SIZE
            single = await store.link.connect_one()
            assert single._transport.max_size == READ_SIZE
            await single.close()
        finally:
            await store.close()
    run(body())


def test_a_database_from_a_newer_relayd_or_someone_elses_is_refused_at_open(pg_server):
    newer = pg_server.new_database()
    run(_open_close(newer))
    pg_server.psql(f"INSERT INTO relayd_schema_version VALUES ({SCHEMA_VERSION + 1}, 0)", newer.rsplit("/", 1)[1])
    with pytest.raises(StoreOpenError, match="newer"):
        run(_open_close(newer))
    foreign = pg_server.new_database()
    pg_server.psql("CREATE TABLE messages (id int)", foreign.rsplit("/", 1)[1])
    with pytest.raises(StoreOpenError, match="not relayd's"):
        run(_open_close(foreign))


async def _open_close(url: str) -> None:
    store = PostgresStore(url)
    await store.open()
    await store.close()


# Configuration


def test_the_password_is_never_printed(tmp_path, pg_server):
    url = f"postgresql://postgres:hunter2secret@127.0.0.1:{pg_server.port}/postgres?password=hunter2secret"
    shown = run_cli(tmp_path, "config", env=clean_env(**pg_env(url)))
    assert shown.returncode == 0, shown.stderr
    assert "hunter2secret" not in shown.stdout and "postgres:***@127.0.0.1" in shown.stdout
    relay = start_pg_relay(tmp_path / "relay", url)
    try:
        assert relay.http("GET", "/health/ready").status == 200
    finally:
        relay.stop()
    assert "hunter2secret" not in relay.log() and "storage: postgres postgresql://postgres:***@" in relay.log()


def test_libpq_variables_and_password_file_are_honoured(tmp_path, pg_server):
    database = pg_server.new_database().rsplit("/", 1)[1]
    role = f"r{database}"
    pg_server.require_password(role, "s3cret-pass", database)
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(pg_server.port), "PGUSER": role, "PGDATABASE": database}
    refused = run_cli(tmp_path, "run", env=clean_env(**pg_env(""), **env, RELAYD_SERVER_PORT="0",
                                                     PGPASSFILE=str(tmp_path / "none")), timeout=30)
    assert refused.returncode == 2 and "password" in refused.stderr.lower(), refused.stderr
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg_server.port}:{database}:{role}:s3cret-pass\n")
    passfile.chmod(0o600)
    relay = start_pg_relay(tmp_path / "relay", "", PGPASSFILE=str(passfile), **env)
    try:
        with relay.ws() as sender:
            sender.auth(A)
            send_expect(sender, msg(B, "m1"), "queued")
        assert relay.http("GET", "/health").json["storage"] == {"backend": "postgres", "status": "ok"}
    finally:
        relay.stop()


@pytest.mark.parametrize("env,needle", [
    ({"RELAYD_POSTGRES_URL": "mysql://x@y/z"}, "[postgres] url must start with postgresql://"),
    ({"RELAYD_POSTGRES_URL": "nonsense"}, "[postgres] url must start with postgresql://"),
    ({"RELAYD_POSTGRES_POOL_MIN": "5", "RELAYD_POSTGRES_POOL_SIZE": "2"}, "[postgres] pool_min (5) must not exceed"),
    ({"RELAYD_POSTGRES_POOL_SIZE": "0"}, "[postgres] pool_size"),
    ({"RELAYD_POSTGRES_COMMAND_TIMEOUT_S": "0"}, "[postgres] command_timeout_s"),
])
def test_bad_postgres_settings_exit_2_naming_the_key(tmp_path, env, needle):
    result = run_cli(tmp_path, "--check-config", env=clean_env(**{**pg_env("postgresql://h/d"), **env}))
    assert result.returncode == 2 and needle in result.stderr, result.stderr


def test_without_the_postgres_extra_relayd_says_so(tmp_path, pg_database):
    env = without_modules(tmp_path, "asyncpg")
    refused = run_cli(tmp_path, env=clean_env(**{**env, **pg_env(pg_database), "RELAYD_SERVER_PORT": "0"}))
    assert refused.returncode == 2
    assert "the PostgreSQL backend needs the optional extra postgres:" in refused.stderr
    assert "[postgres]'" in refused.stderr
    migrate = run_cli(tmp_path, "migrate", "--from", pg_database, "--to", "sqlite:x.db", env=clean_env(**env))
    assert migrate.returncode == 1 and "optional extra postgres" in migrate.stderr


def test_an_unknown_database_is_a_clear_error_at_start_up(tmp_path, pg_server):
    url = pg_server.database_url("no_such_database")
    result = run_cli(tmp_path, "run", env=clean_env(**pg_env(url), RELAYD_SERVER_PORT="0"), timeout=30)
    assert result.returncode == 2 and "no_such_database" in result.stderr and "does not exist" in result.stderr


# One relay on PostgreSQL


def test_queued_message_survives_a_relayd_restart(tmp_path, pg_database):
    relay = start_pg_relay(tmp_path / "one", pg_database)
    try:
        with relay.ws() as sender:
            sender.auth(A)
            send_expect(sender, msg(B, "m1", "Y2lwaGVy"), "queued")
    finally:
        assert relay.stop() == 0
    relay = start_pg_relay(tmp_path / "two", pg_database)
    try:
        with relay.ws() as receiver:
            receiver.auth(B)
            got = receiver.recv_type("message")
            assert (got["from"], got["messageId"], got["content"], got["queued"]) == (A, "m1", "Y2lwaGVy", True)
    finally:
        relay.stop()


def test_relayd_starts_while_postgres_is_down_and_becomes_ready(tmp_path, fresh_pg):
    fresh_pg.stop()
    relay = start_pg_relay(tmp_path, fresh_pg.url)
    try:
        assert relay.http("GET", "/health/ready").status == 503
        fresh_pg.start()
        wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready", timeout=scaled(15))
        with relay.ws() as sender:
            sender.auth(A)
            send_expect(sender, msg(B, "m1"), "queued")
    finally:
        relay.stop()


@pytest.mark.parametrize("how", ["stop -m fast", "kill -9"])
def test_postgres_stopped_and_started_under_load_loses_nothing_answered_queued(tmp_path, fresh_pg, how):
    """A sender keeps sending while PostgreSQL stops (pg_ctl stop -m fast, or every process of it killed as by a
    power cut) and starts again: readiness turns 503 and back without a relayd restart, every answer is queued or
    a clear storage error, and every message answered queued is delivered once."""
    relay = start_pg_relay(tmp_path, fresh_pg.url, RELAYD_LIMITS_FRAMES_PER_S="0")  # errors come back fast
    answers: dict[str, str] = {}
    stop = threading.Event()

    def load() -> None:
        with relay.ws() as sender:
            sender.auth(A)
            i = 0
            while not stop.is_set():
                mid = f"m{i}"
                sender.send(msg(B, mid))
                reply = sender.recv()
                while reply.get("type") not in ("queued", "error", "delivered"):
                    reply = sender.recv()
                answers[mid] = reply["type"] if reply["type"] != "error" else reply["code"]
                i += 1

    worker = threading.Thread(target=load)
    try:
        worker.start()
        wait_until(lambda: len(answers) >= 20, "20 answers before the outage", timeout=scaled(20))
        if how == "kill -9":
            fresh_pg.crash()
        else:
            fresh_pg.stop()  # SIGINT: pg_ctl stop -m fast
        wait_until(lambda: relay.http("GET", "/health/ready").status == 503, "not ready", timeout=scaled(10))
        problem = relay.http("GET", "/health").json["storage"]["problem"]
        assert "PostgreSQL" in problem
        during = len(answers)
        wait_until(lambda: len(answers) >= during + 5, "answers while PostgreSQL is down", timeout=scaled(20))
        fresh_pg.start()
        wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready again", timeout=scaled(15))
        after = len(answers)
        wait_until(lambda: len(answers) >= after + 20, "queued again after the outage", timeout=scaled(20))
    finally:
        stop.set()
        worker.join(scaled(30))
    try:
        kinds = set(answers.values())
        assert kinds <= {"queued", "storage_unavailable", "storage_timeout"}, kinds
        assert "storage_unavailable" in kinds or "storage_timeout" in kinds
        queued = [mid for mid, kind in answers.items() if kind == "queued"]
        unknown = {mid for mid, kind in answers.items() if kind == "storage_timeout"}
        received_once(relay, B, set(queued), unknown, timeout=30,
                      done=lambda: relay.http("GET", f"/api/messages/{B}/queue-size").json["queueSize"] == 0)
        assert "storage recovered" in relay.log()
        assert relay.proc.poll() is None
    finally:
        relay.stop()


def test_pool_size_bounds_the_connections_of_one_instance(tmp_path, pg_database, pg_server):
    relay = start_pg_relay(tmp_path, pg_database, RELAYD_POSTGRES_POOL_SIZE="3")
    name = pg_database.rsplit("/", 1)[1]
    try:
        senders = [relay.ws() for _ in range(8)]
        for i, s in enumerate(senders):
            s.__enter__()
            s.auth(f"0x{i:040x}")
        for i, s in enumerate(senders):
            s.send(msg(B, f"p{i}"))
        for s in senders:
            assert s.recv_type("queued")
        used = int(pg_server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}' "
                                  "AND application_name = 'relayd'"))
        assert 1 <= used <= 3
        for s in senders:
            s.__exit__(None, None, None)
    finally:
        relay.stop()



# relayd migrate to and from PostgreSQL


def test_migrate_sqlite_to_postgres_and_on_to_sqlite_and_redis_copies_everything_once(tmp_path, pg_database,
                                                                                     fresh_redis):
    from test_redis_relay import make_sqlite_relay_data, receive_messages
    db, sqlite_key = make_sqlite_relay_data(tmp_path / "sqlite")
    first = run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", pg_database)
    assert first.returncode == 0, first.stderr
    counts = json.loads(first.stdout)
    assert (counts["messages_copied"], counts["receipts_copied"], counts["keys_copied"], counts["locks"],
            counts["key_floors"]) == (3, 1, 1, 1, 1)
    again = json.loads(run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", pg_database).stdout)
    assert (again["messages_copied"], again["messages_already_copied"], again["receipts_copied"],
            again["keys_copied"]) == (0, 3, 0, 0)

    copy = tmp_path / "copy.db"  # PostgreSQL as the source, while nothing else changed
    back = run_cli(tmp_path, "migrate", "--from", pg_database, "--to", f"sqlite:{copy}")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["messages_copied"] == 3 and json.loads(back.stdout)["receipts_copied"] == 1
    to_redis = run_cli(tmp_path, "migrate", "--from", pg_database, "--to", fresh_redis.url)
    assert to_redis.returncode == 0 and json.loads(to_redis.stdout)["messages_copied"] == 3, to_redis.stderr

    relay = start_pg_relay(tmp_path / "pg", pg_database)
    try:
        assert relay.http("GET", f"/api/public-keys/{ADDR_A}").json == sqlite_key
        with relay.ws() as receiver:
            receiver.auth(B, ack=True)
            got = receive_messages(receiver, 3)
            assert [(m["from"], m["messageId"]) for m in got] == [(C, f"q{i}") for i in range(3)]
            receiver.recv_type("queue_empty")
            receiver.send({"type": "ack", "messageIds": ["q0", "q1", "q2"]})
            wait_until(lambda: relay.http("GET", f"/api/messages/{B}/queue-size").json["queueSize"] == 0, "acked")
        with relay.ws() as locked:  # the lock came along: an unsigned auth of the signed address is refused
            locked.send({"type": "auth", "address": ADDR_A})
            assert locked.recv_type("error")["code"] == "auth_required"
    finally:
        relay.stop()
    third = json.loads(run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", pg_database).stdout)
    assert third["messages_copied"] == 0 and third["receipts_copied"] == 0, "delivered ones are not copied again"


@pytest.mark.parametrize("source,needle", [("mysql:x", "--from must be sqlite:PATH"),
                                           ("sqlite:missing.db", "no database at")])
def test_migrate_into_postgres_usage_errors(tmp_path, pg_database, source, needle):
    result = run_cli(tmp_path, "migrate", "--from", source, "--to", pg_database)
    assert result.returncode in (1, 2) and needle in result.stderr, result.stderr


def test_one_relayd_per_database_until_its_holder_dies(tmp_path, pg_database):
    """Without ``[postgres] cluster = true``, a second relayd on the same database exits 2 naming the first; the lock
    dies with its holder, so after a kill -9 a new relayd starts at once."""
    first = start_pg_relay(tmp_path / "first", pg_database)
    try:
        second = run_cli(tmp_path, "run", env=clean_env(**pg_env(pg_database), RELAYD_SERVER_PORT="0"), timeout=30)
        assert second.returncode == 2, second.stderr
        assert f"in use by relayd PID {first.proc.pid}" in second.stderr and "without [postgres] cluster = true" in \
            second.stderr
        migrate = run_cli(tmp_path, "migrate", "--from", f"sqlite:{tmp_path / 'none.db'}", "--to", pg_database)
        assert migrate.returncode == 1
        first.kill9()
        replacement = start_pg_relay(tmp_path / "replacement", pg_database)
        try:
            assert replacement.http("GET", "/health/ready").status == 200
        finally:
            replacement.stop()
    finally:
        first.stop()


def test_a_senders_pipelined_messages_to_one_recipient_are_stored_in_order(tmp_path, pg_database):
    """Each loop iteration's messages are one batch, stored by its own task: on the pool a later batch must not
    commit its seqs before an earlier one (per address, writes keep the order they were submitted in)."""
    relay = start_pg_relay(tmp_path, pg_database, RELAYD_LIMITS_FRAMES_PER_S="0")
    try:
        with relay.ws() as sender:
            sender.auth(A)
            sent = [f"m{i}" for i in range(300)]
            for i, mid in enumerate(sent):
                sender.send(msg(B, mid, f"c{i}"))
            assert {sender.recv()["type"] for _ in sent} == {"queued"}
        with relay.ws() as receiver:
            receiver.auth(B)
            assert [receiver.recv_type("message")["messageId"] for _ in sent] == sent
    finally:
        relay.stop()


def test_totals_read_while_a_write_is_in_flight_are_not_taken():
    """A write counted after its commit must not be counted twice by a read of the totals that saw the commit."""
    from relayd.storage.postgres.totals import Totals
    totals = Totals()
    totals.begin()
    assert totals.mark() is None  # a write is in flight: a read now would race it
    totals.end(1, 100)
    mark = totals.mark()
    totals.begin()  # another write starts while the read runs (and may be in what it reads)
    assert not totals.refresh(mark, 2, 200)
    totals.end(1, 100)
    assert (totals.messages, totals.bytes) == (2, 200)
    mark = totals.mark()
    assert totals.refresh(mark, 5, 500) and (totals.messages, totals.bytes) == (5, 500)


# Several instances on one database (relayd.cluster on PostgresBackplane; the cross-instance tests are in
# test_cluster.py, parametrized over Redis and PostgreSQL)

def test_cluster_notices_longer_than_a_notify_payload_go_in_chunks_joined_per_sender():
    import itertools
    from relayd.cluster.postgres_backplane import Joiner, chunks
    counter = itertools.count(1)
    long, short = "a" * 20_000, "b"
    parts, single = chunks(long, counter), chunks(short, counter)
    assert len(parts) == 3 and all(len(p.encode()) < 8000 for p in parts)
    assert len(set(parts + single + chunks(short, counter))) == 5, "a repeated notice must not be dropped"
    got: list[str] = []
    joiner = Joiner(got.append)
    joiner.heard(1, parts[0])
    joiner.heard(2, single[0])  # another sender's notice between the chunks
    joiner.heard(1, parts[1])
    joiner.heard(1, parts[2])
    assert got == [short, long]
    joiner.heard(3, parts[1])  # a sender's middle chunk without its first (it was lost): ignored
    joiner.heard(3, parts[2])
    assert got == [short, long]


def test_a_sealed_backplane_keeps_only_blind_keys_and_sealed_values_and_reads_addresses_back(pg_database, tmp_path):
    """With encryption at rest: presence, watches and notices as the cluster uses them, on a real database, whose
    presence table holds no address; the online list and forgetting a dead instance give the addresses back; an
    entry written by the version before (a 4-argument ``relayd_join``, no label) still reads; a notice sealed
    with another key is dropped."""
    pytest.importorskip("cryptography", reason="encryption at rest needs pip install 'relayd[encryption]'")
    from relayd.cluster.postgres_backplane import PostgresBackplane
    from relayd.storage.sealed import SealedStore
    from relayd.storage.sealing import Sealer, load_keys

    class Inbox:
        def __init__(self) -> None:
            self.got: list[str] = []
            self.ready = asyncio.Event()

        def received(self, data: str) -> None:
            self.got.append(data)

        def confirmed(self) -> None:
            self.ready.set()

    async def body() -> None:
        store = SealedStore(PostgresStore(pg_database, pool_size=4), load_keys([storage_key(tmp_path)]))
        await store.open()
        try:
            plane = PostgresBackplane(store.inner, sealed=store, queue_key=store.queue, seals=store.sealer)

            async def dump() -> str:  # blind keys, sealed labels, instance ids
                rows = await store.inner.link.run(lambda c: c.fetch(
                    "SELECT p.*, w.instance AS watcher FROM cluster_presence p "
                    "JOIN cluster_watchers w USING (address)"), write=False)
                assert len(rows) == 3
                return repr([dict(r) for r in rows])

            alice, _, carol = await present_and_forgotten(plane, dump)

            plain = PostgresBackplane(store.inner)  # an instance of the version before writes clear entries
            await plain._run("SELECT * FROM relayd_join($1, $2, $3, $4)", carol, "i3", "p", 60_000)
            assert await plain.addresses_of(["i3"]) == [carol]
            assert [chunk async for chunk in plain.forget("i3", 10)] == [([carol], ["i3"])]

            inbox = Inbox()
            listening = asyncio.ensure_future(plane.listen("i1", inbox))
            await asyncio.wait_for(inbox.ready.wait(), scaled(10))
            foreign = PostgresBackplane(store.inner, seals=Sealer(load_keys([storage_key(tmp_path, "other.key")])))
            assert await foreign.publish("i1", '{"k": "ping", "a": "' + carol + '"}') == 1  # heard, not opened
            assert await plane.publish("i1", '{"k": "inv", "a": "' + alice + '"}') == 1
            await asyncio.wait_for(_until(lambda: inbox.got), scaled(10))
            assert inbox.got == ['{"k": "inv", "a": "' + alice + '"}']
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            await plane.close()
            await foreign.close()
        finally:
            await store.close()
    run(body())


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_the_cluster_lifts_the_one_instance_lock(pg_database, process_relays, tmp_path):
    """With ``[postgres] cluster = true``, several instances serve from one database and see each other."""
    token = {"Authorization": "Bearer s3cret-token-for-status"}
    relays = [process_relays(tmp_path / f"node{i}", env=pg_env(
        pg_database, RELAYD_POSTGRES_CLUSTER="true", RELAYD_CLUSTER_NODE_ID=f"node{i}",
        RELAYD_ACCESS_STATUS_TOKEN=token["Authorization"].split()[1])) for i in range(2)]
    for relay in relays:
        assert relay.http("GET", "/health/ready").status == 200
        wait_until(lambda relay=relay: len(relay.http("GET", "/health/instances", headers=token).json["instances"])
                   == 2, "both instances registered")

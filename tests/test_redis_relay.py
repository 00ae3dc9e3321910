"""relayd processes on ``[storage] backend = redis``: restarts, Redis outages, migration, the missing extra."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import (A, ADDR_A, B, C, KEY_A, ROOT, ProcessRelay, clean_env, free_port, key_body, msg, pong_next, run_cli,
                     wait_until, without_modules)
from test_auth import PUB_KEY


def redis_env(url: str, **extra: str) -> dict[str, str]:
    return {"RELAYD_STORAGE_BACKEND": "redis", "RELAYD_REDIS_URL": url, **extra}


def start_redis_relay(tmp: Path, url: str, **extra: str) -> ProcessRelay:
    tmp.mkdir(parents=True, exist_ok=True)
    return ProcessRelay(tmp, env=redis_env(url, **extra))


def send_expect(client: Any, frame: dict[str, Any], answer: str) -> dict[str, Any]:
    client.send(frame)
    reply = client.recv_type(answer) if answer != "error" else client.recv()
    assert reply["type"] == answer, reply
    return reply


def receive_messages(client: Any, count: int) -> list[dict[str, Any]]:
    return [client.recv_type("message") for _ in range(count)]


def test_queued_message_survives_a_relayd_restart(tmp_path, fresh_redis):
    relay = start_redis_relay(tmp_path / "one", fresh_redis.url)
    try:
        with relay.ws() as sender:
            sender.auth(A)
            send_expect(sender, msg(B, "m1", "Y2lwaGVy"), "queued")
        assert relay.http("GET", "/health").json["storage"] == {"backend": "redis", "status": "ok"}
    finally:
        assert relay.stop() == 0
    relay = start_redis_relay(tmp_path / "two", fresh_redis.url)
    try:
        with relay.ws() as receiver:
            receiver.auth(B)
            got = receiver.recv_type("message")
            assert (got["from"], got["messageId"], got["content"], got["queued"]) == (A, "m1", "Y2lwaGVy", True)
    finally:
        relay.stop()


def test_redis_outage_readiness_and_recovery_without_restarting_relayd(tmp_path, durable_redis):
    relay = start_redis_relay(tmp_path, durable_redis.url)
    try:
        with relay.ws() as sender:
            sender.auth(A)
            send_expect(sender, msg(B, "kept", "a2VwdA=="), "queued")
            assert relay.http("GET", "/health/ready").status == 200
            durable_redis.stop()
            # The cluster inbox may notice first (not ready, storage still ok): wait for the storage probe too.
            wait_until(lambda: relay.http("GET", "/health/ready").status == 503
                       and relay.http("GET", "/health").status == 503, "not ready, storage unavailable", timeout=10)
            health = relay.http("GET", "/health")
            assert health.status == 503 and "unreachable" in health.json["storage"]["problem"]
            refused = send_expect(sender, msg(B, "lost", "bG9zdA=="), "error")
            assert refused["code"] == "storage_unavailable" and refused["messageId"] == "lost"
            durable_redis.start()
            wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready", timeout=10)
            send_expect(sender, msg(B, "after", "YWZ0ZXI="), "queued")
        assert relay.proc.poll() is None
        with relay.ws() as receiver:
            receiver.auth(B)
            assert [m["messageId"] for m in receive_messages(receiver, 2)] == ["kept", "after"]
            pong_next(receiver)
        assert "storage recovered" in relay.log()
    finally:
        relay.stop()


def test_relayd_on_a_redis_cluster(tmp_path, redis_cluster, redis_prefix):
    relay = start_redis_relay(tmp_path, redis_cluster.url, RELAYD_REDIS_CLUSTER="true",
                              RELAYD_REDIS_KEY_PREFIX=redis_prefix)
    try:
        with relay.ws() as sender:
            sender.auth(A)
            for i in range(5):
                send_expect(sender, msg(B if i % 2 else C, f"m{i}"), "queued")
        assert relay.http("GET", "/health/ready").status == 200
        with relay.ws() as receiver:
            receiver.auth(B)
            assert [m["messageId"] for m in receive_messages(receiver, 2)] == ["m1", "m3"]
        wait_until(lambda: relay.http("GET", "/api/messages/stats/all").json["totalMessages"] == 3, "3 stored")
    finally:
        relay.stop()


def test_relayd_starts_while_redis_is_down_and_becomes_ready(tmp_path, fresh_redis):
    fresh_redis.stop()
    relay = start_redis_relay(tmp_path, fresh_redis.url)
    try:
        assert relay.http("GET", "/health/ready").status == 503
        fresh_redis.start()
        wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready", timeout=10)
    finally:
        relay.stop()


def make_sqlite_relay_data(tmp: Path) -> tuple[Path, dict[str, Any]]:
    """Run a real relayd on SQLite: queue messages for B, a receipt for A, a signed key (and so a lock)."""
    tmp.mkdir()
    relay = ProcessRelay(tmp, env={"RELAYD_STORAGE_PATH": str(tmp / "relayd.db")})
    try:
        with relay.ws() as sender:
            sender.auth(A)
            for i in range(5):
                send_expect(sender, msg(B, f"m{i}", f"Y29udGVudA{i}", timestamp=1_700_000_000_000 + i),
                            "queued")
        with relay.ws() as reader:
            reader.auth(B)
            receive_messages(reader, 5)
            reader.send({"type": "read_receipt", "to": A, "messageId": "m0"})
            # the messages were flushed and deleted; queue new ones for B while it is offline
        wait_until(lambda: relay.http("GET", f"/api/messages/{B}/queue-size").json["queueSize"] == 0, "B's queue empty")
        with relay.ws() as sender:  # not A, which would receive the stored receipt
            sender.auth(C)
            for i in range(3):
                send_expect(sender, msg(B, f"q{i}", f"cXVldWVk{i}", timestamp=1_700_000_001_000 + i), "queued")
        issued = int(time.time())
        reply = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, issued))
        assert reply.status == 200, reply
        assert reply.json["createdAt"] == relay.http("GET", f"/api/public-keys/{ADDR_A}").json["createdAt"]
        wait_until(lambda: relay.http("GET", "/api/messages/stats/all").json["totalMessages"] == 3, "3 stored")
        key = relay.http("GET", f"/api/public-keys/{ADDR_A}").json
    finally:
        assert relay.stop() == 0
    return tmp / "relayd.db", key


def test_migrate_from_a_sqlite_relay_then_serve_from_redis(tmp_path, fresh_redis):
    db, sqlite_key = make_sqlite_relay_data(tmp_path / "sqlite")
    result = run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", fresh_redis.url)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["messages_copied"] == 3 and counts["receipts_copied"] == 1
    assert counts["keys_copied"] == 1 and counts["locks"] == 1
    again = run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", fresh_redis.url)
    assert again.returncode == 0, again.stderr
    counts = json.loads(again.stdout)
    assert counts["messages_copied"] == 0 and counts["messages_already_copied"] == 3
    assert counts["receipts_copied"] == 0 and counts["keys_copied"] == 0

    relay = start_redis_relay(tmp_path / "redis", fresh_redis.url)
    try:
        key = relay.http("GET", f"/api/public-keys/{ADDR_A}").json
        assert key == sqlite_key and key["publicKey"] == PUB_KEY and key["verified"] is True
        with relay.ws() as receiver:
            receiver.auth(B, ack=True)
            got = receive_messages(receiver, 3)
            assert [(m["from"], m["messageId"], m["content"], m["timestamp"]) for m in got] == [
                (C, f"q{i}", f"cXVldWVk{i}", 1_700_000_001_000 + i) for i in range(3)]
            receiver.recv_type("queue_empty")
            receiver.send({"type": "ack", "messageIds": ["q0", "q1", "q2"]})
            wait_until(lambda: relay.http("GET", f"/api/messages/{B}/queue-size").json["queueSize"] == 0, "B's queue empty")
        with relay.ws() as locked:  # the signed key locked its address: an unsigned auth is refused
            locked.send({"type": "auth", "address": ADDR_A})
            assert locked.recv_type("error")["code"] == "auth_required"
    finally:
        relay.stop()

    third = run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", fresh_redis.url)
    assert third.returncode == 0 and json.loads(third.stdout)["messages_copied"] == 0
    receipts = fresh_redis.cli("HVALS", f"relayd:{{{A}}}:rm").splitlines()
    assert len(receipts) == 1 and json.loads(receipts[0])[:2] == [B, "m0"]  # stored once, for A
    relay = start_redis_relay(tmp_path / "redis-again", fresh_redis.url)
    try:
        assert relay.http("GET", f"/api/messages/{B}/queue-size").json["queueSize"] == 0
        assert relay.http("GET", "/api/public-keys/stats/all").json["totalKeys"] == 1
    finally:
        relay.stop()


@pytest.mark.parametrize("args,code,needle", [
    (("migrate",), 2, "the following arguments are required: --from, --to"),
    (("migrate", "--from", "mysql:x", "--to", "redis://127.0.0.1:1/0"), 2, "--from must be sqlite:PATH"),
    (("migrate", "--from", "sqlite:x.db", "--to", "http://127.0.0.1:1/0"), 2, "[redis] url"),
    (("migrate", "--from", "sqlite:missing.db", "--to", "redis://127.0.0.1:1/0"), 1, "no database at"),
])
def test_migrate_usage_errors(tmp_path, args, code, needle):
    result = run_cli(tmp_path, *args)
    assert result.returncode == code, result.stderr
    assert needle in result.stderr


def test_migrate_to_an_unreachable_redis_fails_with_exit_1(tmp_path):
    db, _ = make_sqlite_relay_data(tmp_path / "sqlite")
    result = run_cli(tmp_path, "migrate", "--from", f"sqlite:{db}", "--to", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1
    assert "Redis is unreachable" in result.stderr


@pytest.mark.parametrize("env,needle", [
    ({"RELAYD_REDIS_URL": "http://localhost:6379"}, "[redis] url must start with redis:// or rediss://"),
    ({"RELAYD_REDIS_URL": "redis://:pw@localhost:6379/abc"}, "[redis] url: the database must be a number"),
    ({"RELAYD_REDIS_KEY_PREFIX": "a{b}"}, "[redis] key_prefix"),
    ({"RELAYD_REDIS_MIN_REPLICAS": "-1"}, "[redis] min_replicas"),
    ({"RELAYD_REDIS_SOCKET_TIMEOUT_S": "0"}, "[redis] socket_timeout_s"),
    ({"RELAYD_CLUSTER_PRESENCE_TTL_S": "2", "RELAYD_CLUSTER_HEARTBEAT_S": "5"}, "[cluster] presence_ttl_s"),
    ({"RELAYD_STORAGE_BACKEND": "mongo"}, "[storage] backend"),
])
def test_bad_redis_settings_exit_2_naming_the_key(tmp_path, env, needle):
    result = run_cli(tmp_path, "--check-config", env=clean_env(**env))
    assert result.returncode == 2
    assert needle in result.stderr
    assert "pw" not in result.stderr


def test_without_the_redis_extra_relayd_says_so_and_still_runs_on_sqlite(tmp_path, fresh_redis):
    env = without_modules(tmp_path, "redis")
    probe = subprocess.run([sys.executable, "-c", "import redis"], env=env, capture_output=True, text=True,
                           timeout=30)
    assert probe.returncode != 0 and "No module named 'redis'" in probe.stderr
    refused = run_cli(tmp_path, env=clean_env(**{**env, **redis_env(fresh_redis.url), "RELAYD_SERVER_PORT": "0"}))
    assert refused.returncode == 2
    # relayd is on no package index: the hint installs the extra from this checkout into this interpreter.
    hint = f"the Redis backend needs the optional extra redis: {sys.executable} -m pip install '{ROOT}[redis]'"
    assert hint in refused.stderr
    migrate = run_cli(tmp_path, "migrate", "--from", "sqlite:x.db", "--to", fresh_redis.url, env=clean_env(**env))
    assert migrate.returncode == 2 and f"pip install '{ROOT}[redis]'" in migrate.stderr
    relay = ProcessRelay(tmp_path, env={**env, "RELAYD_STORAGE_PATH": str(tmp_path / "relayd.db")})
    try:
        assert relay.http("GET", "/health").json["storage"]["backend"] == "sqlite"
        with relay.ws() as sender:
            sender.auth(A)
            send_expect(sender, msg(B, "m1"), "queued")
    finally:
        assert relay.stop() == 0
    log = relay.log()
    assert "storage: sqlite " in log and "redis://" not in log and "Redis" not in log, log

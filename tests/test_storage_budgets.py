"""The storage rows of issue 20, each an attack on a real relay (a SQLite file, or a redis-server) and the bound
that now holds: keys and stored receipts count in ``[storage] max_bytes`` and in hourly budgets per IP and sender;
the one filling the budget is refused first; a key planted before its address's first signed sign-in stops being
served; the automatic budget does not move over restarts; on Redis a budget applies by default."""

from __future__ import annotations

import time
from typing import Any

from relayd.storage.backends import REDIS_DEFAULT_BUDGET, automatic_budget, make_store
from relayd.storage.memory import MemoryStore
from relayd.storage.store import RECEIPT_BYTES, key_bytes
from support import (ADDR_A, KEY_A, ThreadRelay, WsClient, addr, assert_error, base64_key, challenge_of,
                     client_socket, key_body, make_config, queue_size, signed_auth_frame, wait_until)

BIG_KEY = "k" * 4096  # the longest publicKey accepted
BIG_KEY_BYTES = key_bytes(BIG_KEY, None)
BIG = "x" * (256 << 10)


def ws_from(relay: ThreadRelay, source: str) -> WsClient:
    sock = client_socket(source)
    sock.connect(("127.0.0.1", relay.port))
    return WsClient(relay.url, sock=sock)


def put_key(relay: ThreadRelay, address: str, public_key: str, source: str = "127.0.0.1") -> Any:
    return relay.http("POST", "/api/public-keys", {"address": address, "publicKey": public_key}, source=source)


def stored(relay: ThreadRelay) -> int:
    return relay.server.store.stored_bytes()


# Keys

def test_keys_count_in_the_storage_budget(start_on) -> None:
    """Was: key uploads (25.5 MiB/min per IP, never expiring) were outside [storage] max_bytes."""
    budget = 64 << 10
    relay = start_on(storage={"max_bytes": budget}, auth={"mode": "open"}, limits={"key_bytes_per_ip_per_hour": 0})
    fits = budget // BIG_KEY_BYTES
    statuses = [put_key(relay, addr(n), BIG_KEY).status for n in range(fits + 3)]
    assert statuses == [200] * fits + [503] * 3
    assert stored(relay) == fits * BIG_KEY_BYTES
    refused = put_key(relay, addr(999), BIG_KEY)
    assert refused.json["code"] == "storage_unavailable" and "budget" in refused.json["error"]
    assert relay.http("GET", f"/api/public-keys/{addr(999)}").status == 404
    # An owner refreshing its key still can when the store is full (a key no larger than the one it replaces).
    assert put_key(relay, addr(0), base64_key()).status == 200
    assert stored(relay) == (fits - 1) * BIG_KEY_BYTES + key_bytes(base64_key(), None)
    # Keys and offline messages share the one budget: what the keys left is all a message may take.
    with relay.ws() as sender, ws_from(relay, "127.0.0.2") as other:
        sender.auth(addr(500))
        sender.send({"type": "message", "to": addr(501), "content": "x" * (budget - stored(relay) + 1),
                     "messageId": "too-big"})
        assert_error(sender.recv(), "storage_unavailable", "too-big")
        other.auth(addr(502))
        other.send({"type": "message", "to": addr(501), "content": "small", "messageId": "small"})
        assert other.recv_type("queued")["messageId"] == "small"
    assert stored(relay) <= budget


def test_key_uploads_are_bounded_in_bytes_per_ip_and_hour(start_on) -> None:
    relay = start_on(auth={"mode": "open"}, limits={"key_bytes_per_ip_per_hour": 5 * BIG_KEY_BYTES - 1})
    statuses = [put_key(relay, addr(n), BIG_KEY, source="127.0.0.2").status for n in range(7)]
    assert statuses == [200] * 5 + [429] * 2  # the upload that crosses the budget still passes, as REST budgets do
    refused = put_key(relay, addr(7), BIG_KEY, source="127.0.0.2")
    assert refused.json["code"] == "rate_limited" and "keys" in refused.json["error"]
    assert int(refused.headers["retry-after"]) > 60
    assert put_key(relay, addr(8), BIG_KEY, source="127.0.0.3").status == 200  # another IP
    assert 'relayd_rate_limit_hits_total{limit="key_bytes"} 3' in relay.http("GET", "/metrics").body.decode()


def test_a_key_planted_before_the_first_signed_sign_in_stops_being_served(start_on) -> None:
    """Was: a key anyone uploaded for an address before its owner's first signed sign-in was still served after
    the address was locked, while the owner's unsigned app upload got 401."""
    relay = start_on()  # the default mode: mixed
    planted = base64_key()
    assert put_key(relay, ADDR_A, planted).status == 200
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").json["publicKey"] == planted
    with relay.ws() as owner:
        owner.send(signed_auth_frame(KEY_A, challenge_of(owner)))
        assert owner.recv_type("auth_success")["verified"] is True
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").status == 404
    assert put_key(relay, ADDR_A, base64_key()).status == 401  # locked: unsigned writes stay refused
    own = base64_key()
    assert relay.http("POST", "/api/public-keys", key_body(KEY_A, own, int(time.time()))).status == 200
    served = relay.http("GET", f"/api/public-keys/{ADDR_A}").json
    assert served["publicKey"] == own and served["verified"] is True
    # A later signed sign-in leaves the signed key alone.
    with relay.ws() as owner:
        owner.send(signed_auth_frame(KEY_A, challenge_of(owner)))
        assert owner.recv_type("auth_success")["verified"] is True
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").json["publicKey"] == own


def test_unsigned_keys_nobody_uploads_or_looks_up_expire(start_on, manual_clock) -> None:
    """Was: keys never expired, so one IP's uploads of random addresses' keys stayed for ever."""
    relay = start_on(clock=manual_clock, auth={"mode": "open"}, storage={"unsigned_key_ttl_days": 1},
                     queue={"expiry_interval_s": 0.05})
    for n in (1, 2):
        assert put_key(relay, addr(n), base64_key()).status == 200
    signed = relay.http("POST", "/api/public-keys", key_body(KEY_A, base64_key(), int(manual_clock.wall())))
    assert signed.status == 200
    manual_clock.advance(0.6 * 86400)
    assert relay.http("GET", f"/api/public-keys/{addr(2)}").status == 200  # someone still looks this one up
    manual_clock.advance(0.6 * 86400)  # (a lookup of addr(1) now would keep it: the count is watched instead)
    wait_until(lambda: relay.http("GET", "/api/public-keys/stats/all").json["totalKeys"] == 2, "the unused key expired")
    assert stored(relay) == key_bytes(base64_key(), None) + key_bytes(base64_key(), "0x" + "00" * 65)  # 65-byte signature
    assert relay.http("GET", f"/api/public-keys/{addr(1)}").status == 404
    assert relay.http("GET", f"/api/public-keys/{addr(2)}").status == 200
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").json["verified"] is True  # signed keys stay


# Read receipts

def test_stored_receipts_count_in_the_budgets_of_their_reader(start_on) -> None:
    """Was: read receipts to random offline addresses (66 MiB/min from 20 connections) were outside every
    budget."""
    relay = start_on(auth={"mode": "open"}, limits={"frames_per_s": 0,
                                                     "offline_bytes_per_sender_per_hour": 10 * RECEIPT_BYTES})
    with relay.ws() as reader, relay.ws() as other:
        reader.auth(addr(1))
        other.auth(addr(2))
        for n in range(12):
            reader.send({"type": "read_receipt", "to": addr(1000 + n), "messageId": f"m{n}"})
        for n in (10, 11):
            refused = reader.recv()
            assert_error(refused, "rate_limited", f"m{n}")
            assert "bytes" in refused["message"]
        wait_until(lambda: stored(relay) == 10 * RECEIPT_BYTES, "ten receipts stored and counted")
        other.send({"type": "read_receipt", "to": addr(2000), "messageId": "o1"})  # another reader's budget
        wait_until(lambda: stored(relay) == 11 * RECEIPT_BYTES, "the other reader's receipt stored")


def test_receipts_are_refused_once_the_storage_budget_is_used_up(start_on) -> None:
    budget = 15 * BIG_KEY_BYTES + RECEIPT_BYTES - 1
    relay = start_on(storage={"max_bytes": budget}, auth={"mode": "open"}, limits={"key_bytes_per_ip_per_hour": 0})
    for n in range(15):
        assert put_key(relay, addr(n), BIG_KEY).status == 200
    with relay.ws() as reader:
        reader.auth(addr(100))
        reader.send({"type": "read_receipt", "to": addr(3000), "messageId": "r1"})
        refused = reader.recv()
        assert_error(refused, "storage_unavailable", "r1")
        assert "budget" in refused["message"]
    assert stored(relay) == 15 * BIG_KEY_BYTES


# The storage budget is shared: whoever fills it is refused first

def test_the_sender_filling_the_storage_budget_is_refused_before_everyone_else(start_on) -> None:
    """Was: one sender filled a 300 MiB budget in 14.7 s, then every user's offline message got
    storage_unavailable for up to the retention period."""
    budget = 16 << 20
    relay = start_on(storage={"max_bytes": budget}, auth={"mode": "open"}, limits={"frames_per_s": 0})
    answers = []
    with ws_from(relay, "127.0.0.2") as attacker:
        attacker.auth(addr(700))
        for n in range(budget // len(BIG) + 4):
            attacker.send({"type": "message", "to": addr(10_000 + n), "content": BIG, "messageId": f"a{n}"})
            answers.append(attacker.recv(timeout=10))
    kinds = [a["type"] if a["type"] != "error" else a["code"] for a in answers]
    filled = kinds.index("rate_limited")
    assert kinds == ["queued"] * filled + ["rate_limited"] * (len(kinds) - filled), kinds
    assert filled * len(BIG) >= budget * 3 // 4  # it got three quarters of the budget, then its share ran out
    assert stored(relay) <= budget
    with ws_from(relay, "127.0.0.3") as user:  # someone else, now: still queued
        user.auth(addr(800))
        for n, size in enumerate((200 << 10, 100, 5000)):
            user.send({"type": "message", "to": addr(20_000 + n), "content": "u" * size, "messageId": f"u{n}"})
            assert user.recv_type("queued", timeout=10)["messageId"] == f"u{n}"
    assert queue_size(relay, addr(20_000)) == 1
    assert stored(relay) <= budget


# The automatic budget

class Disk:
    """A 32 GB card (the issue's Raspberry Pi) that relayd and 2 GB of other files share."""

    def __init__(self) -> None:
        self.total = 32_000_000_000
        self.others = 2_000_000_000
        self.relayd = 0

    @property
    def free(self) -> int:
        return self.total - self.others - self.relayd


def test_the_automatic_budget_does_not_ratchet_over_restarts() -> None:
    """Was: half the free space at each start-up, so the disk was 50, 75, 88, 94, 97 % used after one restart
    each. Simulated on a card of 32 GB that cannot be had here; the rule is the one relayd runs."""
    config = make_config(storage={"backend": "sqlite", "path": "/nonexistent/relayd.db"})
    disk, store = Disk(), MemoryStore()
    used = []
    for _restart in range(6):
        budget = automatic_budget(config, store, disk=lambda _: disk)
        disk.relayd = budget.bytes  # relayd fills its budget before the next restart
        store.stored_bytes = lambda: disk.relayd  # type: ignore[method-assign]
        used.append(round(100 * (disk.relayd + disk.others) / disk.total))
    assert used == [56] * 6  # 16 GB for relayd and the 2 GB of others, restart after restart
    assert "1/2 of its file system (29.8 GiB)" in budget.how
    disk.others = 15_000_000_000  # other programs filled the card: the budget shrinks to leave 1/20 of it free
    shrunk = automatic_budget(config, store, disk=lambda _: disk)
    assert shrunk.bytes == 16_000_000_000 + 1_000_000_000 - 1_600_000_000
    assert "less 1/20 of it kept free" in shrunk.how


def test_a_restarted_sqlite_relay_keeps_its_automatic_budget(start_relay, tmp_path) -> None:
    sections = {"storage": {"backend": "sqlite", "path": str(tmp_path / "relayd.db")}, "auth": {"mode": "open"}}
    budgets = []
    for round_ in range(2):
        relay = start_relay(store=make_store(make_config(**sections)), **sections)
        budgets.append(relay.server.delivery.limits.max_total_bytes)
        with relay.ws() as sender:
            sender.auth(addr(1))
            for n in range(8):
                sender.send({"type": "message", "to": addr(2), "content": BIG, "messageId": f"r{round_}-{n}"})
                assert sender.recv_type("queued", timeout=10)
        relay.stop()
    assert budgets[0] > 0
    # Other sessions write to this disk too; relayd's own 2 MiB no longer take half of themselves off the budget.
    assert abs(budgets[1] - budgets[0]) < budgets[0] // 100


def test_redis_gets_a_budget_by_default(start_relay, fresh_redis, caplog) -> None:
    """Was: nothing bounded Redis (+1.1 GB in 14.4 s from one IP) and nothing said so at start-up."""
    import redis
    sections: dict[str, Any] = {"storage": {"backend": "redis"}, "redis": {"url": fresh_redis.url}}
    relay = start_relay(store=make_store(make_config(**sections)), **sections)
    assert relay.server.delivery.limits.max_total_bytes == REDIS_DEFAULT_BUDGET
    assert relay.server.budget_how == "the default for Redis: Redis has no maxmemory"
    relay.stop()
    client = redis.Redis.from_url(fresh_redis.url)
    client.config_set("maxmemory", str(100 << 20))
    client.close()
    relay = start_relay(store=make_store(make_config(**sections)), **sections)
    assert relay.server.delivery.limits.max_total_bytes == 50 << 20
    assert relay.server.budget_how == "1/2 of Redis maxmemory 0.1 GiB"


def test_an_explicit_budget_wins(start_relay, fresh_redis) -> None:
    sections: dict[str, Any] = {"storage": {"backend": "redis", "max_bytes": 0}, "redis": {"url": fresh_redis.url}}
    relay = start_relay(store=make_store(make_config(**sections)), **sections)
    assert relay.server.delivery.limits.max_total_bytes == 0

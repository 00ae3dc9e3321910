"""Several relayd processes on one Redis act as one relay, whichever instance each client is on.

Every test starts real ``python relayd.py`` processes (``relay_cluster``) on a real redis-server (or a local
three-master Redis Cluster) and talks to them over real sockets on 127.0.0.1. Those taking ``backplane`` run on
Redis and on PostgreSQL (``[postgres] cluster = true``); those marked ``sealed_backplane`` also on both with
encryption at rest (presence by blind index with sealed addresses; on PostgreSQL, notices sealed).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from support import (A, ADDR_A, B, C, D, KEY_A, assert_closed_with, assert_error, bearer, challenge_of, connect,
                     key_body, message_frame, msg, new_address, new_mid, online, pong_next, queue_size, read_backlog,
                     scaled, signed_auth_frame, status_frame, wait_until)
from test_auth import PUB_KEY

OPEN = {"RELAYD_AUTH_MODE": "open"}


def send_answered(ws: Any, to: str, mid: str, answer: str, content: str = "Y2lwaGVy") -> None:
    """Send a message and read its answer, which must be ``answer`` (delivered/queued)."""
    ws.send(msg(to, mid, content))
    status_frame(ws.recv(), answer, mid, to)


def received(ws: Any, mid: str, sender: str, content: str = "Y2lwaGVy", queued: bool = False) -> None:
    frame = ws.recv()
    assert {k: v for k, v in frame.items() if k != "timestamp"} == {
        k: v for k, v in message_frame(sender, content, mid, 0, queued).items() if k != "timestamp"}, frame


# Live traffic


@pytest.mark.sealed_backplane
def test_a_message_crosses_instances_live_and_the_sender_gets_delivered(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2)
    with connect(x, A) as a, connect(y, B) as b:
        for i in range(3):  # the first is routed by the store's presence, the later ones by the cache
            send_answered(a, B, f"ab{i}", "delivered")
            received(b, f"ab{i}", A)
        send_answered(b, A, "ba", "delivered")
        received(a, "ba", B)
        pong_next(a)
        pong_next(b)
    assert queue_size(x, B) == 0 and queue_size(y, A) == 0


@pytest.mark.sealed_backplane
def test_a_message_larger_than_a_notice_crosses_instances_live_and_stored(relay_cluster, backplane):
    """PostgreSQL's NOTIFY carries at most 8000 bytes: a longer offer travels in chunks, in order."""
    x, y = relay_cluster(backplane, 2)
    big = [("Q" + "x" * 100_000, "big1"), ("Y" * 24_000 + "=", "big2")]
    with connect(x, A) as a, connect(y, B) as b:
        for content, mid in big:
            send_answered(a, B, mid, "delivered", content)
            received(b, mid, A, content)
    offline = new_address()
    with connect(y, A) as a:
        send_answered(a, offline, "big3", "queued", big[0][0])
    with connect(x, offline, ack=True) as reader:
        assert [f["content"] for f in read_backlog(reader)] == [big[0][0]]


@pytest.mark.sealed_backplane
def test_typing_and_read_receipts_cross_instances(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2)
    with connect(x, A) as a, connect(y, B) as b:
        send_answered(a, B, "m1", "delivered")
        received(b, "m1", A)
        b.send({"type": "typing", "to": A, "isTyping": True})
        assert a.recv() == {"type": "typing", "from": B, "isTyping": True}
        b.send({"type": "read_receipt", "to": A, "messageId": "m1"})
        read = a.recv()
        assert {k: read[k] for k in ("type", "from", "messageId")} == {"type": "read", "from": B, "messageId": "m1"}
        pong_next(a)


@pytest.mark.sealed_backplane
def test_every_device_on_every_instance_gets_every_live_frame(relay_cluster, backplane):
    x, y, z = relay_cluster(backplane, 3)
    with connect(x, A) as a, connect(x, B) as b1, connect(y, B) as b2, connect(z, B) as b3, connect(z, C) as c:
        devices = (b1, b2, b3)
        send_answered(a, B, "m1", "delivered")
        for device in devices:
            received(device, "m1", A)
        a.send({"type": "typing", "to": B, "isTyping": False})
        for device in devices:
            assert device.recv() == {"type": "typing", "from": A, "isTyping": False}
        c.send({"type": "read_receipt", "to": B, "messageId": "m0"})
        for device in devices:
            assert device.recv()["type"] == "read"
        for device in devices:
            pong_next(device)
        b2.close()  # a device leaving: the others still get everything
        send_answered(c, B, "m2", "delivered")
        for device in (b1, b3):
            received(device, "m2", C)


@pytest.mark.sealed_backplane
def test_presence_status_batch_and_online_list_are_the_same_on_every_instance(relay_cluster, backplane):
    relays = relay_cluster(backplane, 3, RELAYD_PRIVACY_EXPOSE_ONLINE_LIST="true")
    b, c = new_address(), new_address()
    with connect(relays[1], b), connect(relays[2], c):
        for relay in relays:
            assert online(relay, b) and online(relay, c) and not online(relay, D)
            batch = relay.http("POST", "/api/status/batch", {"addresses": [b, c, D]})
            assert batch.status == 200 and batch.json["statuses"] == {b: True, c: True, D: False}
            listed = relay.http("GET", "/api/status/online/all").json
            assert set(listed["users"]) == {b, c} and listed["count"] == 2


def test_an_address_stays_online_until_its_last_session_on_any_instance_closes(relay_cluster, backplane):
    relays = relay_cluster(backplane, 3)
    b = new_address()
    first, second = connect(relays[0], b), connect(relays[1], b)
    second.close()
    for relay in relays:
        assert online(relay, b)
    first.close()
    for relay in relays:
        wait_until(lambda relay=relay: not online(relay, b), "the address offline everywhere")


@pytest.mark.sealed_backplane
def test_one_senders_messages_keep_their_order_across_instances(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2, **OPEN)
    count = 150
    with connect(x, A) as a:
        with connect(y, B) as b:
            for i in range(count):  # no wait between messages: live, offered and stored ones mix
                a.send(msg(B, f"m{i}"))
            got = [b.recv()["messageId"] for _ in range(count)]
            answers = [a.recv() for _ in range(count)]
        assert got == [f"m{i}" for i in range(count)]
        assert [f["messageId"] for f in answers] == got and {f["type"] for f in answers} == {"delivered"}
        for i in range(count, 2 * count):  # B is offline now, then comes back on the other instance
            a.send(msg(B, f"m{i}"))
        assert [a.recv()["messageId"] for _ in range(count)] == [f"m{i}" for i in range(count, 2 * count)]
    with connect(x, B, ack=True) as b:
        assert [f["messageId"] for f in read_backlog(b)] == [f"m{i}" for i in range(count, 2 * count)]


# Shared storage


@pytest.mark.sealed_backplane
def test_the_offline_queue_and_the_ack_extension_are_shared(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2)
    b = new_address()
    with connect(x, A) as a:
        for i in range(3):
            send_answered(a, b, f"q{i}", "queued")
    assert queue_size(y, b) == 3
    with connect(y, b, ack=True) as reader:
        assert [f["messageId"] for f in read_backlog(reader)] == ["q0", "q1", "q2"]
        reader.send({"type": "ack", "messageIds": ["q0", "q1"]})
        pong_next(reader)
    with connect(x, b, ack=True) as reader:  # acked on one instance, gone on the other
        assert [f["messageId"] for f in read_backlog(reader)] == ["q2"]


def test_a_resent_message_id_is_idempotent_across_instances(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2)
    b = new_address()
    with connect(x, A) as a:
        send_answered(a, b, "once", "queued")
    with connect(y, A) as a:  # the client lost the answer and resends through another instance
        send_answered(a, b, "once", "queued")
    with connect(y, b, ack=True) as reader:
        assert [f["messageId"] for f in read_backlog(reader)] == ["once"]
        reader.send({"type": "ack", "messageIds": ["once"]})
        pong_next(reader)
    with connect(x, b) as receiver, connect(y, A) as a:
        mid = new_mid()
        send_answered(a, b, mid, "delivered")
        received(receiver, mid, A)
    with connect(y, b) as receiver, connect(x, A) as a:  # the same messageId again, through the other instance
        send_answered(a, b, mid, "delivered")
        pong_next(receiver)  # ... and the recipient does not get it twice


def test_a_resend_through_a_third_instance_after_the_recipients_flush_is_not_delivered_twice(relay_cluster,
                                                                                              backplane):
    """The instance that flushed the message to the recipient's open session remembers it: the resend's live
    offer from an instance that never saw it is answered from there (CI's stalled-replies fault test)."""
    x, y, z = relay_cluster(backplane, 3)
    b = new_address()
    with connect(x, A) as a:
        send_answered(a, b, "flushed", "queued")
    with connect(y, b) as receiver:
        received(receiver, "flushed", A, queued=True)
        with connect(z, A) as a:
            send_answered(a, b, "new", "delivered")  # z now knows where b is: a message to b is offered live
            received(receiver, "new", A)
            send_answered(a, b, "flushed", "delivered")  # the sender lost the first answer and resends it here
        pong_next(receiver)


@pytest.mark.sealed_backplane
def test_queue_caps_and_new_queue_budgets_hold_for_the_whole_cluster(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2, RELAYD_QUEUE_MAX_OFFLINE_MESSAGES="2",
                         RELAYD_LIMITS_NEW_QUEUES_PER_SENDER_PER_HOUR="2")
    sender, full, r1, r2, r3 = (new_address() for _ in range(5))
    with connect(x, sender) as a:
        send_answered(a, full, "f0", "queued")
        send_answered(a, r1, "r1", "queued")
    with connect(y, sender) as a:
        send_answered(a, full, "f1", "queued")  # a recipient already counted: within the budget
        a.send(msg(full, "f2"))
        assert_error(a.recv(), "queue_full", "f2")
        a.send(msg(r2, "r2"))
        assert_error(a.recv(), "rate_limited", "r2")  # two distinct recipients this hour, one of them via x
    with connect(x, sender) as a:
        a.send(msg(r3, "r3"))
        assert_error(a.recv(), "rate_limited", "r3")


def test_the_storage_budget_holds_for_the_whole_cluster(relay_cluster, redis_server):
    """Each instance checks the budget against per-slot totals it reads from Redis every 5 s (exact for its own
    writes): once it has read what the other stored, it refuses too."""
    x, y = relay_cluster(redis_server, 2, RELAYD_STORAGE_MAX_BYTES="300")
    content = "x" * 100
    with connect(x, A) as a:
        for i in range(3):
            send_answered(a, new_address(), f"fill{i}", "queued", content)
        a.send(msg(new_address(), "over", content))
        assert_error(a.recv(), "storage_unavailable", "over")
    wait_until(lambda: y.http("GET", "/health").json["queuedMessages"] == 3, "y's totals refreshed", timeout=15)
    with connect(y, B) as b:
        b.send(msg(new_address(), "over-y", content))
        assert_error(b.recv(), "storage_unavailable", "over-y")


@pytest.mark.sealed_backplane
def test_stored_read_receipts_are_shared(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2)
    a = new_address()
    with connect(y, B) as b:
        b.send({"type": "read_receipt", "to": a, "messageId": "m1"})
        pong_next(b)
    with connect(x, a) as reader:
        read = reader.recv()
        assert {k: read[k] for k in ("type", "from", "messageId")} == {"type": "read", "from": B, "messageId": "m1"}


def test_retention_expires_what_any_instance_queued(relay_cluster, redis_server):
    x, y = relay_cluster(redis_server, 2, RELAYD_QUEUE_MESSAGE_RETENTION_HOURS="0.001",
                         RELAYD_QUEUE_EXPIRY_INTERVAL_S="0.2")
    b = new_address()
    with connect(x, A) as a:
        send_answered(a, b, "old", "queued")
    assert queue_size(y, b) == 1
    wait_until(lambda: queue_size(y, b) == 0, "retention expiry (3.6 s)", timeout=15)


def test_keys_locks_tokens_and_evictions_are_shared(relay_cluster, backplane):
    x, y = relay_cluster(backplane, 2)
    unsigned = connect(y, ADDR_A)  # a plain claim of the address, on the other instance
    with x.ws() as signer:
        signer.send(signed_auth_frame(KEY_A, challenge_of(signer)))
        success = signer.recv()
        assert success["type"] == "auth_success" and success["verified"] is True
        assert_closed_with(unsigned, 4403)  # the proof on x evicts the claim on y
        token = success["token"]
        listed = y.http("GET", f"/api/messages/{ADDR_A}?limit=5", headers=bearer(token))
        assert listed.status == 200 and listed.json["count"] == 0
        assert y.http("GET", f"/api/messages/{ADDR_A}?limit=5").status == 401
        assert y.http("GET", f"/api/messages/{B}?limit=5", headers=bearer(token)).status == 403
    with y.ws() as claim:  # the lock taken on x refuses unsigned claims on y
        challenge_of(claim)
        claim.send({"type": "auth", "address": ADDR_A})
        assert_error(claim.recv(), "auth_required")
    issued = int(time.time())
    assert x.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, issued)).status == 200
    key = y.http("GET", f"/api/public-keys/{ADDR_A}").json
    assert key["publicKey"] == PUB_KEY and key["verified"] is True
    assert y.http("POST", "/api/public-keys", {"address": ADDR_A, "publicKey": "other"}).status == 401
    stale = y.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, issued))
    assert stale.status == 409
    unsigned_key = new_address()
    assert y.http("POST", "/api/public-keys", {"address": unsigned_key, "publicKey": "pk"}).status == 200
    assert x.http("GET", f"/api/public-keys/{unsigned_key}").json["verified"] is False


# Limits


def test_per_ip_limits_are_per_instance(relay_cluster, redis_server):
    x, y = relay_cluster(redis_server, 2, RELAYD_LIMITS_MAX_CONNECTIONS_PER_IP="2")
    held = [connect(x, new_address()), connect(x, new_address()), connect(y, new_address()),
            connect(y, new_address())]
    try:
        with pytest.raises(Exception) as refused:
            x.ws()
        assert "429" in str(refused.value)
    finally:
        for ws in held:
            ws.close()


# Faults


@pytest.mark.sealed_backplane
def test_an_instance_killed_under_load_loses_nothing_it_answered_and_its_presence_goes(relay_cluster,
                                                                                      backplane):
    x, y = relay_cluster(backplane, 2, **OPEN)
    count = 400
    live: list[str] = []
    b = connect(y, B)

    def read_live() -> None:
        try:
            while True:
                frame = b.recv(timeout=10)
                if frame["type"] == "message":
                    live.append(frame["messageId"])
                    if len(live) == 100:
                        y.kill9()
        except Exception:  # the connection died with its instance
            return
    reader = threading.Thread(target=read_live, daemon=True)
    reader.start()
    answered: list[str] = []
    with connect(x, A) as a:
        for i in range(count):
            a.send(msg(B, f"m{i}"))
            if i % 20 == 19:  # under load, but not so far ahead that the kill comes after the last one
                time.sleep(0.002)
        for _ in range(count):
            frame = a.recv(timeout=10)
            if frame["type"] in ("delivered", "queued"):
                answered.append(frame["messageId"])
            elif frame.get("code") != "storage_timeout":  # an offer the dying instance never answered
                assert_error(frame, "storage_unavailable", frame.get("messageId"))
    reader.join(scaled(10))
    assert y.proc.returncode == -9 and len(answered) > 100
    wait_until(lambda: not online(x, B), "the killed instance's session offline (ttl 1 s + heartbeat 0.2 s)",
               timeout=10)
    with connect(x, B, ack=True) as again:
        stored = [f["messageId"] for f in read_backlog(again)]
    lost = set(answered) - set(live) - set(stored)
    assert not lost, f"{len(lost)} answered messages lost: {sorted(lost)[:10]}"


def test_redis_restart_under_load_503_everywhere_local_delivery_goes_on_and_all_recovers(relay_cluster,
                                                                                        durable_redis):
    x, y = relay_cluster(durable_redis, 2, **OPEN)
    offline = new_address()
    with connect(x, A) as a, connect(x, C) as c, connect(y, B) as b:
        send_answered(a, B, "before", "delivered")
        received(b, "before", A)
        send_answered(a, offline, "kept", "queued")
        durable_redis.stop()
        for relay in (x, y):
            wait_until(lambda relay=relay: relay.http("GET", "/health/ready").status == 503, "not ready",
                       timeout=10)
        send_answered(a, C, "local", "delivered")  # same instance: no Redis needed
        received(c, "local", A)
        for i in range(20):  # needs Redis: refused, never answered queued
            a.send(msg(offline, f"lost{i}"))
            assert_error(a.recv(), "storage_unavailable", f"lost{i}")
        durable_redis.start()
        for relay in (x, y):
            wait_until(lambda relay=relay: relay.http("GET", "/health/ready").status == 200, "ready again",
                       timeout=15)

        def crosses() -> bool:
            mid = new_mid()
            a.send(msg(B, mid))
            if a.recv()["type"] != "delivered":
                return False  # stored: B gets it with the messages of the outage, if any, after its backlog
            while b.recv()["messageId"] != mid:
                pass
            return True
        wait_until(crosses, "live delivery across instances again", timeout=15, interval=0.1)
        send_answered(a, offline, "after", "queued")
    assert x.proc.poll() is None and y.proc.poll() is None
    with connect(y, offline, ack=True) as reader:
        assert [f["messageId"] for f in read_backlog(reader)] == ["kept", "after"]


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_postgres_restarted_under_load_loses_nothing_answered_and_the_cluster_recovers(relay_cluster, fresh_pg,
                                                                                     how):
    """PostgreSQL stopped (fast shutdown) or crashed (kill -9: its unlogged presence tables come back empty) while
    two instances route a sender's stream across them: 503 everywhere while it is gone, clear errors for what
    needs it, every answered message reaches the recipient, and live delivery across instances comes back."""
    x, y = relay_cluster(fresh_pg.new_database(), 2, **OPEN)
    live: list[str] = []
    b = connect(y, B)

    def read_live() -> None:
        try:
            while True:
                frame = b.recv(timeout=30)
                if frame["type"] == "message":
                    live.append(frame["messageId"])
        except Exception:  # closed at the end of the test
            return
    reader = threading.Thread(target=read_live, daemon=True)
    reader.start()
    answers: list[dict[str, Any]] = []
    with connect(x, A) as a:
        def burst(start: int, count: int) -> None:
            for i in range(start, start + count):
                a.send(msg(B, f"m{i}"))
            answers.extend(a.recv(timeout=30) for _ in range(count))
        burst(0, 100)
        if how == "crash":
            fresh_pg.crash()
        else:
            fresh_pg.stop()
        for relay in (x, y):
            wait_until(lambda relay=relay: relay.http("GET", "/health/ready").status == 503, "not ready",
                       timeout=10)
        burst(100, 50)  # needs PostgreSQL: refused, never answered queued
        fresh_pg.start()
        for relay in (x, y):
            wait_until(lambda relay=relay: relay.http("GET", "/health/ready").status == 200, "ready again",
                       timeout=20)
        retries = iter(range(1000, 2000))

        def crosses() -> bool:  # after a crash, until y has written its presence again, x stores (queued)
            mid = f"m{next(retries)}"
            a.send(msg(B, mid))
            answers.append(a.recv(timeout=30))
            return answers[-1]["type"] == "delivered"
        wait_until(crosses, "live delivery across instances again", timeout=15, interval=0.1)
        burst(150, 100)
    answered = [f["messageId"] for f in answers if f["type"] in ("delivered", "queued")]
    for frame in answers:
        if frame["type"] not in ("delivered", "queued"):
            assert frame.get("code") in ("storage_unavailable", "storage_timeout"), frame
    assert all(m in answered for m in (f"m{i}" for i in range(100))), "before the outage, everything is answered"
    b.close()  # what was on its way to it is put back in its queue
    reader.join(scaled(10))
    with connect(x, B, ack=True) as again:
        stored = [f["messageId"] for f in read_backlog(again)]
    lost = set(answered) - set(live) - set(stored)
    assert not lost, f"{len(lost)} answered messages lost: {sorted(lost)[:10]}"
    assert x.proc.poll() is None and y.proc.poll() is None


def test_relayd_instances_on_a_redis_cluster(relay_cluster, redis_cluster):
    x, y = relay_cluster(redis_cluster, 2)
    addresses = [new_address() for _ in range(12)]  # spread over the three masters
    with connect(x, A) as a, connect(y, addresses[0]) as first:
        send_answered(a, addresses[0], "live", "delivered")
        received(first, "live", A)
        for i, to in enumerate(addresses[1:]):
            send_answered(a, to, f"q{i}", "queued")
        assert online(x, addresses[0]) and not online(x, addresses[1])
    for i, to in enumerate(addresses[1:]):
        with connect(x if i % 2 else y, to, ack=True) as reader:
            assert [f["messageId"] for f in read_backlog(reader)] == [f"q{i}"]
    assert x.http("GET", "/health/ready").status == 200 and y.http("GET", "/health/ready").status == 200

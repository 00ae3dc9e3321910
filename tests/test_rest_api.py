"""The REST API contract of the seed, endpoint by endpoint, over real HTTP.

Most tests run the relay in ``[auth] mode = open`` (the seed's unauthenticated
API); the last section checks what the real app needs from the default mode.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from support import (A, B, C, JSON, MIXED, MIXED_LOWER, assert_answered, assert_auth_success, assert_ms, assert_refused,
                     connect, connections, http_head, msg, online, queue_size, raw_http, wait_until)

import relayd


def ok(reply: Any, status: int = 200) -> Any:
    """A JSON answer with ``status`` and Connection: close; returns its body."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith(JSON), reply.headers
    assert reply.headers["connection"].lower() == "close", reply.headers
    return reply.json


def queue_for(relay: Any, to: str, *contents: str, prefix: str = "m") -> None:
    with connect(relay, A) as a:
        for i, content in enumerate(contents):
            assert_answered(a, msg(to, f"{prefix}{i}", content, timestamp=1000 + i), "queued")


# Health


def test_health_reports_exact_shape(open_relay):
    body = ok(open_relay.http("GET", "/health"))
    assert set(body) == {"status", "timestamp", "uptime", "connections", "queuedMessages", "version", "storage"}
    assert body["status"] == "ok"
    stamp = datetime.datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert stamp.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 600
    assert type(body["uptime"]) in (int, float) and body["uptime"] >= 0
    assert body["connections"] == 0 and type(body["connections"]) is int
    assert body["queuedMessages"] == 0 and type(body["queuedMessages"]) is int
    assert body["version"] == relayd.__version__
    assert body["storage"] == {"backend": "memory", "status": "ok"}


def test_health_counts_authenticated_sessions_and_queued_messages(open_relay):
    with open_relay.ws() as anonymous, open_relay.ws() as a:
        anonymous.send({"type": "ping"})
        assert anonymous.recv()["code"] == "not_authenticated"
        assert ok(open_relay.http("GET", "/health"))["connections"] == 0
        a.auth(A)
        a.send(msg(B, "h1"))
        a.recv()
        a.send(msg(C, "h2"))
        a.recv()
        body = ok(open_relay.http("GET", "/health"))
        assert (body["connections"], body["queuedMessages"]) == (1, 2)
    wait_until(lambda: connections(open_relay) == 0, "the sessions to end")


def test_liveness_and_readiness(open_relay):
    assert ok(open_relay.http("GET", "/health/live")) == {"status": "ok"}
    ready = ok(open_relay.http("GET", "/health/ready"))
    assert ready["status"] == "ready"


# Public keys


def test_store_public_key_returns_exact_shape(open_relay):
    body = ok(open_relay.http("POST", "/api/public-keys", {"address": MIXED, "publicKey": "a2V5MQ=="}))
    assert set(body) == {"success", "address", "createdAt", "updatedAt", "verified"}
    assert (body["success"], body["address"], body["verified"]) == (True, MIXED_LOWER, False)
    assert_ms(body["createdAt"])
    assert body["updatedAt"] == body["createdAt"]


def test_replacing_a_key_keeps_created_at(open_relay):
    first = ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "old"}))
    second = ok(open_relay.http("POST", "/api/public-keys", {"address": A.upper().replace("0X", "0x"),
                                                             "publicKey": "new"}))
    assert second["createdAt"] == first["createdAt"]
    assert second["updatedAt"] >= first["updatedAt"]
    got = ok(open_relay.http("GET", f"/api/public-keys/{A}"))
    assert (got["publicKey"], got["createdAt"], got["updatedAt"]) == ("new", first["createdAt"],
                                                                        second["updatedAt"])


def test_get_public_key_accepts_mixed_case(open_relay):
    stored = ok(open_relay.http("POST", "/api/public-keys", {"address": MIXED_LOWER, "publicKey": "pk"}))
    got = ok(open_relay.http("GET", f"/api/public-keys/{MIXED}"))
    assert {k: got[k] for k in ("address", "publicKey", "updatedAt", "createdAt")} == {
        "address": MIXED_LOWER, "publicKey": "pk", "updatedAt": stored["updatedAt"],
        "createdAt": stored["createdAt"]}


@pytest.mark.parametrize("body,code", [
    ({"address": "0x123", "publicKey": "k"}, "invalid_address"),
    ({"address": "0x" + "z" * 40, "publicKey": "k"}, "invalid_address"),
    ({"address": 12, "publicKey": "k"}, "invalid_address"),
    ({"address": A}, "invalid_field"),
    ({"address": A, "publicKey": ""}, "invalid_field"),
    ({"address": A, "publicKey": 5}, "invalid_field"),
    ({"address": A, "publicKey": None}, "invalid_field"),
    ({"address": A, "publicKey": ["k"]}, "invalid_field"),
])
def test_store_public_key_refusals(open_relay, body, code):
    assert_refused(open_relay.http("POST", "/api/public-keys", body), 400, code)
    assert_refused(open_relay.http("GET", f"/api/public-keys/{A}"), 404, "key_not_found")


@pytest.mark.parametrize("raw,code", [
    (b"{not json", "invalid_json"),
    (b'{"address": "0x', "invalid_json"),
    (b"[1]", "bad_request"),
    (b'"x"', "bad_request"),
    (b"5", "bad_request"),
    (b"null", "bad_request"),
])
def test_store_public_key_body_must_be_a_json_object(open_relay, raw, code):
    reply = open_relay.http("POST", "/api/public-keys", raw_body=raw, headers={"Content-Type": JSON})
    assert_refused(reply, 400, code)


def test_get_public_key_unknown_and_bad_address(open_relay):
    assert_refused(open_relay.http("GET", f"/api/public-keys/{B}"), 404, "key_not_found")
    assert_refused(open_relay.http("GET", "/api/public-keys/0xnothex"), 400, "invalid_address")


def test_head_public_key_has_headers_and_no_body(open_relay):
    ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "pk"}))
    get = open_relay.http("GET", f"/api/public-keys/{A}")
    found = raw_http(open_relay.port, http_head("HEAD", "/api/public-keys/0x" + A[2:].upper()))
    assert found.status == 200 and found.body == b"", found
    assert int(found.headers["content-length"]) == len(get.body)
    assert found.headers["content-type"].startswith(JSON)
    missing = raw_http(open_relay.port, http_head("HEAD", f"/api/public-keys/{B}"))
    get_missing = open_relay.http("GET", f"/api/public-keys/{B}")
    assert missing.status == 404 and missing.body == b"", missing
    assert int(missing.headers["content-length"]) == len(get_missing.body)
    bad = raw_http(open_relay.port, http_head("HEAD", "/api/public-keys/0x12"))
    assert bad.status == 400 and bad.body == b"", bad


def test_key_lookups_carry_an_etag_and_answer_304_when_it_still_matches(open_relay):
    ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "pk1"}))
    first = open_relay.http("GET", f"/api/public-keys/{A}")
    ok(first)
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 26, etag
    assert first.headers["cache-control"] == "max-age=5"
    for tag in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        same = open_relay.http("GET", f"/api/public-keys/{A}", headers={"If-None-Match": tag})
        assert same.status == 304 and same.body == b"", (tag, same)
        assert same.headers["etag"] == etag and same.headers["cache-control"] == "max-age=5"
        assert "content-length" not in same.headers
    head = raw_http(open_relay.port, http_head("HEAD", f"/api/public-keys/{A}", {"If-None-Match": etag}))
    assert head.status == 304 and head.body == b"", head
    stale = open_relay.http("GET", f"/api/public-keys/{A}", headers={"If-None-Match": '"other"'})
    assert stale.status == 200 and stale.headers["etag"] == etag and stale.body == first.body
    # A new key (the app uploads one on every start) is a new answer with a new tag.
    ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "pk2"}))
    fresh = open_relay.http("GET", f"/api/public-keys/{A}", headers={"If-None-Match": etag})
    assert fresh.status == 200 and fresh.json["publicKey"] == "pk2"
    assert fresh.headers["etag"] != etag


def test_answers_other_than_key_lookups_are_not_cacheable(open_relay):
    ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "pk"}))
    for method, path in (("GET", f"/api/status/{A}"), ("GET", f"/api/public-keys/{B}"), ("GET", "/health"),
                         ("GET", f"/api/messages/{A}/queue-size"), ("POST", "/api/public-keys")):
        reply = open_relay.http(method, path)
        assert reply.headers["cache-control"] == "no-store", (method, path, reply.headers)
        assert "etag" not in reply.headers


def test_key_cache_max_age_zero_asks_clients_to_revalidate(start_relay):
    relay = start_relay(auth={"mode": "open"}, server={"key_cache_max_age_s": 0})
    ok(relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "pk"}))
    first = relay.http("GET", f"/api/public-keys/{A}")
    assert first.headers["cache-control"] == "no-cache"
    assert relay.http("GET", f"/api/public-keys/{A}", headers={"If-None-Match": first.headers["etag"]}).status == 304


def test_delete_public_key(open_relay):
    ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "pk"}))
    deleted = ok(open_relay.http("DELETE", f"/api/public-keys/{A.upper().replace('0X', '0x')}"))
    assert set(deleted) == {"success", "message"} and deleted["success"] is True
    assert isinstance(deleted["message"], str) and deleted["message"]
    assert_refused(open_relay.http("GET", f"/api/public-keys/{A}"), 404, "key_not_found")
    again = ok(open_relay.http("DELETE", f"/api/public-keys/{A}"))
    assert set(again) == {"success", "message"} and again["success"] is False
    assert_refused(open_relay.http("DELETE", "/api/public-keys/0x12"), 400, "invalid_address")


def test_batch_public_keys_returns_only_found_ones(open_relay):
    a = ok(open_relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "ka"}))
    m = ok(open_relay.http("POST", "/api/public-keys", {"address": MIXED, "publicKey": "km"}))
    body = ok(open_relay.http("POST", "/api/public-keys/batch", {"addresses": [A, MIXED, B]}))
    assert set(body) == {"count", "keys"} and body["count"] == 2
    assert set(body["keys"]) == {A, MIXED_LOWER}
    for addr, key, rec in ((A, "ka", a), (MIXED_LOWER, "km", m)):
        view = body["keys"][addr]
        assert {k: view[k] for k in ("address", "publicKey", "updatedAt", "createdAt")} == {
            "address": addr, "publicKey": key, "updatedAt": rec["updatedAt"], "createdAt": rec["createdAt"]}


@pytest.mark.parametrize("body,code", [
    ({"addresses": []}, "bad_request"),
    ({"addresses": A}, "bad_request"),
    ({"addresses": {"a": A}}, "bad_request"),
    ({}, "bad_request"),
    ({"addresses": [A, "0x12"]}, "invalid_address"),
    ({"addresses": [A, None]}, "invalid_address"),
])
def test_batch_public_keys_refusals(open_relay, body, code):
    assert_refused(open_relay.http("POST", "/api/public-keys/batch", body), 400, code)


# Message queue


def test_get_messages_lists_and_drains(open_relay):
    queue_for(open_relay, B, "one", "two")
    body = ok(open_relay.http("GET", f"/api/messages/{B.upper().replace('0X', '0x')}"))
    assert set(body) == {"address", "count", "messages"}
    assert (body["address"], body["count"]) == (B, 2)
    for i, entry in enumerate(body["messages"]):
        assert set(entry) == {"from", "content", "messageId", "timestamp", "queuedAt"}
        assert (entry["from"], entry["content"], entry["messageId"], entry["timestamp"]) == (
            A, ["one", "two"][i], f"m{i}", 1000 + i)
        assert_ms(entry["queuedAt"])
    assert queue_size(open_relay, B) == 0
    assert ok(open_relay.http("GET", f"/api/messages/{B}")) == {"address": B, "count": 0, "messages": []}
    # Drained means gone: the recipient does not get them again on connect.
    with open_relay.ws() as b:
        b.auth(B)
        b.send({"type": "ping"})
        assert b.recv()["type"] == "pong"


def test_get_messages_with_limit_peeks_without_removing(open_relay):
    queue_for(open_relay, B, "one", "two", "three")
    body = ok(open_relay.http("GET", f"/api/messages/{B}?limit=2"))
    assert (body["address"], body["count"]) == (B, 2)
    assert [m["messageId"] for m in body["messages"]] == ["m0", "m1"]
    assert ok(open_relay.http("GET", f"/api/messages/{B}?limit=0")) == {"address": B, "count": 0, "messages": []}
    assert queue_size(open_relay, B) == 3


@pytest.mark.parametrize("query", ["abc", "-1", "1.5", ""])
def test_get_messages_bad_limit_is_400(open_relay, query):
    queue_for(open_relay, B, "x")
    assert_refused(open_relay.http("GET", f"/api/messages/{B}?limit={query}"), 400, "bad_request")
    assert queue_size(open_relay, B) == 1


def test_head_messages_does_not_drain_the_queue(open_relay):
    queue_for(open_relay, B, "keep me")
    reply = raw_http(open_relay.port, http_head("HEAD", f"/api/messages/{B}"))
    assert reply.status == 200 and reply.body == b""
    assert queue_size(open_relay, B) == 1


def test_queue_size_shape(open_relay):
    assert ok(open_relay.http("GET", f"/api/messages/{B}/queue-size")) == {"address": B, "queueSize": 0}
    queue_for(open_relay, B, "x", "y")
    assert ok(open_relay.http("GET", f"/api/messages/{MIXED}/queue-size")) == {"address": MIXED_LOWER,
                                                                              "queueSize": 0}
    assert ok(open_relay.http("GET", f"/api/messages/{B}/queue-size")) == {"address": B, "queueSize": 2}
    assert_refused(open_relay.http("GET", "/api/messages/0x12/queue-size"), 400, "invalid_address")


def test_delete_messages_clears_the_queue(open_relay):
    queue_for(open_relay, B, "x", "y")
    body = ok(open_relay.http("DELETE", f"/api/messages/{B}"))
    assert set(body) == {"address", "cleared", "removed", "message"}
    assert (body["address"], body["cleared"], body["removed"]) == (B, True, 2)
    assert isinstance(body["message"], str)
    again = ok(open_relay.http("DELETE", f"/api/messages/{B}"))
    assert (again["address"], again["cleared"], again["removed"]) == (B, False, 0)
    assert queue_size(open_relay, B) == 0
    assert_refused(open_relay.http("DELETE", "/api/messages/0x12"), 400, "invalid_address")


def test_queue_stats(start_relay):
    relay = start_relay(auth={"mode": "open"}, queue={"max_offline_messages": 50, "message_retention_hours": 24})
    assert ok(relay.http("GET", "/api/messages/stats/all")) == {
        "totalUsers": 0, "totalMessages": 0, "maxMessagesPerUser": 50, "retentionHours": 24}
    queue_for(relay, B, "x", "y")
    queue_for(relay, C, "z", prefix="c")
    assert ok(relay.http("GET", "/api/messages/stats/all")) == {
        "totalUsers": 2, "totalMessages": 3, "maxMessagesPerUser": 50, "retentionHours": 24}


# Status


def test_status_of_offline_and_online_users(open_relay):
    body = ok(open_relay.http("GET", f"/api/status/{MIXED}"))
    assert set(body) == {"address", "online", "timestamp"}
    assert (body["address"], body["online"]) == (MIXED_LOWER, False)
    assert_ms(body["timestamp"])
    with open_relay.ws() as m:
        m.auth(MIXED)
        body = ok(open_relay.http("GET", f"/api/status/{MIXED_LOWER}"))
        assert (body["address"], body["online"]) == (MIXED_LOWER, True)
    wait_until(lambda: not online(open_relay, MIXED), "the mixed-case address offline")
    assert_refused(open_relay.http("GET", "/api/status/0x12"), 400, "invalid_address")


def test_status_batch(open_relay):
    with open_relay.ws() as a:
        a.auth(A)
        body = ok(open_relay.http("POST", "/api/status/batch", {"addresses": [A, MIXED, B]}))
    assert set(body) == {"timestamp", "statuses"}
    assert_ms(body["timestamp"])
    assert body["statuses"] == {A: True, MIXED_LOWER: False, B: False}
    assert_refused(open_relay.http("POST", "/api/status/batch", {"addresses": []}), 400, "bad_request")
    assert_refused(open_relay.http("POST", "/api/status/batch", {"addresses": "x"}), 400, "bad_request")
    assert_refused(open_relay.http("POST", "/api/status/batch", {"addresses": ["0x1"]}), 400, "invalid_address")


def test_online_all(open_relay):
    empty = ok(open_relay.http("GET", "/api/status/online/all"))
    assert set(empty) == {"count", "users", "timestamp"} and (empty["count"], empty["users"]) == (0, [])
    assert_ms(empty["timestamp"])
    with open_relay.ws() as a, open_relay.ws() as m, open_relay.ws() as anonymous:
        a.auth(A)
        m.auth(MIXED)
        anonymous.send({"type": "ping"})
        anonymous.recv()
        body = ok(open_relay.http("GET", "/api/status/online/all"))
        assert body["count"] == 2 and sorted(body["users"]) == sorted([A, MIXED_LOWER])


# The default mode, as the Flutter app uses it


def test_default_mode_accepts_the_apps_unsigned_flow(relay):
    """The app sends auth without waiting, uploads a fresh unsigned key on every start,
    and reads only publicKey when it looks a key up by its mixed-case address."""
    for key in ("Zmlyc3Qga2V5IG9mIDMyIGJ5dGVzIGxvbmcgISEhISE=", "c2Vjb25kIGtleSBvZiAzMiBieXRlcyBsb25nICEhISE="):
        body = ok(relay.http("POST", "/api/public-keys", {"address": MIXED, "publicKey": key}))
        assert (body["success"], body["address"]) == (True, MIXED_LOWER)
        assert ok(relay.http("GET", f"/api/public-keys/{MIXED}"))["publicKey"] == key
    with relay.ws() as m, relay.ws() as b:
        m.send({"type": "auth", "address": MIXED})
        b.send({"type": "auth", "address": B})
        # Any frame before auth_success must be one the app ignores (not a status frame).
        for ws, addr in ((m, MIXED), (b, B)):
            while True:
                frame = ws.recv()
                assert frame["type"] not in ("delivered", "queued", "read", "typing", "message", "error"), frame
                if frame["type"] == "auth_success":
                    assert_auth_success(frame, addr)
                    break
        assert_answered(b, msg(MIXED, "app-1", "Y2lwaGVy", timestamp=1705234567890), "delivered")
        assert m.recv() == {"type": "message", "from": B, "content": "Y2lwaGVy", "messageId": "app-1",
                            "timestamp": 1705234567890, "queued": False}


def test_default_mode_peeking_a_queue_needs_the_owners_token(relay):
    queue_for(relay, B, "private")
    reply = relay.http("GET", f"/api/messages/{B}?limit=10")
    assert_refused(reply, 401, "unauthorized")

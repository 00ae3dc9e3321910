"""Push notifications (issue 22), end to end against receivers that check what the real services check
(``push_receivers``): Web Push with VAPID and RFC 8291 encryption, FCM v1 with its OAuth2 grant, APNs over
HTTP/2. Relays run in-process (``ThreadRelay``) or as processes sharing Redis; every receiver is real TLS."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from push_receivers import ApnsService, FcmService, PushCA, WebPushService, unb64url
from support import (ADDR_A, ADDR_B, KEY_A, KEY_B, ProcessRelay, assert_answered, assert_error, clean_env, cli_ok,
                     connect, frames_until_pong, http_request, metric_families, msg, new_address, now_ms, online,
                     run_cli, scaled, signed_login, wait_until, without_modules)

from relayd.push.http2 import Http2Client
from relayd.push.subscriptions import is_public
from relayd.storage.sqlite.store import SQLiteStore
from relayd.storage.store import PushSubscription, push_bytes

SUBJECT = "mailto:ops@relay.example"


@pytest.fixture
def ca(tmp_path: Path) -> PushCA:
    return PushCA(tmp_path)


@pytest.fixture
def webpush(ca: PushCA) -> Iterator[WebPushService]:
    service = WebPushService(ca)
    yield service
    service.stop()
    assert service.refusals == []


@pytest.fixture
def fcm(ca: PushCA, tmp_path: Path) -> Iterator[FcmService]:
    service = FcmService(ca, tmp_path)
    yield service
    service.stop()
    assert service.refusals == []


@pytest.fixture
def apns(ca: PushCA, tmp_path: Path) -> Iterator[ApnsService]:
    service = ApnsService(ca, tmp_path)
    yield service
    service.stop()
    assert service.refusals == []


def push_section(ca: PushCA, tmp: Path, **extra: Any) -> dict[str, Any]:
    """``[push]`` for a relay that reaches the receivers on 127.0.0.1 and trusts the test CA."""
    return {"enabled": "true", "vapid_subject": SUBJECT, "vapid_key_file": str(tmp / "vapid.pem"),
            "allow_private_endpoints": "true", "ca_file": str(ca.ca_file), "min_interval_s": "30", **extra}


def subscribe(ws: Any, frame: dict[str, Any]) -> str:
    ws.send({"type": "push_subscribe", **frame})
    answer = ws.recv()
    assert answer["type"] == "push_subscribed" and set(answer) == {"type", "id"}, answer
    return str(answer["id"])


def subscribed_offline(relay: Any, frame: dict[str, Any]) -> str:
    """Sign in as ADDR_A, subscribe, leave; returns the subscription id."""
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        return subscribe(ws, frame)


def send_from_b(relay: Any, count: int, to: str = ADDR_A, answer: str = "queued") -> None:
    with relay.ws() as b:
        b.auth(ADDR_B)
        for i in range(count):
            frame = msg(to, f"m{i}-{time.monotonic_ns()}", "c2VjcmV0IGNvbnRlbnQ=")
            b.send(frame)
            got = b.recv()  # (its timestamp is the relay's clock, which some tests move)
            assert (got["type"], got["messageId"]) == (answer, frame["messageId"]), got


def pushes(relay: Any) -> dict[tuple[str, str], float]:
    families = metric_families(http_request(relay.port, "GET", "/metrics").body.decode())
    return {(labels["provider"], labels["outcome"]): value
            for _, labels, value in families.get("relayd_push_total", {}).get("samples", [])}


def settled(relay: Any) -> None:
    """The relay's push queue is empty and no retry is waiting."""
    wait_until(lambda: relay.server.push.sender.idle(), "the push queue to empty", timeout=scaled(10))


def stored_subscriptions(relay: Any, address: str = ADDR_A) -> list[PushSubscription]:
    return relay.call(relay.server.store.push_subscriptions(address, now_ms()))


# Web Push


def test_an_offline_burst_wakes_a_web_push_device_once_with_nothing_but_a_count(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path))
    device = webpush.device()
    subscribed_offline(relay, {"subscription": device.subscription()})
    send_from_b(relay, 3)
    got = webpush.wait_for(1, scaled(10))
    settled(relay)
    assert len(webpush.received) == 1
    push = got[0]
    assert push["payload"]["type"] == "wake" and set(push["payload"]) == {"type", "queued"}
    assert 1 <= push["payload"]["queued"] <= 3
    assert push["topic"] == "wake" and push["urgency"] == "high"
    key = http_request(relay.port, "GET", "/api/push/vapid-public-key").json["publicKey"]
    assert push["key"] == key and len(unb64url(key)) == 65 and unb64url(key)[0] == 4
    counted = pushes(relay)
    assert counted[("webpush", "sent")] == 1 and counted.get(("webpush", "collapsed"), 0) <= 2

    mode = stat.S_IMODE(os.stat(tmp_path / "vapid.pem").st_mode)
    assert mode == 0o600


def test_an_online_recipient_gets_no_push_nor_for_typing_and_receipts(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, min_interval_s="0"))
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        subscribe(ws, {"subscription": webpush.device().subscription()})
        with connect(relay, ADDR_B) as b:
            assert_answered(b, msg(ADDR_A, "live-1"), "delivered")
            b.send({"type": "typing", "to": ADDR_A, "isTyping": True})
            ws.send({"type": "read_receipt", "to": ADDR_B, "messageId": "live-1"})
            frames_until_pong(b)
            frames_until_pong(ws)
    with connect(relay, ADDR_B) as b:  # a receipt for B, offline now, is stored: still no push (B has none)
        pass
    send_from_b(relay, 1)  # A is offline now: this one pushes, and only this one (the queue is in order)
    got = webpush.wait_for(1, scaled(10))
    settled(relay)
    assert len(webpush.received) == 1 and got[0]["payload"] == {"type": "wake", "queued": 1}


def test_a_burst_within_min_interval_is_collapsed_and_a_later_one_pushes_again(start_relay, ca, webpush,
                                                                               tmp_path, manual_clock):
    relay = start_relay(clock=manual_clock, push=push_section(ca, tmp_path, min_interval_s="60"))
    subscribed_offline(relay, {"subscription": webpush.device().subscription()})
    send_from_b(relay, 1)
    webpush.wait_for(1, scaled(10))
    settled(relay)
    send_from_b(relay, 2)
    wait_until(lambda: pushes(relay).get(("webpush", "collapsed"), 0) >= 1, "a collapsed push")
    settled(relay)
    assert len(webpush.received) == 1
    manual_clock.advance(61)
    send_from_b(relay, 1)
    got = webpush.wait_for(2, scaled(10))
    assert len(got) == 2 and got[1]["payload"]["queued"] == 4


def test_a_gone_subscription_is_removed(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path))
    subscribed_offline(relay, {"subscription": webpush.device().subscription()})
    assert len(stored_subscriptions(relay)) == 1
    webpush.answer(410)
    send_from_b(relay, 1)
    wait_until(lambda: pushes(relay).get(("webpush", "gone")) == 1, "the 410 to be counted", timeout=scaled(10))
    assert stored_subscriptions(relay) == [] and webpush.requests == 1


def test_429_is_retried_after_retry_after_and_other_errors_back_off(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, max_attempts="3"))
    subscribed_offline(relay, {"subscription": webpush.device().subscription()})
    webpush.answer(429, Retry_After="1")
    webpush.answer(500)
    started = time.monotonic()
    send_from_b(relay, 1)
    got = webpush.wait_for(1, scaled(15))
    assert len(got) == 1 and webpush.requests == 3
    assert time.monotonic() - started >= 1.0  # not before Retry-After
    settled(relay)
    assert pushes(relay) == {("webpush", "retry"): 2.0, ("webpush", "sent"): 1.0}


def test_attempts_are_bounded(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, max_attempts="2", max_backoff_s="0.05"))
    subscribed_offline(relay, {"subscription": webpush.device().subscription()})
    for _ in range(3):
        webpush.answer(503)
    send_from_b(relay, 1)
    wait_until(lambda: pushes(relay).get(("webpush", "failed")) == 1, "the push to fail", timeout=scaled(10))
    settled(relay)
    assert webpush.requests == 2 and webpush.received == [] and len(stored_subscriptions(relay)) == 1


@pytest.mark.parametrize("endpoint", [
    "http://push.example.org/x", "https://127.0.0.1/x", "https://10.1.2.3/x", "https://169.254.169.254/latest",
    "https://[::1]/x", "https://[::ffff:127.0.0.1]/x", "https://100.64.0.1/x", "https://localhost/x",
    "https://localhost./x", "https://user:pw@push.example.org/x", "ftp://push.example.org/x", "https:///x",
    "https://push.example.org:99999/x", "https://" + "a" * 3000 + ".org/",
])
def test_endpoints_that_are_not_public_https_are_refused(start_relay, ca, webpush, tmp_path, endpoint):
    relay = start_relay(push=push_section(ca, tmp_path, allow_private_endpoints="false"))
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        ws.send({"type": "push_subscribe", "subscription": {**webpush.device().subscription(), "endpoint": endpoint}})
        assert_error(ws.recv(), "endpoint_not_allowed")
    assert stored_subscriptions(relay) == []


def private_name() -> str:
    """A host name that resolves to a non-public address: this machine's own name (loopback in /etc/hosts, a
    private address in a container)."""
    name = socket.gethostname()
    assert not is_public(socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)[0][4][0]), name
    return name


def test_a_name_that_resolves_to_a_private_address_is_refused(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, allow_private_endpoints="false"))
    device = webpush.device()
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        ws.send({"type": "push_subscribe", "subscription": {
            **device.subscription(), "endpoint": device.endpoint.replace("127.0.0.1", private_name())}})
        frame = ws.recv()
        assert_error(frame, "endpoint_not_allowed")
        assert "resolves to a non-public address" in frame["message"]


def test_a_stored_endpoint_is_checked_again_when_sending(start_relay, ca, webpush, tmp_path):
    """A subscription that reached storage (say, while the name pointed elsewhere) still gets no request to a
    private address: the check is made again, on the resolved address, right before sending."""
    relay = start_relay(push=push_section(ca, tmp_path, allow_private_endpoints="false"))
    device = webpush.device()
    keys = device.subscription()["keys"]
    sub = PushSubscription("x1", ADDR_A, "webpush", device.endpoint.replace("127.0.0.1", private_name()),
                           keys["p256dh"], keys["auth"], now_ms(), now_ms() + 86_400_000)
    relay.call(relay.server.store.put_push_subscription(sub, 10))
    send_from_b(relay, 1)
    wait_until(lambda: pushes(relay).get(("webpush", "refused")) == 1, "the send to be refused", timeout=scaled(10))
    assert webpush.requests == 0


@pytest.mark.parametrize("frame,code", [
    ({}, "missing_field"),
    ({"subscription": "https://x"}, "missing_field"),
    ({"subscription": {"endpoint": 5, "keys": {}}}, "invalid_subscription"),
    ({"subscription": {"endpoint": "https://push.example.org/x"}}, "invalid_subscription"),
    ({"subscription": {"endpoint": "https://push.example.org/x", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}},
     "invalid_subscription"),
    ({"provider": "carrier-pigeon", "token": "x"}, "invalid_subscription"),
    ({"provider": "fcm"}, "missing_field"),
    ({"provider": "fcm", "token": "bad token with spaces"}, "invalid_subscription"),
    ({"provider": "apns", "token": "zz" * 32}, "invalid_subscription"),
    ({"provider": "fcm", "token": "abc:def"}, "push_provider_unavailable"),
])
def test_malformed_subscriptions_get_precise_errors(start_relay, ca, tmp_path, frame, code):
    relay = start_relay(push=push_section(ca, tmp_path))
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        ws.send({"type": "push_subscribe", **frame})
        assert_error(ws.recv(), code)
        frames_until_pong(ws)  # the session goes on


def test_only_a_verified_session_may_subscribe_unless_configured_otherwise(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path))
    with connect(relay, new_address()) as ws:
        ws.send({"type": "push_subscribe", "subscription": webpush.device().subscription()})
        assert_error(ws.recv(), "push_verified_only")
        ws.send({"type": "push_unsubscribe", "id": "abc"})
        assert_error(ws.recv(), "push_verified_only")
    lax = start_relay(push=push_section(ca, tmp_path, require_verified="false"))
    address = new_address()
    with connect(lax, address) as ws:
        sub_id = subscribe(ws, {"subscription": webpush.device().subscription()})
        ws.send({"type": "push_unsubscribe", "id": sub_id})
        assert ws.recv() == {"type": "push_unsubscribed", "id": sub_id}
        ws.send({"type": "push_unsubscribe", "id": sub_id})
        assert_error(ws.recv(), "subscription_not_found")


def test_subscribing_again_replaces_and_unsubscribe_removes(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path))
    device = webpush.device()
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        first = subscribe(ws, {"subscription": device.subscription()})
        assert subscribe(ws, {"subscription": device.subscription()}) == first
        assert [s.id for s in stored_subscriptions(relay)] == [first]
        ws.send({"type": "push_unsubscribe", "id": first})
        assert ws.recv() == {"type": "push_unsubscribed", "id": first}
    assert stored_subscriptions(relay) == []


def test_without_push_the_frames_and_the_key_say_disabled(relay):
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        ws.send({"type": "push_subscribe", "provider": "fcm", "token": "abc"})
        assert_error(ws.recv(), "push_disabled")
    reply = http_request(relay.port, "GET", "/api/push/vapid-public-key")
    assert reply.status == 404 and reply.json["code"] == "push_disabled"


# FCM and APNs


def test_fcm_gets_a_data_only_message_with_a_cached_oauth_token(start_relay, ca, fcm, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, min_interval_s="0", fcm_project=fcm.project,
                                          fcm_key_file=str(fcm.key_file), fcm_url=fcm.origin))
    token = "dGVzdA:APA91b" + "x" * 140
    subscribed_offline(relay, {"provider": "fcm", "token": token})
    send_from_b(relay, 1)
    fcm.wait_for(1, scaled(10))
    settled(relay)
    send_from_b(relay, 1)
    got = fcm.wait_for(2, scaled(10))
    assert [g["data"] for g in got] == [{"type": "wake", "queued": "1"}, {"type": "wake", "queued": "2"}]
    assert got[0]["token"] == token and got[0]["collapse_key"] == "wake"
    assert fcm.grants == 1
    fcm.answer(404)
    send_from_b(relay, 1)
    wait_until(lambda: stored_subscriptions(relay) == [], "the unregistered token to go", timeout=scaled(10))


def test_tokens_fcm_calls_unregistered_or_invalid_are_removed_and_no_other_error_removes_one(start_relay, ca, fcm,
                                                                                                tmp_path):
    section = push_section(ca, tmp_path, min_interval_s="0", fcm_project=fcm.project, fcm_key_file=str(fcm.key_file),
                           fcm_url=fcm.origin)
    relay = start_relay(push=section)
    uninstalled, invalid, kept = (f"tok{n}:APA91b" + "x" * 140 for n in range(3))
    fcm.unregistered.add(uninstalled)
    fcm.invalid.add(invalid)
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        for token in (uninstalled, invalid, kept):
            subscribe(ws, {"provider": "fcm", "token": token})
    send_from_b(relay, 1)
    wait_until(lambda: [s.target for s in stored_subscriptions(relay)] == [kept], "the two dead tokens to go",
               timeout=scaled(10))
    settled(relay)
    assert [r["token"] for r in fcm.received] == [kept] and pushes(relay)[("fcm", "gone")] == 2
    fcm.answer(400)  # a payload FCM refuses (a BadRequest naming a data field): the token is not to blame
    send_from_b(relay, 1)
    settled(relay)
    assert pushes(relay)[("fcm", "failed")] == 1 and [s.target for s in stored_subscriptions(relay)] == [kept]
    misconfigured = start_relay(push={**section, "fcm_project": "another-project"})  # its URL answers a plain 404
    subscribed_offline(misconfigured, {"provider": "fcm", "token": kept})
    send_from_b(misconfigured, 1)
    settled(misconfigured)
    assert pushes(misconfigured)[("fcm", "failed")] == 1
    assert [s.target for s in stored_subscriptions(misconfigured)] == [kept]


def test_apns_gets_a_background_push_over_http2(ca, apns, start_relay, tmp_path):  # the relay stops first
    relay = start_relay(push=push_section(ca, tmp_path, min_interval_s="0", apns_key_file=str(apns.key_file),
                                          apns_key_id=apns.key_id, apns_team_id=apns.team_id,
                                          apns_topic=apns.topic, apns_url=apns.origin))
    token = "ab" * 32
    subscribed_offline(relay, {"provider": "apns", "token": token.upper()})
    send_from_b(relay, 2)
    got = apns.wait_for(1, scaled(10))
    assert got[0]["token"] == token and got[0]["collapse_id"] == "wake"
    assert got[0]["payload"]["type"] == "wake" and set(got[0]["payload"]) == {"aps", "type", "queued"}
    settled(relay)
    apns.answer(410)
    send_from_b(relay, 1)
    wait_until(lambda: stored_subscriptions(relay) == [], "the unregistered token to go", timeout=scaled(10))


def test_apns_pushes_share_one_http2_connection_and_a_closed_one_is_replaced(ca, apns, start_relay, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, min_interval_s="0", apns_key_file=str(apns.key_file),
                                          apns_key_id=apns.key_id, apns_team_id=apns.team_id,
                                          apns_topic=apns.topic, apns_url=apns.origin))
    subscribed_offline(relay, {"provider": "apns", "token": "cd" * 32})
    for n in (1, 2):
        send_from_b(relay, 1)
        apns.wait_for(n, scaled(10))
        settled(relay)
    assert apns.connections == 1
    apns.hang_up()  # as Apple does with a connection idle for long: the next push opens a new one
    wait_until(lambda: not relay.server.push.providers["apns"].client.connected, "the relay to see the hang-up",
               timeout=scaled(10))
    send_from_b(relay, 1)
    apns.wait_for(3, scaled(10))
    settled(relay)
    assert apns.connections == 2 and len(apns.received) == 3
    assert pushes(relay) == {("apns", "sent"): 3}


def test_an_idle_http2_connection_is_closed_and_the_next_request_opens_another(ca, apns):
    async def main() -> None:
        client = Http2Client("127.0.0.1", apns.port, ssl.create_default_context(cafile=str(ca.ca_file)), idle_s=0.3)
        ping = [(":method", "POST"), (":scheme", "https"), (":path", "/"), (":authority", f"127.0.0.1:{apns.port}")]
        try:
            answers = await asyncio.gather(*(client.request(ping, b"", timeout_s=scaled(5), max_bytes=64)
                                             for _ in range(3)))  # concurrent: three streams on one connection
            assert [a.status for a in answers] == [404] * 3 and client.opened == 1
            async with asyncio.timeout(scaled(10)):
                while client.connected:
                    await asyncio.sleep(0.02)
            assert (await client.request(ping, b"", timeout_s=scaled(5), max_bytes=64)).status == 404
            assert client.opened == 2
        finally:
            await client.close()
    asyncio.run(main())
    assert apns.connections == 2


# Durability, several instances, start-up


def test_a_restart_keeps_subscriptions_and_the_vapid_key(start_relay, ca, webpush, tmp_path):
    db = str(tmp_path / "relay.db")
    section = push_section(ca, tmp_path)
    relay = start_relay(store=SQLiteStore(db), storage={"backend": "sqlite", "path": db}, push=section)
    subscribed_offline(relay, {"subscription": webpush.device().subscription()})
    key = http_request(relay.port, "GET", "/api/push/vapid-public-key").json["publicKey"]
    relay.stop()
    again = start_relay(store=SQLiteStore(db), storage={"backend": "sqlite", "path": db}, push=section)
    assert http_request(again.port, "GET", "/api/push/vapid-public-key").json["publicKey"] == key
    send_from_b(again, 1)
    assert webpush.wait_for(1, scaled(10))[0]["payload"] == {"type": "wake", "queued": 1}


def test_without_the_extra_push_enabled_is_a_configuration_error_and_the_relay_runs_without_push(tmp_path):
    env = without_modules(tmp_path, "cryptography", "h2")
    for check in (("--check-config",), ()):
        done = run_cli(tmp_path, "--set", "push.enabled=true", "--set", f"push.vapid_subject={SUBJECT}",
                       "--set", "storage.backend=memory", "--port", "0", *check, env=clean_env(**env))
        assert done.returncode == 2, done.stderr
        assert "[push]' (cryptography is missing)" in done.stderr and "cryptography" in done.stderr
    relay = ProcessRelay(tmp_path, env={**env, "RELAYD_STORAGE_PATH": str(tmp_path / "relayd.db")})
    try:
        reply = relay.http("GET", "/api/push/vapid-public-key")
        assert reply.status == 404 and reply.json["code"] == "push_disabled"
        with relay.ws() as ws:
            ws.auth(ADDR_B)
            assert_answered(ws, msg(ADDR_A, "m1"), "queued")
    finally:
        assert relay.stop() == 0


@pytest.mark.parametrize("setting,needle", [
    ("push.vapid_subject=ops@example.org", "vapid_subject"),
    ("push.fcm_project=p", "fcm_project and fcm_key_file"),
    ("push.apns_topic=org.example", "apns_key_file"),
])
def test_bad_push_settings_exit_2_naming_the_key(tmp_path, setting, needle):
    done = run_cli(tmp_path, "--set", "push.enabled=true", "--set", f"push.vapid_subject={SUBJECT}",
                   "--set", setting, "--set", "storage.backend=memory", "--check-config")
    assert done.returncode == 2 and needle in done.stderr, done.stderr


def test_two_instances_on_redis_send_exactly_one_push_per_message(relay_cluster, redis_server, ca, webpush,
                                                                   tmp_path):
    env = {f"RELAYD_PUSH_{k.upper()}": v for k, v in push_section(ca, tmp_path, min_interval_s="0").items()}
    nodes = relay_cluster(redis_server, **env)
    keys = {http_request(n.port, "GET", "/api/push/vapid-public-key").json["publicKey"] for n in nodes}
    assert len(keys) == 1  # one key file, whichever instance made it
    ws, _ = signed_login(nodes[0], KEY_A)
    with ws:
        subscribe(ws, {"subscription": webpush.device().subscription()})
        with connect(nodes[1], ADDR_B) as b:  # online on the other instance: delivered, no push
            assert_answered(b, msg(ADDR_A, "live"), "delivered")
        ws.recv_type("message")
    wait_until(lambda: all(not online(n, ADDR_A) for n in nodes), "A to be offline everywhere")
    for i in range(4):
        send_from_b(nodes[i % 2], 1)
        got = webpush.wait_for(i + 1, scaled(10))
        assert got[-1]["payload"] == {"type": "wake", "queued": i + 1}
    sent = [pushes(n).get(("webpush", "sent"), 0) for n in nodes]
    assert sent == [2, 2] and len(webpush.received) == 4


# The client library and the command line


def test_the_client_library_subscribes_and_unsubscribes(start_relay, ca, webpush, tmp_path):
    from relayd.client import Identity, RelayClient
    relay = start_relay(push=push_section(ca, tmp_path))
    device = webpush.device()

    async def body() -> None:
        async with RelayClient(relay.url, Identity.generate(), timeout=scaled(10)) as client:
            key = await client.vapid_public_key()
            assert key == http_request(relay.port, "GET", "/api/push/vapid-public-key").json["publicKey"]
            answer = await client.push_subscribe(device.subscription())
            assert answer["type"] == "push_subscribed"
            refused = await client.push_subscribe(provider="apns", token="ab" * 32)
            assert refused["type"] == "error" and refused["code"] == "push_provider_unavailable"
            assert (await client.push_unsubscribe(answer["id"]))["type"] == "push_unsubscribed"
            assert (await client.push_unsubscribe(answer["id"]))["code"] == "subscription_not_found"
    asyncio.run(body())


def test_relayd_listen_subscribes_a_web_push_endpoint(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path))
    key_file = tmp_path / "listener.key"
    address = json.loads(cli_ok(tmp_path, "keygen", "--out", str(key_file)).stdout)["address"].lower()
    device = webpush.device()
    done = cli_ok(tmp_path, "listen", "--relay", relay.url, "--as", str(key_file), "--timeout", "1",
                  "--push", json.dumps(device.subscription()))
    first = json.loads(done.stdout.splitlines()[0])
    assert first["type"] == "push_subscribed"
    assert [s.id for s in stored_subscriptions(relay, address)] == [first["id"]]
    send_from_b(relay, 1, to=address)
    assert webpush.wait_for(1, scaled(10))[0]["payload"] == {"type": "wake", "queued": 1}


def test_relayd_push_test_sends_one_push_with_the_configuration(ca, webpush, tmp_path):
    device = webpush.device()
    settings = [a for k, v in push_section(ca, tmp_path).items() for a in ("--set", f"push.{k}={v}")]
    done = cli_ok(tmp_path, "push-test", "--set", "storage.backend=memory", *settings,
                  "--subscription", json.dumps(device.subscription()))
    assert json.loads(done.stdout)["status"] == 201
    assert webpush.wait_for(1, scaled(10))[0]["payload"] == {"type": "wake", "queued": 0}
    strict = [*settings, "--set", "push.allow_private_endpoints=false"]
    refused = run_cli(tmp_path, "push-test", "--set", "storage.backend=memory", *strict,
                      "--subscription", json.dumps(device.subscription()))
    assert refused.returncode == 1 and "endpoint_not_allowed" in refused.stderr


def test_subscriptions_expire_unless_their_address_signs_in(start_relay, ca, webpush, tmp_path, manual_clock):
    day = 86400
    relay = start_relay(clock=manual_clock, push=push_section(ca, tmp_path, subscription_days="1"))
    subscribed_offline(relay, {"subscription": webpush.device().subscription()})

    def expiry() -> list[int]:
        return [s.expires_at for s in relay.call(relay.server.store.push_subscriptions(
            ADDR_A, int(manual_clock.wall() * 1000)))]
    first = expiry()
    manual_clock.advance(0.6 * day)
    ws, _ = signed_login(relay, KEY_A)
    ws.close()
    wait_until(lambda: expiry() != first, "the sign-in to extend the subscription")
    manual_clock.advance(0.6 * day)  # 1.2 days after subscribing, 0.6 after the sign-in
    send_from_b(relay, 1)
    assert webpush.wait_for(1, scaled(10))[0]["payload"]["type"] == "wake"
    manual_clock.advance(0.5 * day)
    assert expiry() == []
    wait_until(lambda: relay.call(relay.server.store.push_subscriptions(ADDR_A, 0)) == [], "the sweep to delete it",
               timeout=scaled(30))


def test_subscriptions_per_client_ip_are_limited(start_relay, ca, webpush, tmp_path):
    relay = start_relay(push=push_section(ca, tmp_path, subscribes_per_ip_per_hour="2"))
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        subscribe(ws, {"subscription": webpush.device().subscription()})
        subscribe(ws, {"subscription": webpush.device().subscription()})
        ws.send({"type": "push_subscribe", "subscription": webpush.device().subscription()})
        assert_error(ws.recv(), "rate_limited")
    assert len(stored_subscriptions(relay)) == 2


def test_subscriptions_count_in_the_storage_budget_until_they_expire(start_on, ca, webpush, tmp_path, manual_clock):
    """Was: subscriptions (up to 2.3 KB each, 5000 subscribes per IP per hour) were outside [storage] max_bytes,
    and on Redis they expired by TTL, which no counter could follow."""
    budget, day = 4096, 86400
    section = push_section(ca, tmp_path, max_subscriptions_per_address="100", subscription_days="1")
    relay = start_on(clock=manual_clock, storage={"max_bytes": budget}, push=section)
    subs = [webpush.device().subscription() for _ in range(16)]
    each = push_bytes(subs[0]["endpoint"], subs[0]["keys"]["p256dh"], subs[0]["keys"]["auth"])
    fits = budget // each
    assert stored_bytes(relay) == 0
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        answers = []
        for sub in subs:
            ws.send({"type": "push_subscribe", "subscription": sub})
            answers.append(ws.recv())
        assert [a["type"] for a in answers] == ["push_subscribed"] * fits + ["error"] * (len(subs) - fits)
        assert_error(answers[-1], "storage_unavailable")
        assert "budget" in answers[-1]["message"]
        assert stored_bytes(relay) == fits * each
        assert subscribe(ws, {"subscription": subs[0]}) == answers[0]["id"]  # the same device renews when full
        ws.send({"type": "push_unsubscribe", "id": answers[1]["id"]})
        assert ws.recv()["type"] == "push_unsubscribed"
        assert stored_bytes(relay) == (fits - 1) * each
        subscribe(ws, {"subscription": subs[-1]})
        assert stored_bytes(relay) == fits * each
    relay.stop()
    again = start_on(clock=manual_clock, storage={"max_bytes": budget}, push=section)
    wait_until(lambda: stored_bytes(again) == fits * each, "the count to be read back", timeout=scaled(15))
    manual_clock.advance(1.5 * day)
    wait_until(lambda: stored_bytes(again) == 0, "housekeeping to expire them and uncount them", timeout=scaled(30))
    assert again.call(again.server.store.push_subscriptions(ADDR_A, 0)) == []


def test_a_full_store_still_takes_a_subscription_that_pushes_out_an_as_large_one(start_relay, ca, webpush, tmp_path):
    subs = [webpush.device().subscription() for _ in range(3)]
    each = push_bytes(subs[0]["endpoint"], subs[0]["keys"]["p256dh"], subs[0]["keys"]["auth"])
    relay = start_relay(storage={"max_bytes": 2 * each + each // 2},
                        push=push_section(ca, tmp_path, max_subscriptions_per_address="2"))
    ws, _ = signed_login(relay, KEY_A)
    with ws:
        earlier = {subscribe(ws, {"subscription": sub}) for sub in subs[:2]}
        third = subscribe(ws, {"subscription": subs[2]})  # the address is at its cap: its oldest goes
    kept = {s.id for s in stored_subscriptions(relay)}
    assert len(kept) == 2 and third in kept and len(kept & earlier) == 1
    assert stored_bytes(relay) == 2 * each
    ws, _ = signed_login(relay, KEY_B)
    with ws:  # another address has nothing to push out
        ws.send({"type": "push_subscribe", "subscription": webpush.device().subscription()})
        assert_error(ws.recv(), "storage_unavailable")
    assert stored_bytes(relay) == 2 * each


def stored_bytes(relay: Any) -> int:
    return int(relay.server.store.stored_bytes())

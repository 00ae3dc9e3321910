"""Abuse limits: per-IP connection caps and rates, sign-in attempt limits, frame floods,
oversize frames before auth, readers that stop reading, new-queue limits, the online list.

Everything runs against real relays on 127.0.0.1 with small limits, and every
loop is bounded so a regression fails instead of hanging.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import pytest
from support import (EVENT_LOOPS, KEY_A, KEY_B, RawWs, addr, assert_error, assert_exchange, backlog_bytes, key_body,
                     online, pong_next, queue_size, read_backlog, read_until_closed, signed_auth_frame, wait_until)
from websockets.exceptions import ConnectionClosed, InvalidStatus

SENDER = "0x" + "51" * 20
PEER = "0x" + "52" * 20
OTHER = "0x" + "53" * 20
READER = "0x" + "54" * 20
BIG = 60_000  # characters of one large message (below the 64 KiB default content limit)


# Helpers


def xff(ip: str) -> dict[str, Any]:
    return {"additional_headers": {"X-Forwarded-For": ip}}


def refused_handshake(relay: Any, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        relay.ws(**kwargs).close()
    return info.value


def assert_rate_limited_response(exc: InvalidStatus) -> None:
    response = exc.response
    assert response.status_code == 429, response
    assert json.loads(response.body)["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1


# Per-IP connection caps


def test_connection_cap_per_client_ip(start_relay) -> None:
    relay = start_relay(limits={"max_connections_per_ip": 3}, server={"trusted_proxies": "127.0.0.1"})
    held = [relay.ws(**xff("10.0.0.1")) for _ in range(3)]
    try:
        assert_rate_limited_response(refused_handshake(relay, **xff("10.0.0.1")))
        # Another client IP behind the same proxy is unaffected, and so is the proxy itself.
        with relay.ws(**xff("10.0.0.2")) as other, relay.ws(**xff("10.0.0.2")) as peer:
            other.auth(OTHER)
            peer.auth(PEER)
            assert_exchange(other, peer, PEER, "cap-1")
        with relay.ws() as direct:
            direct.auth(SENDER)
        # The held connections still work.
        held[0].auth(READER)
        held[0].send({"type": "ping"})
        assert held[0].recv_type("pong")
        # Closing one frees a slot.
        held.pop().close()

        def reconnects() -> bool:
            try:
                held.append(relay.ws(**xff("10.0.0.1")))
                return True
            except InvalidStatus:
                return False
        wait_until(reconnects, "a free slot for 10.0.0.1 once one of its connections closed", timeout=3)
    finally:
        for client in held:
            client.close()


def test_forwarded_for_from_untrusted_peer_does_not_escape_the_cap(start_relay) -> None:
    relay = start_relay(limits={"max_connections_per_ip": 2})
    first = relay.ws(**xff("10.0.0.1"))
    second = relay.ws(**xff("10.0.0.2"))
    try:
        assert_rate_limited_response(refused_handshake(relay, **xff("10.0.0.3")))
        assert_rate_limited_response(refused_handshake(relay))
    finally:
        first.close()
        second.close()


def test_new_connection_rate_per_client_ip(start_relay, manual_clock) -> None:
    relay = start_relay(limits={"connections_per_ip_per_s": 2, "connection_burst_per_ip": 4},
                        server={"trusted_proxies": "127.0.0.1"}, clock=manual_clock)
    accepted = 0
    refusal: InvalidStatus | None = None
    for _ in range(12):
        try:
            relay.ws(**xff("10.0.0.5")).close()
            accepted += 1
        except InvalidStatus as exc:
            refusal = exc
            break
    assert refusal is not None, f"all {accepted} connections were accepted"
    assert_rate_limited_response(refusal)
    assert accepted == 4, accepted  # the burst, and the clock stood still
    # Other client IPs are not throttled by it.
    with relay.ws(**xff("10.0.0.6")) as other:
        other.auth(OTHER)
    # The bucket refills at 2/s: one more after half a second, and no second one.
    manual_clock.advance(0.5)
    relay.ws(**xff("10.0.0.5")).close()
    assert_rate_limited_response(refused_handshake(relay, **xff("10.0.0.5")))


def test_connections_count_from_accept_and_rest_ones_only_while_open(start_relay) -> None:
    relay = start_relay(limits={"max_connections_per_ip": 2, "connections_per_ip_per_s": 1,
                                "connection_burst_per_ip": 1})
    with relay.ws() as client:
        for _ in range(5):
            assert relay.http("GET", "/health").status == 200
        client.auth(SENDER)
        idle = socket.create_connection(("127.0.0.1", relay.port))  # counted from accept, before any byte
        try:
            wait_until(lambda: relay.http("GET", "/health").status == 429, "a third connection refused")
        finally:
            idle.close()
        wait_until(lambda: relay.http("GET", "/health").status == 200, "the idle connection's slot freed")


# Sign-in attempts


def test_signature_checks_per_ip_are_limited(start_relay) -> None:
    relay = start_relay(limits={"auth_attempts_per_ip_per_min": 3}, server={"trusted_proxies": "127.0.0.1"})
    attacker = xff("10.1.1.1")
    for _ in range(3):
        with relay.ws(**attacker) as client:
            challenge = client.recv()
            client.send(signed_auth_frame(KEY_A, challenge, issued=challenge["issuedAt"] + 1))  # a bad signature
            error = client.recv()
            assert error["type"] == "error" and error["code"] == "auth_failed", error
    # The 4th check from that IP is refused before any verification, even with a good signature.
    with relay.ws(**attacker) as client:
        challenge = client.recv()
        client.send(signed_auth_frame(KEY_A, challenge))
        error = client.recv()
        assert error["type"] == "error" and error["code"] == "rate_limited", error
        client.send({"type": "ping", "messageId": "after"})  # still open, unauthenticated, nothing else pending
        assert_error(client.recv(), "not_authenticated", "after")
    # Signed key writes from that IP share the budget.
    body = key_body(KEY_A, base64.b64encode(bytes(32)).decode(), int(time.time()))
    reply = relay.http("POST", "/api/public-keys", body, headers={"X-Forwarded-For": "10.1.1.1"})
    assert reply.status == 429 and reply.json["code"] == "rate_limited", reply
    # Another client IP still signs in and publishes.
    with relay.ws(**xff("10.1.1.2")) as client:
        challenge = client.recv()
        client.send(signed_auth_frame(KEY_B, challenge))
        success = client.recv()
        assert success["type"] == "auth_success" and success["verified"] is True, success
    reply = relay.http("POST", "/api/public-keys", body, headers={"X-Forwarded-For": "10.1.1.2"})
    assert reply.status == 200, reply


# Frame floods


def test_frame_flood_is_refused_then_closed_while_others_flow(start_relay, manual_clock) -> None:
    relay = start_relay(limits={"frames_per_s": 5, "frame_burst": 5, "rate_limited_close_after": 10},
                        clock=manual_clock)
    with relay.ws() as flooder, relay.ws() as sender, relay.ws() as receiver:
        flooder.auth(OTHER)
        sender.auth(SENDER)
        receiver.auth(PEER)
        sent = 0
        try:
            for _ in range(60):
                flooder.send({"type": "ping"})
                sent += 1
        except ConnectionClosed:
            pass
        # Other connections are served while and after the flooder is cut.
        assert_exchange(sender, receiver, PEER, "flood-1")
        close, frames = read_until_closed(flooder)
        assert close is not None and close.code == 1008, close
        # The relay's clock stands still (the frame limiter reads it, however long the flood takes in real time):
        # the burst of 5 (auth took one) is all it gets. Strikes reset only on an admitted frame; the 10th refusal
        # in a row closes without a frame.
        assert [f["type"] for f in frames] == ["pong"] * 4 + ["error"] * 9, frames
        assert all(f["code"] == "rate_limited" for f in frames[4:]), frames
        assert sent > len(frames)
        assert_exchange(sender, receiver, PEER, "flood-2")
        assert_exchange(receiver, sender, SENDER, "flood-3")
    assert relay.http("GET", "/health").status == 200


def test_rate_limited_frames_are_not_processed(start_relay, manual_clock) -> None:
    relay = start_relay(limits={"frames_per_s": 1, "frame_burst": 3, "rate_limited_close_after": 100},
                        clock=manual_clock)
    with relay.ws() as sender, relay.ws() as receiver:
        receiver.auth(PEER)
        sender.auth(SENDER)
        for i in range(6):
            sender.send({"type": "message", "to": PEER, "content": "x", "messageId": f"rl-{i}"})
        answers = [sender.recv() for _ in range(6)]
        # Burst 3, one taken by auth, and the relay's clock stands still however slowly these arrive.
        assert [(a["type"], a["messageId"]) for a in answers[:2]] == [("delivered", "rl-0"), ("delivered", "rl-1")]
        for answer in answers[2:]:
            assert_error(answer, "rate_limited")
        assert [receiver.recv()["messageId"] for _ in range(2)] == ["rl-0", "rl-1"]
        pong_next(receiver)


def test_the_frame_limiter_takes_its_time_from_the_relays_clock(start_relay, manual_clock) -> None:
    """Frames spaced out in real time but not on the relay's clock are limited; moving the clock refills."""
    relay = start_relay(limits={"frames_per_s": 100, "frame_burst": 2, "rate_limited_close_after": 100},
                        clock=manual_clock)
    with relay.ws() as client:
        client.auth(SENDER)  # the first token
        client.send({"type": "ping"})
        assert client.recv()["type"] == "pong"  # the second: the bucket is empty
        # Real time must pass here, that is the point: at 100 frames/s the loop's clock would refill it 20 times.
        spaced = time.monotonic() + 0.2
        wait_until(lambda: time.monotonic() >= spaced, "real time to pass")
        client.send({"type": "ping"})
        assert_error(client.recv(), "rate_limited")
        manual_clock.advance(1)  # refills the burst of 2
        for answer in ("pong", "pong", "error"):
            client.send({"type": "ping"})
            assert client.recv()["type"] == answer


# Oversize frames before auth


def test_oversize_frame_before_auth_is_refused_and_closed(relay) -> None:
    with relay.ws() as client:
        assert client.recv()["type"] == "challenge"
        client.send(json.dumps({"type": "auth", "address": SENDER, "pad": "x" * 5000}))
        error = client.recv()
        assert error["type"] == "error" and error["code"] == "message_too_large", error
        close, frames = read_until_closed(client)
        assert close is not None and close.code == 1009 and not frames, (close, frames)


def test_frame_at_the_preauth_limit_is_accepted(relay) -> None:
    with relay.ws() as client:
        frame = {"type": "auth", "address": SENDER, "pad": ""}
        frame["pad"] = "x" * (4096 - len(json.dumps(frame)))
        text = json.dumps(frame)
        assert len(text.encode()) == 4096
        client.send(text)
        assert client.recv_type("auth_success")["address"] == SENDER


def test_large_frames_are_fine_after_auth(relay) -> None:
    with relay.ws() as client:
        client.auth(SENDER)
        client.send({"type": "message", "to": PEER, "content": "x" * 20000, "messageId": "big-1"})
        assert client.recv_type("queued")["messageId"] == "big-1"


def test_preauth_limit_counts_bytes_not_characters(relay) -> None:
    """Multi-byte text must not pass the byte limit (it once compared characters)."""
    with relay.ws() as client:
        assert client.recv()["type"] == "challenge"
        text = json.dumps({"type": "ping", "pad": "\u20ac" * 1400}, ensure_ascii=False)
        assert len(text) < 4096 < len(text.encode())
        client.send(text)
        error = client.recv()
        assert error["type"] == "error" and error["code"] == "message_too_large", error
        close, _ = read_until_closed(client)
        assert close is not None and close.code == 1009, close


# Readers that stop reading


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
@pytest.mark.parametrize("ack", [True, False], ids=["ack", "plain"])
def test_reader_that_never_reads_is_cut_off(start_relay, ack: bool, event_loop: str) -> None:
    relay = start_relay(limits={"max_message_bytes": BIG, "max_outbound_bytes": 2 * BIG + 16384,
                                "max_inbound_bytes": 2 * BIG + 16384}, queue={"max_offline_bytes": 64 * 1024 * 1024},
                        server={"event_loop": event_loop})
    reader = RawWs(relay.port, rcvbuf=4096)
    try:
        assert reader.recv_json()["type"] == "challenge"
        reader.send_json({"type": "auth", "address": READER, "ack": ack})
        assert reader.recv_json()["type"] == "auth_success"
        # From here on the reader never reads again.
        with relay.ws() as sender, relay.ws() as peer:
            sender.auth(SENDER)
            peer.auth(PEER)
            answers = []
            for i in range(400):
                sender.send({"type": "message", "to": READER, "content": "r" * BIG, "messageId": f"slow-{i}"})
                answer = sender.recv(timeout=5)
                assert answer["type"] in ("delivered", "queued") and answer["messageId"] == f"slow-{i}", answer
                answers.append(answer["type"])
                if answer["type"] == "queued":
                    break
            assert answers[-1] == "queued", "the reader was never cut off after 400 large messages"
            assert len(answers) > 3, "cut off before its buffer could have filled"
            wait_until(lambda: not online(relay, READER), "the cut-off reader to be offline")
            # The relay stays responsive for everyone else.
            assert relay.http("GET", "/health").status == 200
            assert_exchange(sender, peer, PEER, "after-cut-1")
            assert_exchange(peer, sender, SENDER, "after-cut-2")
        # Ack mode keeps every message until it is acked; a plain session keeps every message whose bytes its
        # peer never acknowledged (it read nothing, through a window smaller than one message): all of them.
        kept = [f"slow-{i}" for i in range(len(answers))]
        wait_until(lambda: queue_size(relay, READER) == len(kept), f"{len(kept)} messages kept for the reader")
        with relay.ws() as again:
            again.auth(READER, ack=True)
            assert [(f["messageId"], f["queued"]) for f in read_backlog(again)] == [(mid, True) for mid in kept]
    finally:
        reader.close()


def _queue_backlog(relay: Any, count: int) -> None:
    with relay.ws() as sender:
        sender.auth(SENDER)
        for i in range(count):
            sender.send({"type": "message", "to": READER, "content": "b" * BIG, "messageId": f"bl-{i}"})
            assert sender.recv_type("queued")["messageId"] == f"bl-{i}"


def _read_backlog(relay: Any, ack: bool, count: int) -> tuple[list[str], bool]:
    """A reader with a small TCP window that reads as fast as it can; returns (ids, finished)."""
    reader = RawWs(relay.port, rcvbuf=4096)
    ids: list[str] = []
    finished = False
    try:
        reader.send_json({"type": "auth", "address": READER, "ack": ack})
        while True:
            frame = reader.recv_json()
            if frame["type"] == "message":
                ids.append(frame["messageId"])
            if (ack and frame["type"] == "queue_empty") or (not ack and len(ids) == count):
                finished = True
                break
    except (ConnectionError, OSError):
        pass
    finally:
        reader.close()
    return ids, finished


BACKLOG = -(-backlog_bytes() // BIG)  # more than the kernel's socket buffers plus max_outbound_bytes


def test_reading_client_receives_a_large_backlog(start_relay) -> None:
    """A client that reads, but through a small TCP window, gets its whole backlog: the flush
    waits for the socket instead of overrunning max_outbound_bytes and being cut off."""
    relay = start_relay()
    _queue_backlog(relay, BACKLOG)
    ids, finished = _read_backlog(relay, True, BACKLOG)
    assert finished and ids == [f"bl-{i}" for i in range(BACKLOG)], f"got {len(ids)} of {BACKLOG}"


def test_backlog_flush_never_loses_messages(start_relay) -> None:
    """Every queued message is either received or still queued, whatever happens to the flush."""
    relay = start_relay()
    _queue_backlog(relay, BACKLOG)
    ids, _ = _read_backlog(relay, False, BACKLOG)
    assert len(set(ids)) == len(ids)
    left = queue_size(relay, READER)
    assert len(ids) + left == BACKLOG, f"received {len(ids)}, still queued {left}: {BACKLOG - len(ids) - left} lost"


# New queues per sender


def test_new_queues_per_sender_are_limited(start_relay) -> None:
    relay = start_relay(limits={"new_queues_per_sender_per_hour": 3})
    with relay.ws() as sender, relay.ws() as online_peer, relay.ws() as other_sender:
        sender.auth(SENDER)
        online_peer.auth(PEER)
        other_sender.auth(OTHER)
        for n in range(1, 4):
            sender.send({"type": "message", "to": addr(n), "content": "x", "messageId": f"nq-{n}"})
            assert sender.recv_type("queued")["messageId"] == f"nq-{n}"
        sender.send({"type": "message", "to": addr(4), "content": "x", "messageId": "nq-4"})
        refusal = sender.recv()
        assert refusal["type"] == "error" and refusal["code"] == "rate_limited", refusal
        assert refusal["messageId"] == "nq-4"
        assert queue_size(relay, addr(4)) == 0
        # Queues already opened this hour still take messages; online delivery is not limited.
        sender.send({"type": "message", "to": addr(2), "content": "y", "messageId": "nq-2b"})
        assert sender.recv_type("queued")["messageId"] == "nq-2b"
        assert_exchange(sender, online_peer, PEER, "nq-live")
        # The connection stays open and the limit is per sender.
        pong_next(sender)
        other_sender.send({"type": "message", "to": addr(4), "content": "x", "messageId": "nq-other"})
        assert other_sender.recv_type("queued")["messageId"] == "nq-other"
        sender.send({"type": "message", "to": addr(5), "content": "x", "messageId": "nq-5"})
        assert sender.recv()["code"] == "rate_limited"


# The online list


def test_online_list_is_disabled_in_mixed_mode_by_default(relay) -> None:
    with relay.ws() as client:
        client.auth(SENDER)
        reply = relay.http("GET", "/api/status/online/all")
        assert reply.status == 404 and reply.json["code"] == "disabled", reply
        assert SENDER.encode() not in reply.body
        # Asking about one known address stays possible.
        assert online(relay, SENDER) is True


@pytest.mark.parametrize("auth,privacy", [
    ({"mode": "mixed"}, {"expose_online_list": "true"}),
    ({"mode": "open"}, {}),
])
def test_online_list_enabled_by_setting_or_open_mode(start_relay, auth: dict, privacy: dict) -> None:
    relay = start_relay(auth=auth, privacy=privacy)
    reply = relay.http("GET", "/api/status/online/all")
    assert reply.status == 200 and reply.json["users"] == [], reply
    with relay.ws() as client:
        client.auth(SENDER)
        assert relay.http("GET", "/api/status/online/all").json["users"] == [SENDER]


@pytest.mark.parametrize("auth,privacy", [
    ({"mode": "open"}, {"expose_online_list": "false"}),
    ({"mode": "signed"}, {}),
])
def test_online_list_disabled_by_setting_or_signed_mode(start_relay, auth: dict, privacy: dict) -> None:
    relay = start_relay(auth=auth, privacy=privacy)
    reply = relay.http("GET", "/api/status/online/all")
    assert reply.status == 404 and reply.json["code"] == "disabled", reply

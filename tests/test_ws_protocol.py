"""The WebSocket wire protocol, frame by frame, against a real relay.

The relay runs in ``[auth] mode = open`` (the seed's protocol: no sign-in
challenge). Where a test must show that *nothing* was sent, it sends a
``ping`` and checks that the very next frame is the ``pong``: frames on one
connection are ordered, so this needs no sleeping.
"""

from __future__ import annotations

import json

import pytest
from support import (A, B, MIXED, MIXED_LOWER, RawWs, WsClient, assert_answered, assert_auth_success,
                     assert_auth_timed_out, assert_closed_with, assert_error, assert_exchange, assert_ms, connect,
                     message_frame, msg, now_ms, online, pong_next, queue_size, start_open, status_frame,
                     unauthenticated_probe, wait_until)
from websockets.frames import Close, Opcode


# Authentication


def test_auth_success_reports_lower_case_address_and_ms_timestamp(open_relay):
    with open_relay.ws() as a:
        a.send({"type": "auth", "address": A})
        assert_auth_success(a.recv(), A)


def test_eip55_mixed_case_address_is_accepted_and_reported_lower_case(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.send({"type": "auth", "address": MIXED})
        frame = a.recv()
        assert_auth_success(frame, MIXED_LOWER)
        assert frame["address"] == MIXED_LOWER
        b.auth(B)
        # The mixed-case spelling routes to the same user as the lower-case one.
        assert_answered(b, msg(MIXED, "m-eip55", "hello", timestamp=7), "delivered")
        assert a.recv() == message_frame(B, "hello", "m-eip55", 7, False)
        assert open_relay.http("GET", f"/api/status/{MIXED}").json["online"] is True


@pytest.mark.parametrize("bad", [
    "0x123",
    "1234567890123456789012345678901234567890ab",  # 42 chars, no 0x
    "0x" + "g" * 40,
    "0x" + "a" * 41,
    "0x" + "a" * 39,
    "",
    42,
    ["0x" + "a" * 40],
    "0X" + "a" * 40,
])
def test_invalid_address_is_refused_and_the_connection_stays_usable(open_relay, bad):
    with open_relay.ws() as a:
        a.send({"type": "auth", "address": bad})
        assert_error(a.recv(), "invalid_address")
        # Still unauthenticated, still open: a correct auth works afterwards.
        a.send({"type": "ping"})
        assert_error(a.recv(), "not_authenticated")
        a.send({"type": "auth", "address": A})
        assert_auth_success(a.recv(), A)
        pong_next(a)


@pytest.mark.parametrize("frame", [{"type": "auth"}, {"type": "auth", "address": None}])
def test_auth_without_address_is_missing_field(open_relay, frame):
    with open_relay.ws() as a:
        a.send(frame)
        assert_error(a.recv(), "missing_field")
        assert_auth_success(a.auth(A), A)


def test_second_auth_with_the_same_address_succeeds_again(open_relay):
    with open_relay.ws() as a:
        first = a.auth(A)
        a.send({"type": "auth", "address": A.upper().replace("0X", "0x")})
        again = a.recv()
        assert_auth_success(again, A)
        assert set(again) == set(first) and again.get("verified") == first.get("verified"), (first, again)
        pong_next(a)
        assert open_relay.http("GET", "/health").json["connections"] == 1


def test_second_auth_with_another_address_is_refused_and_the_session_keeps_its_identity(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        a.send({"type": "auth", "address": B})
        assert_error(a.recv(), "already_authenticated")
        # Still A: messages from this connection come from A, and B stays reachable.
        assert_answered(a, msg(B, "after-refusal", "x", timestamp=1), "delivered")
        assert b.recv() == message_frame(A, "x", "after-refusal", 1, False)
        assert open_relay.http("GET", "/api/status/online/all").json["users"].count(A) == 1


@pytest.mark.parametrize("frame", [
    {"type": "ping", "messageId": "p-1"},
    {"type": "message", "to": B, "content": "x", "messageId": "m-1"},
    {"type": "typing", "to": B, "isTyping": True, "messageId": "t-1"},
    {"type": "read_receipt", "to": B, "messageId": "r-1"},
    {"type": "ack", "messageIds": ["m-1"], "messageId": "a-1"},
])
def test_frames_before_auth_are_not_authenticated_with_message_id_echoed(open_relay, frame):
    with open_relay.ws() as a, open_relay.ws() as b:
        b.auth(B)
        a.send(frame)
        assert_error(a.recv(), "not_authenticated", frame["messageId"])
        frame_without_id = {k: v for k, v in frame.items() if k != "messageId"}
        if frame["type"] in ("ping", "typing", "ack"):
            a.send(frame_without_id)
            assert_error(a.recv(), "not_authenticated")
        # Nothing was routed to B.
        pong_next(b)
        assert queue_size(open_relay, B) == 0


def test_no_unsolicited_frame_in_open_mode(open_relay):
    """The seed protocol: the server speaks only when spoken to (no challenge frame)."""
    with open_relay.ws() as a:
        # Frames on a connection are ordered: a challenge sent on open would come first.
        a.send({"type": "ping", "messageId": "first"})
        assert_error(a.recv(), "not_authenticated", "first")
        a.send({"type": "auth", "address": A})
        assert_auth_success(a.recv(), A)


def test_auth_timeout_sends_error_then_closes_1008(start_relay):
    """A silent peer, on the real clock: the relay's own timer acts."""
    relay = start_open(start_relay, server={"auth_timeout_s": 0.3})
    with relay.ws() as a:
        assert_error(a.recv(timeout=5), "auth_timeout")
        assert assert_closed_with(a, 1008) == []


def test_auth_timeout_also_applies_after_a_failed_auth(start_relay, manual_clock):
    relay = start_open(start_relay, server={"auth_timeout_s": 0.3}, clock=manual_clock)
    with relay.ws() as a:
        a.send({"type": "auth", "address": "0xnope"})
        assert_error(a.recv(), "invalid_address")
        manual_clock.advance(0.3)
        assert_auth_timed_out(a)


def test_authenticated_sessions_are_not_timed_out(start_relay, manual_clock):
    relay = start_open(start_relay, server={"auth_timeout_s": 0.3}, clock=manual_clock)
    with relay.ws() as a, unauthenticated_probe(relay) as probe:
        a.auth(A)
        manual_clock.advance(0.9)  # three auth timeouts
        assert_auth_timed_out(probe)  # the timer has run past A's deadline too
        pong_next(a)
        assert online(relay, A) is True


# Messages


def test_live_message_exact_frames_with_sender_timestamp(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        assert_answered(a, msg(B, "uuid-1", "ZW5jcnlwdGVk", timestamp=1705234567890), "delivered")
        assert b.recv() == message_frame(A, "ZW5jcnlwdGVk", "uuid-1", 1705234567890, False)
        pong_next(a)
        pong_next(b)


def test_live_message_without_timestamp_gets_the_servers_ms(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        before = now_ms()
        assert_answered(a, msg(B, "no-ts", "x"), "delivered")
        frame = b.recv()
        after = now_ms()
        assert frame == message_frame(A, "x", "no-ts", frame["timestamp"], False)
        assert_ms(frame["timestamp"])
        assert before - 1000 <= frame["timestamp"] <= after + 1000


def test_integral_float_timestamp_is_delivered_as_an_integer(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        a.send('{"type":"message","to":"%s","content":"x","messageId":"f","timestamp":1705234567890.0}' % B)
        status_frame(a.recv(), "delivered", "f", B)
        raw = b.ws.recv(timeout=3)
        assert json.loads(raw) == message_frame(A, "x", "f", 1705234567890, False)
        assert '"timestamp":1705234567890,' in raw.replace(" ", "")


def test_message_to_a_mixed_case_recipient_reports_it_lower_case(open_relay):
    with open_relay.ws() as a:
        a.auth(A)
        assert_answered(a, msg(MIXED, "to-mixed"), "queued")
    assert queue_size(open_relay, MIXED_LOWER) == 1


BAD_FRAMES = [
    ("not json", "nope", "invalid_json", None),
    ("truncated json", '{"type":"message","to":', "invalid_json", None),
    ("array", "[1]", "invalid_frame", None),
    ("string", '"x"', "invalid_frame", None),
    ("number", "5", "invalid_frame", None),
    ("null", "null", "invalid_frame", None),
    ("no type", {"to": B, "content": "x", "messageId": "m1"}, "missing_field", "m1"),
    ("unknown type", {"type": "shout", "messageId": "m1"}, "unknown_type", "m1"),
    ("unknown type, no id", {"type": "shout"}, "unknown_type", None),
    ("missing to", {"type": "message", "content": "x", "messageId": "m1"}, "missing_field", "m1"),
    ("missing content", {"type": "message", "to": B, "messageId": "m1"}, "missing_field", "m1"),
    ("missing messageId", {"type": "message", "to": B, "content": "x"}, "missing_field", None),
    ("content number", {"type": "message", "to": B, "content": 5, "messageId": "m1"}, "invalid_field", "m1"),
    ("content object", {"type": "message", "to": B, "content": {"a": 1}, "messageId": "m1"}, "invalid_field",
     "m1"),
    ("timestamp string", {"type": "message", "to": B, "content": "x", "messageId": "m1", "timestamp": "5"},
     "invalid_field", "m1"),
    ("timestamp fraction", {"type": "message", "to": B, "content": "x", "messageId": "m1", "timestamp": 1.5},
     "invalid_field", "m1"),
    ("timestamp bool", {"type": "message", "to": B, "content": "x", "messageId": "m1", "timestamp": True},
     "invalid_field", "m1"),
    ("bad to", {"type": "message", "to": "0x12", "content": "x", "messageId": "m1"}, "invalid_address", "m1"),
    ("to not a string", {"type": "message", "to": 12, "content": "x", "messageId": "m1"}, "invalid_address", "m1"),
    ("typing isTyping string", {"type": "typing", "to": B, "isTyping": "yes"}, "invalid_field", None),
    ("typing isTyping number", {"type": "typing", "to": B, "isTyping": 1}, "invalid_field", None),
    ("typing no isTyping", {"type": "typing", "to": B}, "missing_field", None),
    ("typing no to", {"type": "typing", "isTyping": True}, "missing_field", None),
    ("typing bad to", {"type": "typing", "to": "bob", "isTyping": True}, "invalid_address", None),
    ("receipt no messageId", {"type": "read_receipt", "to": B}, "missing_field", None),
    ("receipt no to", {"type": "read_receipt", "messageId": "r1"}, "missing_field", "r1"),
    ("receipt bad to", {"type": "read_receipt", "to": "bob", "messageId": "r1"}, "invalid_address", "r1"),
    ("ack no messageIds", {"type": "ack"}, "missing_field", None),
    ("ack messageIds string", {"type": "ack", "messageIds": "m1"}, "invalid_field", None),
    ("ack messageIds numbers", {"type": "ack", "messageIds": [1, 2]}, "invalid_field", None),
    ("ack messageIds mixed", {"type": "ack", "messageIds": ["m1", None]}, "invalid_field", None),
]


@pytest.mark.parametrize("raw,code,mid", [case[1:] for case in BAD_FRAMES], ids=[case[0] for case in BAD_FRAMES])
def test_bad_frame_gets_exact_error_and_never_closes_the_connection(open_relay, raw, code, mid):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        a.send(raw)
        assert_error(a.recv(), code, mid)
        assert_exchange(a, b, B, "after-bad-frame")
        # The refused frame routed nothing to B.
        pong_next(b)


def test_non_string_message_id_is_invalid_field(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        for bad_id in (5, "", ["x"], True):
            a.send({"type": "message", "to": B, "content": "x", "messageId": bad_id})
            frame = a.recv()
            assert frame["type"] == "error" and frame["code"] == "invalid_field", frame
            # Echoing a scalar id back is allowed; an unhashable or empty one must not be invented.
            assert frame.get("messageId", bad_id) == bad_id, frame
        assert_exchange(a, b, B, "after-bad-ids")


def test_bad_frames_before_auth_get_their_own_codes(open_relay):
    with open_relay.ws() as a:
        for raw, code in (("nope", "invalid_json"), ("[1]", "invalid_frame"), ("{}", "missing_field")):
            a.send(raw)
            assert_error(a.recv(), code)
        assert_auth_success(a.auth(A), A)


def test_content_over_max_message_bytes_is_message_too_large(start_relay):
    relay = start_open(start_relay, limits={"max_message_bytes": 16})
    with relay.ws() as a, relay.ws() as b:
        a.auth(A)
        b.auth(B)
        a.send(msg(B, "big", "x" * 17))
        assert_error(a.recv(), "message_too_large", "big")
        assert_answered(a, msg(B, "fits", "x" * 16, timestamp=3), "delivered")
        assert b.recv() == message_frame(A, "x" * 16, "fits", 3, False)
        assert_exchange(a, b, B, "after-too-large")


def test_max_message_bytes_counts_utf8_bytes(start_relay):
    relay = start_open(start_relay, limits={"max_message_bytes": 16})
    with relay.ws() as a, relay.ws() as b:
        a.auth(A)
        b.auth(B)
        content = "é" * 9  # 9 characters, 18 bytes of UTF-8
        a.send(msg(B, "utf8", content))
        assert_error(a.recv(), "message_too_large", "utf8")


def test_content_at_the_limit_is_delivered_even_when_json_escaping_inflates_the_frame(start_relay):
    relay = start_open(start_relay, limits={"max_message_bytes": 1024})
    with relay.ws() as a, relay.ws() as b:
        a.auth(A)
        b.auth(B)
        content = "\x01" * 1024  # 1024 bytes of content; 6144 bytes once JSON-escaped
        assert_answered(a, msg(B, "escaped", content, timestamp=9), "delivered")
        assert b.recv() == message_frame(A, content, "escaped", 9, False)


def test_binary_frames_with_json_are_accepted_like_text(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.send(json.dumps({"type": "auth", "address": A}).encode())
        assert_auth_success(a.recv(), A)
        b.auth(B)
        a.send(json.dumps(msg(B, "bin", "payload", timestamp=11)).encode())
        status_frame(a.recv(), "delivered", "bin", B)
        assert b.recv() == message_frame(A, "payload", "bin", 11, False)
        a.send(b"\xff\xfe not utf-8")
        assert_error(a.recv(), "invalid_json")
        a.send(b'{"type":"ping"}')
        assert a.recv()["type"] == "pong"


def test_any_path_is_a_websocket_endpoint(open_relay):
    with WsClient(open_relay.url + "/some/deep/path?x=1") as a:
        assert_auth_success(a.auth(A), A)


# Typing, receipts, ping


def test_typing_reaches_the_online_recipient_exactly(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        a.send({"type": "typing", "to": B, "isTyping": True})
        assert b.recv() == {"type": "typing", "from": A, "isTyping": True}
        a.send({"type": "typing", "to": B.upper().replace("0X", "0x"), "isTyping": False})
        assert b.recv() == {"type": "typing", "from": A, "isTyping": False}
        pong_next(a)  # no answer to the sender


def test_typing_to_an_offline_user_is_silent_and_never_stored(open_relay):
    with open_relay.ws() as a:
        a.auth(A)
        a.send({"type": "typing", "to": B, "isTyping": True})
        pong_next(a)
    assert queue_size(open_relay, B) == 0
    with connect(open_relay, B) as b:
        pong_next(b)


def test_read_receipt_reaches_the_online_sender_exactly(open_relay):
    with open_relay.ws() as a, open_relay.ws() as b:
        a.auth(A)
        b.auth(B)
        b.send({"type": "read_receipt", "to": A, "messageId": "uuid-9"})
        frame = a.recv()
        assert {k: v for k, v in frame.items() if k != "timestamp"} == {"type": "read", "from": B,
                                                                        "messageId": "uuid-9"}
        assert set(frame) == {"type", "from", "messageId", "timestamp"}
        assert_ms(frame["timestamp"])
        pong_next(b)


def test_ping_gets_pong_with_ms_timestamp(open_relay):
    with open_relay.ws() as a:
        a.auth(A)
        pong_next(a)


# WebSocket protocol keepalive


def test_peer_that_never_answers_pings_is_closed_1011(start_relay):
    # A 0.5 s pong deadline leaves the live client's background thread room on a busy machine.
    relay = start_open(start_relay, server={"ping_interval_s": 0.2, "ping_timeout_s": 0.5})
    with RawWs(relay.port) as dead, relay.ws() as alive:
        assert dead.status == 101
        dead.send_json({"type": "auth", "address": A})
        assert_auth_success(dead.recv_json(), A)
        alive.auth(B)
        frames = []
        with pytest.raises(ConnectionError):
            while True:
                frames.append(dead.recv_frame(timeout=5))
        assert Opcode.PING in [f.opcode for f in frames], f"no ping was sent: {frames}"
        assert frames[-1].opcode is Opcode.CLOSE, frames
        assert Close.parse(frames[-1].data) == Close(1011, "keepalive ping timeout")
        # The sync client answers pings in its background thread: it is still served.
        pong_next(alive)
        assert online(relay, B) is True


def test_presence_of_a_peer_that_never_answers_pings_ends(start_relay):
    relay = start_open(start_relay, server={"ping_interval_s": 0.2, "ping_timeout_s": 0.3})
    with RawWs(relay.port) as dead:
        dead.send_json({"type": "auth", "address": A})
        assert_auth_success(dead.recv_json(), A)
        assert online(relay, A) is True
        # The peer is frozen: it neither reads nor answers, nor closes its socket.
        wait_until(lambda: not online(relay, A), "A offline after its 0.3 s ping timeout", timeout=4)
        assert relay.http("GET", "/health").json["connections"] == 0

"""Delivery semantics over real sockets: the offline queue, read receipts, several
devices per address, idempotent messageIds, queue limits and the ack extension."""

from __future__ import annotations

import pytest
from support import (A, B, C, D, E, RawWs, assert_answered, assert_auth_success, assert_auth_timed_out, assert_error,
                     assert_ms, assert_read, backlog_bytes, connect, connections, message_frame, msg, online, pong_next,
                     queue_size, start_open, unauthenticated_probe, wait_until)

from websockets.frames import Opcode

from relayd.net import gateway


# The offline queue


def test_offline_messages_are_queued_then_flushed_in_order_after_auth_success(open_relay):
    with connect(open_relay, A) as a:
        for i, ts in enumerate((1000, 2000, 3000)):
            assert_answered(a, msg(B, f"q{i}", f"content-{i}", timestamp=ts), "queued")
    assert queue_size(open_relay, B) == 3
    assert open_relay.http("GET", "/health").json["queuedMessages"] == 3
    with connect(open_relay, B) as b:  # first, before any stored frame
        assert [b.recv() for _ in range(3)] == [
            message_frame(A, "content-0", "q0", 1000, True),
            message_frame(A, "content-1", "q1", 2000, True),
            message_frame(A, "content-2", "q2", 3000, True),
        ]
        pong_next(b)
        assert queue_size(open_relay, B) == 0
    # Delivered once: a reconnect gets nothing more.
    with connect(open_relay, B) as b:
        pong_next(b)


def test_queued_message_without_timestamp_keeps_the_servers_ms(open_relay):
    with connect(open_relay, A) as a:
        assert_answered(a, msg(B, "no-ts", "x"), "queued")
    with connect(open_relay, B) as b:
        frame = b.recv()
        assert frame == message_frame(A, "x", "no-ts", frame["timestamp"], True)
        assert_ms(frame["timestamp"])


def test_messages_from_several_senders_flush_in_arrival_order(open_relay):
    with connect(open_relay, A) as a, connect(open_relay, C) as c:
        assert_answered(a, msg(B, "1", "a1", timestamp=1), "queued")
        assert_answered(c, msg(B, "1", "c1", timestamp=2), "queued")  # same id, another sender: another message
        assert_answered(a, msg(B, "2", "a2", timestamp=3), "queued")
    with connect(open_relay, B) as b:
        assert [b.recv() for _ in range(3)] == [message_frame(A, "a1", "1", 1, True),
                                               message_frame(C, "c1", "1", 2, True),
                                               message_frame(A, "a2", "2", 3, True)]


def test_live_messages_after_the_flush_are_not_queued(open_relay):
    with connect(open_relay, A) as a:
        assert_answered(a, msg(B, "old", "o", timestamp=1), "queued")
        with connect(open_relay, B) as b:
            assert b.recv() == message_frame(A, "o", "old", 1, True)
            assert_answered(a, msg(B, "new", "n", timestamp=2), "delivered")
            assert b.recv() == message_frame(A, "n", "new", 2, False)
        assert queue_size(open_relay, B) == 0


def test_slow_reader_with_a_large_backlog_is_not_timed_out_after_auth(start_relay, manual_clock):
    size = 60_000
    count = -(-backlog_bytes() // size)
    relay = start_open(start_relay, server={"auth_timeout_s": 0.3}, clock=manual_clock,
                       queue={"max_offline_messages": count, "max_offline_bytes": count * size + 1024})
    content = "x" * size
    with connect(relay, A) as a:
        for i in range(count):
            a.send(msg(B, f"big{i}", content, timestamp=i))
        for i in range(count):
            assert a.recv()["type"] == "queued"
    with RawWs(relay.port, rcvbuf=4096) as b, unauthenticated_probe(relay) as probe:
        b.send_json({"type": "auth", "address": B})
        wait_until(lambda: online(relay, B), "B's auth to be handled")
        # The peer is slow: it reads nothing for four auth timeouts, while the relay is stuck flushing to it.
        manual_clock.advance(1.2)
        assert_auth_timed_out(probe)  # the timer has run past B's deadline too
        assert_auth_success(b.recv_json(), B)
        for i in range(count):
            frame = b.recv_json()
            assert (frame["type"], frame.get("messageId")) == ("message", f"big{i}"), frame
        b.send_json({"type": "ping"})
        assert b.recv_json()["type"] == "pong"
    assert queue_size(relay, B) == 0


def test_messages_past_retention_are_expired(start_relay, manual_clock):
    relay = start_open(start_relay, clock=manual_clock, server={"auth_timeout_s": 0.2},  # a 50 ms housekeeping tick
                       queue={"message_retention_hours": 0.05, "expiry_interval_s": 0.05})  # 180 s
    with connect(relay, A) as a:
        assert_answered(a, msg(B, "old", "o", timestamp=1), "queued")
        manual_clock.advance(120)
        assert_answered(a, msg(B, "new", "n", timestamp=2), "queued")
    manual_clock.advance(90)  # "old" is 210 s old, "new" 90 s
    wait_until(lambda: queue_size(relay, B) == 1, "the message past retention to be expired")
    with connect(relay, B) as b:
        assert b.recv() == message_frame(A, "n", "new", 2, True)
        pong_next(b)


# Read receipts


def test_read_receipt_for_an_offline_sender_is_stored_and_delivered_after_auth(open_relay):
    with connect(open_relay, A) as a:
        assert_answered(a, msg(B, "m1", "hi", timestamp=5), "queued")
    with connect(open_relay, B) as b:
        assert b.recv() == message_frame(A, "hi", "m1", 5, True)
        b.send({"type": "read_receipt", "to": A, "messageId": "m1"})
        pong_next(b)  # no error, no answer
    # Receipts are not messages: not counted, not listed.
    assert queue_size(open_relay, A) == 0
    listed = open_relay.http("GET", f"/api/messages/{A}?limit=10")
    assert listed.status == 200 and listed.json == {"address": A, "count": 0, "messages": []}
    with connect(open_relay, A) as a:
        assert_read(a.recv(), B, "m1")
        pong_next(a)
    with connect(open_relay, A) as a:  # taken once
        pong_next(a)


def test_stored_receipts_follow_stored_messages(open_relay):
    with connect(open_relay, B) as b:
        assert_answered(b, msg(A, "from-b", "x", timestamp=1), "queued")
        b.send({"type": "read_receipt", "to": A, "messageId": "earlier"})
        pong_next(b)
    with connect(open_relay, A) as a:
        assert a.recv() == message_frame(B, "x", "from-b", 1, True)
        assert_read(a.recv(), B, "earlier")
        pong_next(a)


def test_read_receipt_is_not_listed_by_the_drain_endpoint(open_relay):
    with connect(open_relay, B) as b:
        b.send({"type": "read_receipt", "to": A, "messageId": "r"})
        pong_next(b)
    drained = open_relay.http("GET", f"/api/messages/{A}")
    assert drained.status == 200 and drained.json == {"address": A, "count": 0, "messages": []}
    # ... and draining did not take it: it still arrives on connect.
    with connect(open_relay, A) as a:
        assert_read(a.recv(), B, "r")


# Several devices per address


def test_two_devices_both_get_messages_typing_and_receipts(open_relay):
    with connect(open_relay, B) as b1, connect(open_relay, B) as b2, connect(open_relay, A) as a:
        assert_answered(a, msg(B, "multi", "both", timestamp=8), "delivered")
        for dev in (b1, b2):
            assert dev.recv() == message_frame(A, "both", "multi", 8, False)
        a.send({"type": "typing", "to": B, "isTyping": True})
        for dev in (b1, b2):
            assert dev.recv() == {"type": "typing", "from": A, "isTyping": True}
        a.send({"type": "read_receipt", "to": B, "messageId": "seen"})
        for dev in (b1, b2):
            assert_read(dev.recv(), A, "seen")
        assert queue_size(open_relay, B) == 0
        assert open_relay.http("GET", "/health").json["connections"] == 3
        users = open_relay.http("GET", "/api/status/online/all").json
        assert sorted(users["users"]) == sorted([A, B]) and users["count"] == 2


@pytest.mark.parametrize("closing", ["older", "newer"])
def test_closing_one_device_keeps_the_other_online_and_receiving(open_relay, closing):
    devices = {"older": connect(open_relay, B), "newer": connect(open_relay, B)}
    devices.pop(closing).close()
    (kept,) = devices.values()
    wait_until(lambda: connections(open_relay) == 1, f"the {closing} device's session to end")
    assert online(open_relay, B) is True
    with connect(open_relay, A) as a:
        assert_answered(a, msg(B, "to-kept", "still here", timestamp=4), "delivered")
        assert kept.recv() == message_frame(A, "still here", "to-kept", 4, False)
    kept.close()
    wait_until(lambda: not online(open_relay, B), "B offline once its last device closed")


def test_reconnect_before_the_old_socket_closes_is_not_lost(open_relay):
    """The app reconnects while its old socket may still look alive to the server."""
    stale = connect(open_relay, B)
    fresh = connect(open_relay, B)
    with connect(open_relay, A) as a:
        stale.close()
        wait_until(lambda: connections(open_relay) == 2, "the stale device's session to end")
        for i in range(3):
            assert_answered(a, msg(B, f"r{i}", str(i), timestamp=i + 1), "delivered")
        assert [fresh.recv() for _ in range(3)] == [message_frame(A, str(i), f"r{i}", i + 1, False)
                                                    for i in range(3)]
    fresh.close()


# Idempotent messageIds


def test_resending_a_delivered_message_id_answers_delivered_and_delivers_once(open_relay):
    with connect(open_relay, A) as a, connect(open_relay, B) as b:
        for _ in range(3):
            assert_answered(a, msg(B, "same", "once", timestamp=6), "delivered")
        assert b.recv() == message_frame(A, "once", "same", 6, False)
        pong_next(b)


def test_resending_a_queued_message_id_answers_queued_and_stores_once(open_relay):
    with connect(open_relay, A) as a:
        for _ in range(3):
            assert_answered(a, msg(B, "same", "once", timestamp=6), "queued")
    assert queue_size(open_relay, B) == 1
    with connect(open_relay, B) as b:
        assert b.recv() == message_frame(A, "once", "same", 6, True)
        pong_next(b)


def test_resend_from_another_device_of_the_sender_is_also_deduplicated(open_relay):
    with connect(open_relay, A) as a1, connect(open_relay, A) as a2, connect(open_relay, B) as b:
        assert_answered(a1, msg(B, "dev", "x", timestamp=1), "delivered")
        assert_answered(a2, msg(B, "dev", "x", timestamp=1), "delivered")
        assert b.recv() == message_frame(A, "x", "dev", 1, False)
        pong_next(b)


def test_reusing_a_message_id_for_another_recipient_is_never_a_false_success(open_relay):
    with connect(open_relay, A) as a:
        assert_answered(a, msg(B, "reused", "for B", timestamp=1), "queued")
        # docs/protocol.md: messageId is idempotent per sender *and recipient*, so this is another message.
        assert_answered(a, msg(C, "reused", "for C", timestamp=2), "queued")
    assert queue_size(open_relay, C) == 1, "the relay answered 'queued' for C but stored nothing"
    with connect(open_relay, C) as c:
        assert c.recv() == message_frame(A, "for C", "reused", 2, True)


# Queue limits


def test_full_queue_refuses_with_queue_full(start_relay):
    relay = start_open(start_relay, queue={"max_offline_messages": 2})
    with connect(relay, A) as a:
        for mid in ("1", "2"):
            assert_answered(a, msg(B, mid, mid, timestamp=int(mid)), "queued")
        a.send(msg(B, "3", "3", timestamp=3))
        assert_error(a.recv(), "queue_full", "3")
        assert queue_size(relay, B) == 2
        # Not remembered as an answer: once there is room the same id is accepted.
        relay.http("DELETE", f"/api/messages/{B}")
        assert_answered(a, msg(B, "3", "3", timestamp=3), "queued")
    with connect(relay, B) as b:
        assert b.recv() == message_frame(A, "3", "3", 3, True)
        pong_next(b)


def test_full_queue_with_drop_oldest_drops_the_oldest(start_relay):
    relay = start_open(start_relay, queue={"max_offline_messages": 2, "overflow": "drop_oldest"})
    with connect(relay, A) as a:
        for mid in ("1", "2", "3"):
            assert_answered(a, msg(B, mid, mid, timestamp=int(mid)), "queued")
    assert queue_size(relay, B) == 2
    with connect(relay, B) as b:
        assert [b.recv() for _ in range(2)] == [message_frame(A, "2", "2", 2, True),
                                               message_frame(A, "3", "3", 3, True)]
        pong_next(b)


def test_offline_byte_cap_refuses_with_queue_full(start_relay):
    relay = start_open(start_relay, queue={"max_offline_bytes": 1024})
    with connect(relay, A) as a:
        assert_answered(a, msg(B, "y", "x" * 600), "queued")
        a.send(msg(B, "z", "x" * 600))
        assert_error(a.recv(), "queue_full", "z")
        assert_answered(a, msg(B, "small", "x" * 400), "queued")
    assert queue_size(relay, B) == 2


def test_offline_byte_cap_counts_utf8_bytes(start_relay):
    relay = start_open(start_relay, queue={"max_offline_bytes": 1024})
    with connect(relay, A) as a:
        assert_answered(a, msg(B, "u0", "é" * 400), "queued")  # 800 bytes
        a.send(msg(B, "u1", "é" * 400))  # 1600 bytes held would exceed 1024
        assert_error(a.recv(), "queue_full", "u1")


def test_queue_limit_is_per_recipient(start_relay):
    relay = start_open(start_relay, queue={"max_offline_messages": 1})
    with connect(relay, A) as a:
        assert_answered(a, msg(B, "b", "x"), "queued")
        assert_answered(a, msg(C, "c", "x"), "queued")


# The ack extension


def test_ack_session_gets_stored_messages_then_queue_empty_and_they_stay_until_acked(open_relay):
    with connect(open_relay, A) as a:
        for i in range(3):
            assert_answered(a, msg(B, f"k{i}", f"c{i}", timestamp=i + 10), "queued")
    expected = [message_frame(A, f"c{i}", f"k{i}", i + 10, True) for i in range(3)]
    with connect(open_relay, B, ack=True) as b:
        assert [b.recv() for _ in range(3)] == expected
        assert b.recv() == {"type": "queue_empty"}
        pong_next(b)
        assert queue_size(open_relay, B) == 3
    # Reconnecting without acking delivers them again, in order.
    with connect(open_relay, B, ack=True) as b:
        assert [b.recv() for _ in range(3)] == expected
        assert b.recv() == {"type": "queue_empty"}
        b.send({"type": "ack", "messageIds": ["k0", "k2", "unknown-id"]})
        pong_next(b)  # an ack has no answer
        assert queue_size(open_relay, B) == 1
    with connect(open_relay, B, ack=True) as b:
        assert b.recv() == expected[1]
        assert b.recv() == {"type": "queue_empty"}
        b.send({"type": "ack", "messageIds": ["k1"]})
        pong_next(b)
    assert queue_size(open_relay, B) == 0
    with connect(open_relay, B, ack=True) as b:
        assert b.recv() == {"type": "queue_empty"}
        pong_next(b)


def test_ack_session_with_nothing_stored_gets_only_queue_empty(open_relay):
    with connect(open_relay, B, ack=True) as b:
        assert b.recv() == {"type": "queue_empty"}
        pong_next(b)


def test_live_messages_to_an_ack_session_stay_stored_until_acked(open_relay):
    with connect(open_relay, B, ack=True) as b, connect(open_relay, A) as a:
        assert b.recv() == {"type": "queue_empty"}
        assert_answered(a, msg(B, "live", "x", timestamp=2), "delivered")
        assert b.recv() == message_frame(A, "x", "live", 2, False)
        assert queue_size(open_relay, B) == 1
    with connect(open_relay, B, ack=True) as b:
        assert b.recv() == message_frame(A, "x", "live", 2, True)
        assert b.recv() == {"type": "queue_empty"}
        b.send({"type": "ack", "messageIds": ["live"]})
        pong_next(b)
    assert queue_size(open_relay, B) == 0


def test_empty_ack_is_accepted(open_relay):
    with connect(open_relay, B, ack=True) as b:
        assert b.recv() == {"type": "queue_empty"}
        b.send({"type": "ack", "messageIds": []})
        pong_next(b)


@pytest.mark.parametrize("frame,code", [
    ({"type": "ack"}, "missing_field"),
    ({"type": "ack", "messageIds": None}, "missing_field"),
    ({"type": "ack", "messageIds": "k0"}, "invalid_field"),
    ({"type": "ack", "messageIds": {"k0": True}}, "invalid_field"),
    ({"type": "ack", "messageIds": [0]}, "invalid_field"),
    ({"type": "ack", "messageIds": ["k0", 1]}, "invalid_field"),
])
def test_bad_ack_frames_are_refused_and_ack_nothing(open_relay, frame, code):
    with connect(open_relay, A) as a:
        assert_answered(a, msg(B, "k0", "x", timestamp=1), "queued")
    with connect(open_relay, B, ack=True) as b:
        assert b.recv() == message_frame(A, "x", "k0", 1, True)
        assert b.recv() == {"type": "queue_empty"}
        b.send(frame)
        assert_error(b.recv(), code)
        pong_next(b)
    assert queue_size(open_relay, B) == 1


def test_auth_ack_must_be_a_boolean(open_relay):
    with open_relay.ws() as b:
        b.send({"type": "auth", "address": B, "ack": "yes"})
        assert_error(b.recv(), "invalid_field")
        b.send({"type": "auth", "address": B, "ack": False})
        assert_auth_success(b.recv(), B)
        pong_next(b)  # no queue_empty without the opt-in


def test_a_liveness_pass_in_slices_reaches_every_session(start_relay, monkeypatch):
    """The housekeeping pass over sessions (auth deadlines, pings) checks a slice of sessions per loop
    iteration; with slices of two, each of five quiet sessions is still pinged, and the pass ends."""
    monkeypatch.setattr(gateway, "LIVENESS_SLICE", 2)
    relay = start_open(start_relay, server={"ping_interval_s": 0.3, "ping_timeout_s": 30})
    sessions = [RawWs(relay.port) for _ in range(5)]
    try:
        for ws, address in zip(sessions, (A, B, C, D, E)):
            ws.send_json({"type": "auth", "address": address})
            assert_auth_success(ws.recv_json(), address)
        for ws in sessions:
            frame = ws.recv_frame(timeout=10)
            while frame.opcode is not Opcode.PING:
                frame = ws.recv_frame(timeout=10)
        wait_until(lambda: relay.server.gateway._liveness is None, "the pass to end")
    finally:
        for ws in sessions:
            ws.close()

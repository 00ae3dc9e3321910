"""The delivery contract is exact, and storage cannot be filled from one client: each test reproduces the
fault or attack against a real relay and shows the fix.

Acks and receipts take effect in batches before a reconnect sees the queue; a plain session that is cut off keeps
what it never received; an ownership lock that cannot be recorded fails the sign-in; a wall-clock step does not
expire messages; rotating sender addresses, stored receipts and the storage budget bound the disk; HTTP framing is
strict; an unreadable config is a clear error; a deleted signed key stays deleted; a read-only database says so.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    ADDR_A,
    KEY_A,
    A,
    B,
    C,
    ProcessRelay,
    RawWs,
    WriteLock,
    assert_error,
    bearer,
    challenge_of,
    connect,
    key_body,
    metric_families,
    pong_next,
    queue_size,
    raw_http,
    read_backlog,
    run_cli,
    signed_auth_frame,
    wait_until,
)

MiB = 1 << 20
OPEN = "[auth]\nmode = open\n"
PUB_KEY = base64.b64encode(bytes(range(32))).decode()
PUB_KEY_2 = base64.b64encode(bytes(range(100, 132))).decode()


def counter(relay, family: str, **labels: str) -> float:
    """One sample of a metric family, from a real scrape."""
    for _, sample_labels, value in metric_families(relay.http("GET", "/metrics").body.decode())[family]["samples"]:
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def commits(relay) -> float:
    samples = metric_families(relay.http("GET", "/metrics").body.decode())["relayd_storage_commit_seconds"]["samples"]
    return next(value for name, _, value in samples if name.endswith("_count"))


@pytest.fixture
def relay(tmp_path: Path):
    """A relayd process in open mode, without the frame rate limit (these clients send thousands of frames)."""
    relay = ProcessRelay(tmp_path, config_text=OPEN + "[limits]\nframes_per_s = 0\n")
    yield relay
    relay.stop()


# 4. Acks and receipts


@pytest.mark.parametrize("count", [100, 1000])
def test_acks_sent_before_a_clean_close_take_effect_before_a_reconnect(relay, count) -> None:
    """One single-id ack per message as it arrives, a clean close, an immediate reconnect: nothing comes back,
    and the acks went to the disk in far fewer commits than frames."""
    with connect(relay, B) as b:
        for i in range(count):
            b.send({"type": "message", "to": A, "content": "c", "messageId": f"a-{i}"})
        for i in range(count):
            assert b.recv_type("queued", timeout=10)["messageId"] == f"a-{i}"
    before = commits(relay)
    with connect(relay, A, ack=True) as a:
        for _ in range(count):
            frame = a.recv_type("message", timeout=10)
            a.send({"type": "ack", "messageIds": [frame["messageId"]]})
        assert a.recv_type("queue_empty", timeout=10)
    with connect(relay, A, ack=True) as again:
        assert again.recv(timeout=10) == {"type": "queue_empty"}, "acked messages came back"
    assert queue_size(relay, A) == 0
    assert commits(relay) - before < count / 4, "acks were committed one by one"


def test_read_receipts_to_an_offline_sender_are_stored_in_batches(relay) -> None:
    before = commits(relay)
    with connect(relay, B) as b:
        for i in range(2000):
            b.send({"type": "read_receipt", "to": A, "messageId": f"r-{i}"})
        pong_next(b)
    wait_until(lambda: counter(relay, "relayd_receipts_stored_total") == 2000, "2000 receipts stored")
    assert commits(relay) - before < 500, "receipts were committed one by one"
    with connect(relay, A) as a:
        got = [a.recv_type("read", timeout=10)["messageId"] for _ in range(2000)]
    assert got == [f"r-{i}" for i in range(2000)]


# 5. A plain session cut off keeps what it never received


def test_plain_session_cut_off_as_a_slow_reader_loses_nothing_answered_delivered(relay) -> None:
    reader = RawWs(relay.port, rcvbuf=4096)
    reader.send_json({"type": "auth", "address": A})
    assert reader.recv_json()["type"] == "auth_success"  # then it never reads again
    answers: dict[str, str] = {}
    with connect(relay, B) as b:
        for i in range(120):  # 120 x 60 KB: more than the socket buffers and 1 MiB, so the reader is cut off
            mid = f"slow-{i}"
            b.send({"type": "message", "to": A, "content": "s" * 60_000, "messageId": mid})
            answers[mid] = b.recv(timeout=10)["type"]
    assert "delivered" in answers.values() and "queued" in answers.values(), answers
    reader.close()
    wait_until(lambda: queue_size(relay, A) == 120, "every message kept for the reader's next connection")
    with connect(relay, A, ack=True) as a:
        assert [f["messageId"] for f in read_backlog(a)] == list(answers)


# 6. An ownership lock that cannot be recorded fails the sign-in


def test_signed_sign_in_fails_when_its_lock_cannot_be_recorded(tmp_path: Path) -> None:
    relay = ProcessRelay(tmp_path)  # mixed mode
    try:
        with WriteLock(tmp_path / "relayd-data" / "relayd.db"), relay.ws() as client:
            client.send(signed_auth_frame(KEY_A, challenge_of(client)))
            assert_error(client.recv(timeout=10), "storage_unavailable")
            client.send({"type": "ping"})
            assert_error(client.recv(), "not_authenticated")  # not signed in: nothing was granted
        with relay.ws() as client:  # once the disk is back, the owner signs in and locks the address
            client.send(signed_auth_frame(KEY_A, challenge_of(client)))
            assert client.recv()["verified"] is True
        with relay.ws() as claim:
            claim.send({"type": "auth", "address": ADDR_A})
            assert_error(claim.recv_type("error"), "auth_required")
    finally:
        relay.stop()


# 7. Wall-clock steps


def test_a_forward_clock_step_does_not_expire_queued_messages(start_relay, manual_clock, caplog) -> None:
    relay = start_relay(auth={"mode": "open"}, queue={"expiry_interval_s": 0.05}, clock=manual_clock)
    relay.server.housekeeping.max_tick = 0.05
    with relay.ws() as b:
        b.auth(B)
        for i in range(20):
            b.send({"type": "message", "to": A, "content": "c", "messageId": f"t-{i}"})
            assert b.recv_type("queued")["messageId"] == f"t-{i}"
    manual_clock.step_wall(30 * 86400)  # the Pi's first NTP sync: 30 days ahead, the monotonic clock did not move
    wait_until(lambda: "stepped forward" in caplog.text, "the clock step to be noticed")
    manual_clock.advance(60)  # a minute later on both clocks: expiry runs again
    with relay.ws() as a:
        a.auth(A, ack=True)
        assert [f["messageId"] for f in read_backlog(a)] == [f"t-{i}" for i in range(20)]


# 8. Storage cannot be filled from one client


def test_new_queues_are_bounded_per_client_ip_whatever_the_sender_address(start_relay) -> None:
    relay = start_relay(auth={"mode": "open"}, limits={"new_queues_per_ip_per_hour": 5})
    for i in range(5):
        with relay.ws() as s:
            s.auth(f"0x{i + 1:040x}")
            s.send({"type": "message", "to": f"0x{i + 100:040x}", "content": "c", "messageId": f"n-{i}"})
            assert s.recv_type("queued")["messageId"] == f"n-{i}"
    with relay.ws() as s:  # a fresh sender address from the same IP
        s.auth(f"0x{999:040x}")
        s.send({"type": "message", "to": f"0x{555:040x}", "content": "c", "messageId": "n-over"})
        assert_error(s.recv(), "rate_limited", "n-over")
        s.send({"type": "message", "to": f"0x{100:040x}", "content": "c", "messageId": "n-known"})
        assert s.recv_type("queued")["messageId"] == "n-known"  # a queue this IP opened this hour


def test_stored_receipts_are_capped_per_recipient_and_counted(start_relay) -> None:
    relay = start_relay(auth={"mode": "open"}, queue={"max_receipts_per_recipient": 3})
    with relay.ws() as b:
        b.auth(B)
        for i in range(5):
            b.send({"type": "read_receipt", "to": A, "messageId": f"r-{i}"})
        pong_next(b)
    wait_until(lambda: relay.http("GET", "/metrics").body.count(b"relayd_receipts_dropped_total 2") == 1,
               "two receipts dropped over the cap")
    with relay.ws() as a:
        a.auth(A)
        assert [a.recv_type("read")["messageId"] for _ in range(3)] == ["r-2", "r-3", "r-4"]


def test_the_storage_budget_refuses_new_offline_messages_instead_of_filling_the_disk(start_relay) -> None:
    relay = start_relay(auth={"mode": "open"}, storage={"max_bytes": 1000})
    with relay.ws() as b:
        b.auth(B)
        for i in range(3):
            b.send({"type": "message", "to": A, "content": "x" * 300, "messageId": f"s-{i}"})
            assert b.recv_type("queued")["messageId"] == f"s-{i}"
        b.send({"type": "message", "to": C, "content": "x" * 300, "messageId": "s-over"})
        refusal = b.recv()
        assert_error(refusal, "storage_unavailable", "s-over")
        assert "budget" in refusal["message"]
    assert relay.http("GET", "/health").status == 200  # a full budget is not a storage fault
    assert b"relayd_storage_budget_bytes 1000" in relay.http("GET", "/metrics").body


# Also: strict HTTP framing, answered with 400 (never a silent close)


@pytest.mark.parametrize("raw,status", [
    (b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400),
    (b"POST /api/status/batch HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}", 400),
    (b"POST /api/status/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\n{}", 400),
    (b"POST /api/status/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"Content-Length: 0\r\n" * 200 + b"\r\n", 431),
    (b"GET\t/health HTTP/1.1\r\nHost: x\r\n\r\n", 400),
], ids=["space_before_colon", "obs_fold", "signed_length", "hex_length", "chunk_without_crlf",
        "repeated_content_length_lines", "malformed_request_line"])
def test_malformed_requests_are_answered_400(relay, raw: bytes, status: int) -> None:
    reply = raw_http(relay.port, raw)
    assert reply.status == status, reply
    assert reply.json["code"] in ("bad_request", "headers_too_large"), reply


# Also: an unreadable configuration


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_bytes(b"[server]\nport = 3000 # caf\xe9\n")
    result = run_cli(tmp_path, "--check-config", "--config", str(conf))
    assert result.returncode == 2, result
    assert "not UTF-8" in result.stderr and str(conf) in result.stderr and "Traceback" not in result.stderr


def test_sighup_with_a_config_that_is_not_utf8_is_refused_and_ready_again(process_relays, tmp_path,
                                                                         notify_socket) -> None:
    relay = process_relays(tmp_path, config_text=OPEN, env={"NOTIFY_SOCKET": notify_socket.env_value})
    notify_socket.until_field("READY")
    relay.config_path.write_bytes(b"[auth]\nmode = open # \xff\n")
    relay.signal(signal.SIGHUP)
    got = notify_socket.until_field("READY")
    assert any(f.get("RELOADING") == "1" for f in got) and got[-1]["READY"] == "1", got
    relay.wait_log("reload refused")
    assert "Traceback" not in relay.log()


# Also: a deleted signed key cannot be published again from its old statement


def test_a_deleted_signed_key_cannot_be_restored_by_replaying_its_statement(tmp_path: Path) -> None:
    relay = ProcessRelay(tmp_path)
    try:
        issued = int(time.time())
        old = key_body(KEY_A, PUB_KEY, issued)
        assert relay.http("POST", "/api/public-keys", old).status == 200
        with relay.ws() as owner:
            owner.send(signed_auth_frame(KEY_A, challenge_of(owner)))
            token = owner.recv()["token"]
        address = old["address"]
        assert relay.http("DELETE", f"/api/public-keys/{address}", headers=bearer(token)).json["success"] is True
        replay = relay.http("POST", "/api/public-keys", old)
        assert replay.status == 409 and replay.json["code"] == "stale_statement", replay
        assert relay.http("GET", f"/api/public-keys/{address}").status == 404
        newer = key_body(KEY_A, PUB_KEY_2, issued + 1)
        assert relay.http("POST", "/api/public-keys", newer).status == 200  # a newer statement is fine
    finally:
        relay.stop()


# Also: a read-only database at start-up


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount needs root")
def test_a_read_only_database_at_start_up_is_reported_as_read_only(tmp_path: Path) -> None:
    data = tmp_path / "relayd-data"
    relay = ProcessRelay(tmp_path, config_text=OPEN)
    relay.stop()
    subprocess.run(["mount", "--bind", str(data), str(data)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(data)], check=True)
        result = run_cli(tmp_path, "--config", str(relay.config_path), "--port", "0")
        assert result.returncode == 2, result
        assert "read-only" in result.stderr and "corrupt" not in result.stderr, result.stderr
    finally:
        subprocess.run(["umount", str(data)], check=False)

"""The hourly byte budgets for offline content, per sender and per client IP: whoever fills the storage is
refused before everyone else (an attacker's review: one sender filled a 300 MiB storage budget with 256 KiB
messages in 14.7 s, and then every user's offline messages were refused). Real relays on 127.0.0.1, SQLite
and Redis (several instances, where they count per instance like the other per-IP limits)."""

from __future__ import annotations

from typing import Any

from support import WsClient, addr, assert_error, client_socket, queue_size

BIG = "x" * (256 << 10)


def ws_from(relay: Any, source: str) -> WsClient:
    sock = client_socket(source)
    sock.connect(("127.0.0.1", relay.port))
    return WsClient(relay.url, sock=sock)


def fill(sender: WsClient, first: int, count: int, prefix: str) -> list[dict[str, Any]]:
    """Send ``count`` messages of 256 KiB to distinct offline recipients; their answers."""
    out = []
    for n in range(first, first + count):
        sender.send({"type": "message", "to": addr(n), "content": BIG, "messageId": f"{prefix}-{n}"})
        out.append(sender.recv(timeout=10))
    return out


def test_one_sender_is_refused_past_its_byte_budget_and_others_still_queue(start_relay, tmp_path) -> None:
    relay = start_relay(storage={"backend": "sqlite", "path": str(tmp_path / "r.db"), "max_bytes": 16 << 20},
                        auth={"mode": "open"}, limits={"frames_per_s": 0,
                                                        "offline_bytes_per_sender_per_hour": 2 << 20})
    with relay.ws() as attacker, relay.ws() as user:
        attacker.auth(addr(900))
        user.auth(addr(901))
        answers = fill(attacker, 1, 12, "a")
        assert [a["type"] for a in answers[:8]] == ["queued"] * 8  # 8 x 256 KiB = the 2 MiB budget
        for n, answer in enumerate(answers[8:], 9):
            assert_error(answer, "rate_limited", f"a-{n}")
            assert "bytes" in answer["message"]
        assert queue_size(relay, addr(9)) == 0
        # Another user's offline messages are still queued: the storage budget was not filled.
        assert [a["type"] for a in fill(user, 100, 4, "u")] == ["queued"] * 4
        user.send({"type": "message", "to": addr(200), "content": "small", "messageId": "u-small"})
        assert user.recv_type("queued")["messageId"] == "u-small"
    metrics = relay.http("GET", "/metrics").body.decode()
    assert 'relayd_rate_limit_hits_total{limit="offline_bytes"} 4' in metrics


def test_rotating_sender_addresses_from_one_ip_stop_at_the_ip_budget(start_relay, tmp_path) -> None:
    relay = start_relay(storage={"backend": "sqlite", "path": str(tmp_path / "r.db")}, auth={"mode": "open"},
                        limits={"frames_per_s": 0, "offline_bytes_per_ip_per_hour": 2 << 20})
    refused = 0
    for i in range(12):
        with ws_from(relay, "127.0.0.2") as s:
            s.auth(addr(500 + i))
            answer = fill(s, 1000 + i, 1, "r")[0]
            refused += answer["type"] == "error"
            if i >= 8:
                assert_error(answer, "rate_limited", f"r-{1000 + i}")
    assert refused == 4
    with ws_from(relay, "127.0.0.3") as other:  # another IP
        other.auth(addr(600))
        assert fill(other, 2000, 1, "o")[0]["type"] == "queued"


def test_each_instance_bounds_a_senders_bytes(relay_cluster, redis_server) -> None:
    """Like the other per-IP limits, the byte budgets count per instance: N instances hold N budgets."""
    relays = relay_cluster(redis_server, RELAYD_AUTH_MODE="open", RELAYD_LIMITS_FRAMES_PER_S="0",
                           RELAYD_LIMITS_OFFLINE_BYTES_PER_SENDER_PER_HOUR=str(1 << 20))
    for relay in relays:
        relay.wait_ready()
    answers: dict[int, list[str]] = {0: [], 1: []}
    for i in range(12):  # the same sender, through both instances in turn
        with relays[i % 2].ws() as s:
            s.auth(addr(700))
            answers[i % 2].append(fill(s, 3000 + i, 1, f"c{i}")[0]["type"])
    assert answers == {0: ["queued"] * 4 + ["error"] * 2, 1: ["queued"] * 4 + ["error"] * 2}

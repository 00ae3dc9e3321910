"""The original relay's own message-flow script (relay-server/test-message-flow.js),
step by step, asserting every answer it prints.

Alice and Bob store keys (Node's http client sends them chunked), connect,
exchange three messages, type, send a read receipt; Bob disconnects, Alice
writes to him, Bob reconnects and gets it from the queue; then status and
health. It runs in the default auth mode (what a stock relayd serves) and in
open mode (the seed's protocol).
"""

from __future__ import annotations

import http.client
import json
import random
import string
import time
from typing import Any

from support import assert_auth_success, assert_ms, status_frame, wait_until

ALICE = {"address": "0x1234567890123456789012345678901234567890", "publicKey": "alice_public_key_base64_encoded_mock"}
BOB = {"address": "0x9876543210987654321098765432109876543210", "publicKey": "bob_public_key_base64_encoded_mock"}

KNOWN = {"message", "delivered", "queued", "read", "typing", "auth_success", "pong"}


def node_request(port: int, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """Like the script's apiRequest(): Content-Type JSON always, body written with req.write() (chunked)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if body is not None:
        conn.request(method, path, body=iter([json.dumps(body).encode()]), headers=headers, encode_chunked=True)
    else:
        conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def message_id() -> str:
    return f"msg_{int(time.time() * 1000)}_{''.join(random.choices(string.ascii_lowercase + string.digits, k=9))}"


class TestClient:
    """The script's TestClient: every frame is recorded; only the challenge frame is unknown to it."""

    __test__ = False

    def __init__(self, relay: Any, user: dict[str, str]) -> None:
        self.relay = relay
        self.user = user
        self.frames: list[dict[str, Any]] = []
        self.ws: Any = None

    def connect(self) -> None:
        self.ws = self.relay.ws()
        self.ws.send({"type": "auth", "address": self.user["address"]})
        while True:
            frame = self.ws.recv()
            if frame["type"] == "auth_success":
                assert_auth_success(frame, self.user["address"])
                return
            # The default mode offers a sign-in challenge first; the script logs and ignores it.
            assert frame["type"] == "challenge", frame

    def next(self) -> dict[str, Any]:
        frame = self.ws.recv()
        assert frame["type"] in KNOWN, f"{self.user['address']} got a frame the script does not know: {frame}"
        self.frames.append(frame)
        return frame

    def send_message(self, to: str, content: str) -> tuple[str, int]:
        mid, timestamp = message_id(), int(time.time() * 1000)
        self.ws.send({"type": "message", "to": to, "content": content, "messageId": mid, "timestamp": timestamp})
        return mid, timestamp

    def disconnect(self) -> None:
        self.ws.close()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "message"]

    @property
    def status_updates(self) -> list[tuple[str, str]]:
        return [(f["type"], f["messageId"]) for f in self.frames if f["type"] in ("delivered", "queued", "read")]


def expect_message(client: TestClient, sender: dict[str, str], content: str, mid: str, timestamp: int,
                   queued: bool) -> None:
    assert client.next() == {"type": "message", "from": sender["address"], "content": content, "messageId": mid,
                             "timestamp": timestamp, "queued": queued}


def test_message_flow(flow_relay):
    relay = flow_relay
    port = relay.port

    # TEST 1: server health
    status, health = node_request(port, "/health")
    assert status == 200
    assert (health["status"], health["connections"], health["queuedMessages"]) == ("ok", 0, 0)

    # TEST 2: public key exchange
    for user in (ALICE, BOB):
        status, stored = node_request(port, "/api/public-keys", "POST", user)
        assert status == 200, stored
        assert (stored["success"], stored["address"]) == (True, user["address"])
    status, bob_key = node_request(port, f"/api/public-keys/{BOB['address']}")
    assert status == 200
    assert (bob_key["address"], bob_key["publicKey"]) == (BOB["address"], BOB["publicKey"])
    assert_ms(bob_key["createdAt"])
    assert_ms(bob_key["updatedAt"])

    # TEST 3: WebSocket connections
    alice, bob = TestClient(relay, ALICE), TestClient(relay, BOB)
    alice.connect()
    bob.connect()
    assert node_request(port, "/health")[1]["connections"] == 2

    # TEST 4: messages while both are online
    msg1, ts1 = alice.send_message(BOB["address"], "Hello Bob! This is Alice. 👋")
    status_frame(alice.next(), "delivered", msg1, BOB["address"])
    expect_message(bob, ALICE, "Hello Bob! This is Alice. 👋", msg1, ts1, False)
    msg2, ts2 = bob.send_message(ALICE["address"], "Hi Alice! Nice to hear from you! 😊")
    status_frame(bob.next(), "delivered", msg2, ALICE["address"])
    expect_message(alice, BOB, "Hi Alice! Nice to hear from you! 😊", msg2, ts2, False)
    msg3, ts3 = alice.send_message(BOB["address"], "How are you doing?")
    status_frame(alice.next(), "delivered", msg3, BOB["address"])
    expect_message(bob, ALICE, "How are you doing?", msg3, ts3, False)

    # TEST 5: typing indicators
    alice.ws.send({"type": "typing", "to": BOB["address"], "isTyping": True})
    assert bob.next() == {"type": "typing", "from": ALICE["address"], "isTyping": True}
    alice.ws.send({"type": "typing", "to": BOB["address"], "isTyping": False})
    assert bob.next() == {"type": "typing", "from": ALICE["address"], "isTyping": False}

    # TEST 6: read receipt for Bob's first message
    bob.ws.send({"type": "read_receipt", "to": ALICE["address"], "messageId": bob.messages[0]["messageId"]})
    read = alice.next()
    assert {k: v for k, v in read.items() if k != "timestamp"} == {"type": "read", "from": BOB["address"],
                                                                   "messageId": msg1}
    assert_ms(read["timestamp"])

    # TEST 7: offline queue
    bob.disconnect()
    wait_until(lambda: node_request(port, f"/api/status/{BOB['address']}")[1]["online"] is False, "Bob offline")
    offline, ts4 = alice.send_message(BOB["address"], "Bob, are you there? (sent while offline)")
    status_frame(alice.next(), "queued", offline, BOB["address"])
    assert node_request(port, f"/api/messages/{BOB['address']}/queue-size")[1] == {"address": BOB["address"],
                                                                                     "queueSize": 1}
    bob.connect()
    expect_message(bob, ALICE, "Bob, are you there? (sent while offline)", offline, ts4, True)
    assert node_request(port, f"/api/messages/{BOB['address']}/queue-size")[1]["queueSize"] == 0

    # TEST 8: online status
    for user in (ALICE, BOB):
        status, body = node_request(port, f"/api/status/{user['address']}")
        assert status == 200
        assert (body["address"], body["online"]) == (user["address"], True)
        assert_ms(body["timestamp"])

    # Results summary, as the script prints it
    assert [m["content"] for m in alice.messages] == ["Hi Alice! Nice to hear from you! 😊"]
    assert [m["content"] for m in bob.messages] == ["Hello Bob! This is Alice. 👋", "How are you doing?",
                                                    "Bob, are you there? (sent while offline)"]
    assert alice.status_updates == [("delivered", msg1), ("delivered", msg3), ("read", msg1), ("queued", offline)]
    assert bob.status_updates == [("delivered", msg2)]

    # Final health
    status, final = node_request(port, "/health")
    assert status == 200
    assert (final["status"], final["connections"], final["queuedMessages"]) == ("ok", 2, 0)

    alice.disconnect()
    bob.disconnect()
    wait_until(lambda: node_request(port, "/health")[1]["connections"] == 0, "both sessions to end")

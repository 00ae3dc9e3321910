"""Abuse limits: per-IP connection caps and rates, sign-in attempt limits, frame floods,
oversize frames before auth, readers that stop reading, new-queue limits, the online list.

Everything runs against real relays on 127.0.0.1 with small limits, and every
loop is bounded so a regression fails instead of hanging.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any, Callable

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relayd.identity.auth import auth_statement, key_statement

try:
    from tests.idena_signer import address_of_private, sign_text
except ImportError:  # tests/ on sys.path (conftest)
    from idena_signer import address_of_private, sign_text

KEY_A = bytes.fromhex("c6fccb1b926e774d7e3a1716eddeba55ae7d40db4fb7c22d2705835f48d5be1b")
ADDR_A = address_of_private(KEY_A)
KEY_B = bytes.fromhex("289c2857d4598e37fb9647507e47a309d6133539bf21a8b9cb6df88fd5232032")
ADDR_B = address_of_private(KEY_B)

SENDER = "0x" + "51" * 20
PEER = "0x" + "52" * 20
OTHER = "0x" + "53" * 20
READER = "0x" + "54" * 20
BIG = 60_000  # characters of one large message (below the 64 KiB default content limit)


def addr(n: int) -> str:
    return "0x" + f"{n:040x}"


# Helpers


class RawWs:
    """A hand-made WebSocket client on a plain socket: it reads only when told to."""

    def __init__(self, port: int, *, rcvbuf: int | None = None, headers: dict[str, str] | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"{extra}\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        assert self.status == 101, head

    def send_text(self, text: str) -> None:
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(data))
        self.sock.sendall(head + mask + masked)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.send_text(json.dumps(frame))

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_json(self) -> dict[str, Any]:
        """Next text frame; ConnectionError on a close frame, EOF or reset."""
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._take(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._take(8))[0]
            payload = self._take(n)
            opcode = b0 & 0x0F
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError(f"close frame {payload[:2].hex()}")

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


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


def online(relay: Any, address: str) -> bool:
    return relay.http("GET", f"/api/status/{address}").json["online"]


def queue_size(relay: Any, address: str) -> int:
    return relay.http("GET", f"/api/messages/{address}/queue-size").json["queueSize"]


def exchange(relay: Any, sender: Any, receiver: Any, to: str, mid: str) -> None:
    """``sender`` sends one message to ``to`` (the address of ``receiver``), who must get it."""
    sender.send({"type": "message", "to": to, "content": f"content of {mid}", "messageId": mid})
    answer = sender.recv_type("delivered", timeout=5)
    assert answer["messageId"] == mid
    got = receiver.recv_type("message", timeout=5)
    assert got["messageId"] == mid and got["content"] == f"content of {mid}"


def signed_auth_frame(key: bytes, challenge: dict[str, Any], *, corrupt: bool = False) -> dict[str, Any]:
    address = address_of_private(key)
    text = auth_statement(challenge["relay"], address, challenge["nonce"], challenge["issuedAt"])
    signature = sign_text(key, text + ("!" if corrupt else ""), "doubleHash")
    return {"type": "auth", "address": address, "nonce": challenge["nonce"], "signature": signature,
            "format": "doubleHash"}


def closed_with(client: Any, timeout: float = 5) -> tuple[int | None, list[dict[str, Any]]]:
    """Read until the server closes; return (close code, frames read meanwhile)."""
    frames = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            frames.append(client.recv(max(0.05, deadline - time.monotonic())))
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), frames
        except TimeoutError:
            pytest.fail(f"the connection was not closed within {timeout} s; got {frames[-5:]}")


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
            exchange(relay, other, peer, PEER, "cap-1")
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
        assert wait_until(reconnects, timeout=3, step=0.1)
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


def test_new_connection_rate_per_client_ip(start_relay) -> None:
    relay = start_relay(limits={"connections_per_ip_per_s": 2, "connection_burst_per_ip": 4},
                        server={"trusted_proxies": "127.0.0.1"})
    started = time.monotonic()
    accepted = 0
    refusal: InvalidStatus | None = None
    for _ in range(12):
        try:
            relay.ws(**xff("10.0.0.5")).close()
            accepted += 1
        except InvalidStatus as exc:
            refusal = exc
            break
    elapsed = time.monotonic() - started
    assert refusal is not None, f"{accepted} connections in {elapsed:.2f} s were all accepted"
    assert_rate_limited_response(refusal)
    assert 4 <= accepted <= 4 + int(elapsed * 2) + 1, (accepted, elapsed)  # the burst, then 2 per second
    # Other client IPs are not throttled by it.
    with relay.ws(**xff("10.0.0.6")) as other:
        other.auth(OTHER)
    # The bucket refills at 2/s.
    time.sleep(0.7)
    relay.ws(**xff("10.0.0.5")).close()


def test_connections_count_from_accept_and_rest_ones_only_while_open(start_relay) -> None:
    relay = start_relay(limits={"max_connections_per_ip": 2, "connections_per_ip_per_s": 1,
                                "connection_burst_per_ip": 1})
    with relay.ws() as client:
        for _ in range(5):
            assert relay.http("GET", "/health").status == 200
        client.auth(SENDER)
        idle = socket.create_connection(("127.0.0.1", relay.port))  # counted from accept, before any byte
        try:
            assert wait_until(lambda: relay.http("GET", "/health").status == 429)
        finally:
            idle.close()
        assert wait_until(lambda: relay.http("GET", "/health").status == 200)


# Sign-in attempts


def test_signature_checks_per_ip_are_limited(start_relay) -> None:
    relay = start_relay(limits={"auth_attempts_per_ip_per_min": 3}, server={"trusted_proxies": "127.0.0.1"})
    attacker = xff("10.1.1.1")
    for _ in range(3):
        with relay.ws(**attacker) as client:
            challenge = client.recv()
            client.send(signed_auth_frame(KEY_A, challenge, corrupt=True))
            error = client.recv()
            assert error["type"] == "error" and error["code"] == "auth_failed", error
    # The 4th check from that IP is refused before any verification, even with a good signature.
    with relay.ws(**attacker) as client:
        challenge = client.recv()
        client.send(signed_auth_frame(KEY_A, challenge))
        error = client.recv()
        assert error["type"] == "error" and error["code"] == "rate_limited", error
        assert client.no_frame(0.3)
    # Signed key writes from that IP share the budget.
    issued = int(time.time())
    pub = base64.b64encode(bytes(32)).decode()
    body = {"address": ADDR_A, "publicKey": pub, "keyType": "x25519", "issuedAt": issued, "format": "doubleHash",
            "signature": sign_text(KEY_A, key_statement(ADDR_A, "x25519", pub, issued), "doubleHash")}
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


def test_frame_flood_is_refused_then_closed_while_others_flow(start_relay) -> None:
    relay = start_relay(limits={"frames_per_s": 5, "frame_burst": 5, "rate_limited_close_after": 10})
    with relay.ws() as flooder, relay.ws() as sender, relay.ws() as receiver:
        flooder.auth(OTHER)
        sender.auth(SENDER)
        receiver.auth(PEER)
        sent = 0
        started = time.monotonic()
        try:
            for _ in range(60):
                flooder.send({"type": "ping"})
                sent += 1
        except ConnectionClosed:
            pass
        # Other connections are served while and after the flooder is cut.
        exchange(relay, sender, receiver, PEER, "flood-1")
        code, frames = closed_with(flooder)
        elapsed = time.monotonic() - started
        assert code == 1008
        pongs = [f for f in frames if f["type"] == "pong"]
        limited = [f for f in frames if f["type"] == "error"]
        assert 1 <= len(pongs) <= 4 + int(elapsed * 5) + 1, (elapsed, frames)  # burst 5 (auth took one)
        assert limited and all(f["code"] == "rate_limited" for f in limited), frames
        # Strikes reset only on an admitted frame; the 10th strike in a row closes without a frame.
        assert len(limited) <= 9 * len(pongs), frames
        assert len(pongs) + len(limited) < sent
        exchange(relay, sender, receiver, PEER, "flood-2")
        exchange(relay, receiver, sender, SENDER, "flood-3")
    assert relay.http("GET", "/health").status == 200


def test_rate_limited_frames_are_not_processed(start_relay) -> None:
    relay = start_relay(limits={"frames_per_s": 1, "frame_burst": 3, "rate_limited_close_after": 100})
    with relay.ws() as sender, relay.ws() as receiver:
        receiver.auth(PEER)
        sender.auth(SENDER)
        started = time.monotonic()
        for i in range(6):
            sender.send({"type": "message", "to": PEER, "content": "x", "messageId": f"rl-{i}"})
        answers = [sender.recv() for _ in range(6)]
        elapsed = time.monotonic() - started
        delivered = [a["messageId"] for a in answers if a["type"] == "delivered"]
        limited = [a for a in answers if a["type"] == "error"]
        # Burst 3, one taken by auth; one more per second of (slow) sending at most.
        assert 2 <= len(delivered) <= 2 + int(elapsed), (elapsed, answers)
        assert delivered[:2] == ["rl-0", "rl-1"], answers
        assert len(limited) == 6 - len(delivered), answers
        assert all(a["code"] == "rate_limited" for a in limited), answers
        got = [receiver.recv_type("message")["messageId"] for _ in delivered]
        assert got == delivered
        assert receiver.no_frame(0.3)


# Oversize frames before auth


def test_oversize_frame_before_auth_is_refused_and_closed(relay) -> None:
    with relay.ws() as client:
        assert client.recv()["type"] == "challenge"
        client.send(json.dumps({"type": "auth", "address": SENDER, "pad": "x" * 5000}))
        error = client.recv()
        assert error["type"] == "error" and error["code"] == "message_too_large", error
        code, frames = closed_with(client)
        assert code == 1009 and not frames


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
        code, _ = closed_with(client)
        assert code == 1009


# Readers that stop reading


@pytest.mark.parametrize("ack", [True, False], ids=["ack", "plain"])
def test_reader_that_never_reads_is_cut_off(start_relay, ack: bool) -> None:
    relay = start_relay(limits={"max_message_bytes": BIG, "max_outbound_bytes": 2 * BIG + 16384,
                                "max_inbound_bytes": 2 * BIG + 16384}, queue={"max_offline_bytes": 64 * 1024 * 1024})
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
            assert wait_until(lambda: not online(relay, READER)), "the cut-off reader still counts as online"
            # The relay stays responsive for everyone else.
            assert relay.http("GET", "/health").status == 200
            exchange(relay, sender, peer, PEER, "after-cut-1")
            exchange(relay, peer, sender, SENDER, "after-cut-2")
            if ack:
                # Nothing was acked, so everything stays queued and comes back on reconnect.
                assert queue_size(relay, READER) == len(answers)
                with relay.ws() as again:
                    again.auth(READER, ack=True)
                    first = again.recv_type("message", timeout=5)
                    assert first["messageId"] == "slow-0" and first["queued"] is True
                    again.recv_type("queue_empty", timeout=10)  # read the rest so the close is prompt
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


BACKLOG = 200  # 200 x 60 KB = 12 MB: more than the kernel's socket buffers plus max_outbound_bytes


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
        exchange(relay, sender, online_peer, PEER, "nq-live")
        # The connection stays open and the limit is per sender.
        sender.send({"type": "ping"})
        assert sender.recv_type("pong")
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


@pytest.mark.parametrize("auth,privacy,enabled", [
    ({"mode": "mixed"}, {"expose_online_list": "true"}, True),
    ({"mode": "open"}, {}, True),
    ({"mode": "open"}, {"expose_online_list": "false"}, False),
    ({"mode": "signed"}, {}, False),
])
def test_online_list_setting(start_relay, auth: dict, privacy: dict, enabled: bool) -> None:
    relay = start_relay(auth=auth, privacy=privacy)
    reply = relay.http("GET", "/api/status/online/all")
    if enabled:
        with relay.ws() as client:
            client.auth(SENDER)
            assert wait_until(lambda: relay.http("GET", "/api/status/online/all").json["users"] == [SENDER])
        assert reply.status == 200, reply
    else:
        assert reply.status == 404 and reply.json["code"] == "disabled", reply

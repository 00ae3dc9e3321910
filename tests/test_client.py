"""relayd.client against real relays (``ThreadRelay``) in open, mixed and signed modes.

Each test runs its client coroutine with ``asyncio.run`` in the test thread
while the relay serves from its own thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, Awaitable, Callable

import pytest
from support import HostileRelay, ThreadRelay, free_port, make_config, scaled

from relayd.client import (
    AuthRefused,
    ClientError,
    ClientTimeout,
    ConnectionLost,
    HttpError,
    Identity,
    KeyVerificationError,
    ProtocolViolation,
    RelayClient,
    RelayUnreachable,
    backoff_delays,
    connect_with_backoff,
    random_public_key,
    verify_key_record,
)
from relayd.client.decoding import parse_json
from relayd.client.display import json_line, shown

TIMEOUT = scaled(5)


def run(coro: Awaitable[Any]) -> Any:
    """Run one client scenario, bounded as a whole."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, scaled(60))
    return asyncio.run(bounded())


def client(relay: Any, identity: Identity | None = None, **kw: Any) -> RelayClient:
    return RelayClient(relay.url, identity, timeout=TIMEOUT, **kw)


def is_message(mid: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("type") == "message" and f.get("messageId") == mid


# Sign-in


@pytest.mark.parametrize("mode", ["open", "mixed"])
def test_plain_sign_in_live_message(start_relay, mode):
    relay = start_relay(auth={"mode": mode})
    a, b = Identity.generate(), Identity.generate()

    async def scenario() -> None:
        async with client(relay, Identity(a.address)) as ca, client(relay, Identity(b.address)) as cb:
            assert ca.sign_in.verified is False and ca.token is None
            assert ca.sign_in.address == a.address
            answer = await ca.send(b.address, "cipher-1", message_id="m-1")
            assert answer["type"] == "delivered" and answer["messageId"] == "m-1"
            got = await cb.recv_matching(is_message("m-1"), "the message")
            assert got["from"] == a.address and got["content"] == "cipher-1" and got["queued"] is False
    run(scenario())


def test_the_clients_connection_reads_from_the_heap(start_relay):
    from relayd.client.endpoint import Endpoint
    from relayd.client.transport import FrameStream
    from relayd.client.values import Deadline, Limits
    from relayd.reads import READ_SIZE
    relay = start_relay(auth={"mode": "open"})

    async def scenario() -> None:
        stream = await FrameStream.open(Endpoint.parse(relay.url), Limits(), Deadline(TIMEOUT))
        try:
            assert stream.ws.transport.max_size == READ_SIZE
        finally:
            await stream.ws.close()
    run(scenario())


def test_signed_identity_on_an_open_relay_signs_in_unverified(start_relay):
    relay = start_relay(auth={"mode": "open"})

    async def scenario() -> None:
        async with client(relay, Identity.generate()) as c:
            assert c.sign_in.challenge is None
            assert c.sign_in.verified is False
            assert (await c.ping())["type"] == "pong"
    run(scenario())


@pytest.mark.parametrize("mode", ["mixed", "signed"])
@pytest.mark.parametrize("fmt", ["doubleHash", "prefix"])
def test_signed_sign_in_is_verified_and_gets_a_token(start_relay, mode, fmt):
    relay = start_relay(auth={"mode": mode})
    me = Identity.generate()

    async def scenario() -> None:
        async with client(relay, me, signature_format=fmt) as c:
            assert c.sign_in.verified is True
            assert c.sign_in.challenge is not None and c.sign_in.challenge["type"] == "challenge"
            assert c.token and c.sign_in.token_expires_at
            # the probe's not_authenticated answer was consumed during sign-in, not left for recv:
            # a pong nobody waits for is the next frame recv returns
            await c.send_frame({"type": "ping"})
            assert (await c.recv())["type"] == "pong"
    run(scenario())


def test_signed_relay_refuses_plain_sign_in_with_its_code(start_relay):
    relay = start_relay(auth={"mode": "signed"})

    async def scenario() -> None:
        c = client(relay, Identity("0x" + "a1" * 20))
        with pytest.raises(AuthRefused) as info:
            await c.connect()
        assert info.value.code == "auth_required"
        assert not c.connected
    run(scenario())


def test_locked_address_refuses_plain_sign_in_in_mixed_mode(start_relay):
    relay = start_relay(auth={"mode": "mixed"})
    me = Identity.generate()

    async def scenario() -> None:
        async with client(relay, me):
            pass
        with pytest.raises(AuthRefused) as info:
            await client(relay, Identity(me.address)).connect()
        assert info.value.code == "auth_required"
    run(scenario())


def test_proving_ownership_ends_the_plain_session_and_iteration_stops(start_relay):
    relay = start_relay(auth={"mode": "mixed"})
    me = Identity.generate()

    async def scenario() -> None:
        plain = client(relay, Identity(me.address))
        await plain.connect()
        async with client(relay, me):
            frames = [frame async for frame in plain]
        assert [f.get("code") for f in frames] == ["auth_required"]
        assert plain.close_code == 4403
        with pytest.raises(ConnectionLost):
            await plain.recv(timeout=1)
        with pytest.raises(ConnectionLost):
            await plain.send(me.address, "x")
        await plain.close()
    run(scenario())


# Delivery


def test_queued_message_ack_mode_and_redelivery(start_relay):
    relay = start_relay(auth={"mode": "open"})
    a, b = Identity("0x" + "a1" * 20), Identity("0x" + "b2" * 20)

    async def scenario() -> None:
        async with client(relay, a) as ca:
            answer = await ca.send(b.address, "stored", message_id="q-1")
            assert answer["type"] == "queued" and answer["to"] == b.address
        async with client(relay, b, ack=True) as cb:
            got = await cb.recv()
            assert got["type"] == "message" and got["messageId"] == "q-1" and got["queued"] is True
            assert (await cb.recv())["type"] == "queue_empty"
        async with client(relay, b, ack=True) as cb:  # not acknowledged: delivered again
            assert (await cb.recv())["messageId"] == "q-1"
            assert (await cb.recv())["type"] == "queue_empty"
            await cb.ack(["q-1"])
            assert (await cb.ping())["type"] == "pong"  # the ack frame was processed before the pong
        async with client(relay, b, ack=True) as cb:
            assert (await cb.recv())["type"] == "queue_empty"
    run(scenario())


def test_error_answer_is_returned_by_send(start_relay):
    relay = start_relay(auth={"mode": "open"})

    async def scenario() -> None:
        async with client(relay, Identity("0x" + "a1" * 20)) as c:
            answer = await c.send("0x1234", "x", message_id="bad-to")
            assert answer["type"] == "error" and answer["code"] == "invalid_address"
            assert answer["messageId"] == "bad-to"
    run(scenario())


def test_typing_and_read_receipts(start_relay):
    relay = start_relay(auth={"mode": "open"})
    a, b = Identity("0x" + "a1" * 20), Identity("0x" + "b2" * 20)

    async def scenario() -> None:
        async with client(relay, a) as ca, client(relay, b) as cb:
            await ca.typing(b.address, True)
            typing = await cb.recv()
            assert typing == {"type": "typing", "from": a.address, "isTyping": True}
            await cb.read_receipt(a.address, "m-9")
            read = await ca.recv()
            assert read["type"] == "read" and read["from"] == b.address and read["messageId"] == "m-9"
    run(scenario())


# REST


def test_plain_key_round_trip_and_local_verification_refuses_it(start_relay):
    relay = start_relay(auth={"mode": "mixed"})
    me = Identity("0x" + "c3" * 20)
    key = random_public_key()

    async def scenario() -> None:
        c = client(relay, me)
        assert (await c.put_key(key))["verified"] is False
        record = await c.get_key(me.address)
        assert record["publicKey"] == key and record["verified"] is False
        with pytest.raises(KeyVerificationError, match="not signed"):
            await c.get_key(me.address, verify=True)
        assert await c.get_key("0x" + "d4" * 20) is None
    run(scenario())


def test_signed_key_round_trip_is_verified_locally(start_relay):
    relay = start_relay(auth={"mode": "signed"})
    me = Identity.generate()
    key = random_public_key()

    async def scenario() -> None:
        c = client(relay, me)
        assert (await c.put_key(key))["verified"] is True
        record = await c.get_key(me.address, verify=True)
        assert record["publicKey"] == key and record["statement"].startswith("Idena relay key v1\n")
        with pytest.raises(KeyVerificationError, match="statement does not match"):
            verify_key_record({**record, "publicKey": random_public_key()})
        forged = record["signature"][:-4] + ("00" if record["signature"][-4:-2] != "00" else "11") + \
            record["signature"][-2:]
        with pytest.raises(KeyVerificationError, match="does not recover"):
            verify_key_record({**record, "signature": forged})
        with pytest.raises(KeyVerificationError, match="not 0x"):
            verify_key_record(record, "0x" + "e5" * 20)
        with pytest.raises(HttpError) as info:
            await c.put_key(key, signed=False)
        assert info.value.status == 401 and info.value.code == "auth_required"
    run(scenario())


def test_status_follows_the_connection(start_relay):
    relay = start_relay(auth={"mode": "open"})
    me = Identity("0x" + "a1" * 20)

    async def scenario() -> None:
        observer = client(relay)
        assert (await observer.status(me.address))["online"] is False
        async with client(relay, me):
            assert (await observer.status(me.address))["online"] is True
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while (await observer.status(me.address))["online"]:
            assert asyncio.get_running_loop().time() < deadline, "still online after close"
            await asyncio.sleep(0.02)
        with pytest.raises(HttpError) as info:
            await observer.status("nobody")
        assert info.value.status == 400 and info.value.code == "invalid_address"
    run(scenario())


def test_token_opens_a_private_route(start_relay):
    relay = start_relay(auth={"mode": "mixed"})
    me, peer = Identity.generate(), Identity("0x" + "b2" * 20)

    async def scenario() -> None:
        async with client(relay, peer) as cp:
            assert (await cp.send(me.address, "for-rest", message_id="r-1"))["type"] == "queued"
        anonymous = client(relay, Identity(me.address))
        with pytest.raises(HttpError) as info:
            await anonymous.messages(limit=5)
        assert info.value.status == 401
        async with client(relay, me, ack=True) as c:
            peek = await c.messages(limit=5)
            assert [m["messageId"] for m in peek["messages"]] == ["r-1"]
            await c.delete_key()  # with the token: allowed even though there is no key
    run(scenario())


# Failures and reconnecting


def test_closed_port_is_unreachable():
    port = free_port()

    async def scenario() -> None:
        with pytest.raises(RelayUnreachable, match="connection refused"):
            await RelayClient(f"ws://127.0.0.1:{port}", Identity.generate(), timeout=TIMEOUT).connect()
        with pytest.raises(RelayUnreachable, match="connection refused"):
            await RelayClient(f"ws://127.0.0.1:{port}", timeout=TIMEOUT).health()
    run(scenario())


def test_plain_http_server_is_not_a_relay(not_a_relay_url):
    async def scenario() -> None:
        with pytest.raises(RelayUnreachable) as info:
            await RelayClient(not_a_relay_url, Identity.generate(), timeout=TIMEOUT).connect()
        assert "not a relay" in str(info.value) and "HTTP/1.0 200" in str(info.value)
        with pytest.raises(HttpError) as http_info:
            await RelayClient(not_a_relay_url, timeout=TIMEOUT).health()
        assert http_info.value.status == 404
    run(scenario())


def test_silent_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        async def scenario() -> None:
            c = RelayClient(f"ws://127.0.0.1:{listener.getsockname()[1]}", Identity.generate(), timeout=0.2)
            with pytest.raises(ClientTimeout, match="timeout opening a WebSocket"):
                await c.connect()
        run(scenario())
    finally:
        listener.close()


def test_bad_urls_and_identities_are_refused():
    for url in ("http://localhost:3000", "localhost:3000", "ws://", "ws://host:99999"):
        with pytest.raises(ValueError):
            RelayClient(url)
    with pytest.raises(ValueError):
        Identity("0x1234")
    with pytest.raises(ValueError, match="neither an Idena address"):
        Identity.parse("0x1234")


def test_backoff_delays_grow_jittered_and_capped():
    assert [round(d, 3) for d, _ in zip(backoff_delays(0.5, 4.0, rng=lambda: 1.0), range(6))] == \
        [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [round(d, 3) for d, _ in zip(backoff_delays(0.5, 4.0, rng=lambda: 0.0), range(5))] == \
        [0.25, 0.5, 1.0, 2.0, 2.0]


def test_connect_with_backoff_waits_for_a_relay_that_starts_later():
    port = free_port()
    failed_once = threading.Event()
    relays: list[ThreadRelay] = []

    def start_when_failed() -> None:
        if failed_once.wait(scaled(30)):
            relays.append(ThreadRelay(make_config(server={"port": port}, auth={"mode": "mixed"})))

    starter = threading.Thread(target=start_when_failed, daemon=True)
    starter.start()
    retries: list[str] = []

    def on_retry(attempt: int, delay: float, error: Exception) -> None:
        retries.append(type(error).__name__)
        failed_once.set()

    async def scenario() -> None:
        c = RelayClient(f"ws://127.0.0.1:{port}", Identity.generate(), timeout=TIMEOUT)
        sign_in = await connect_with_backoff(c, attempts=400, base=0.01, cap=0.1, on_retry=on_retry)
        assert sign_in.verified is True
        await c.close()
    try:
        run(scenario())
        assert retries and set(retries) == {"RelayUnreachable"}
    finally:
        failed_once.set()
        starter.join(scaled(15))
        for relay in relays:
            relay.stop()


def test_connect_with_backoff_does_not_retry_a_refusal(start_relay):
    relay = start_relay(auth={"mode": "signed"})
    retries: list[int] = []

    async def scenario() -> None:
        with pytest.raises(AuthRefused):
            await connect_with_backoff(client(relay, Identity("0x" + "a1" * 20)), attempts=5, base=0.01,
                                       on_retry=lambda n, d, e: retries.append(n))
    run(scenario())
    assert retries == []


def test_connect_with_backoff_gives_up_after_its_attempts():
    port = free_port()
    retries: list[int] = []

    async def scenario() -> None:
        with pytest.raises(RelayUnreachable):
            await connect_with_backoff(RelayClient(f"ws://127.0.0.1:{port}", Identity.generate(), timeout=TIMEOUT),
                                       attempts=3, base=0.01, cap=0.02, on_retry=lambda n, d, e: retries.append(n))
    run(scenario())
    assert retries == [1, 2]


def test_connect_again_after_the_connection_was_lost(start_relay):
    relay = start_relay(auth={"mode": "mixed"})
    me = Identity.generate()

    async def scenario() -> None:
        plain = client(relay, Identity(me.address))
        await plain.connect()
        async with client(relay, me):  # proving ownership ends the plain session (4403)
            with pytest.raises(ConnectionLost):
                while True:
                    await plain.recv(timeout=TIMEOUT)
        signed = client(relay, me)
        first = await signed.connect()
        await signed.close()
        assert not signed.connected
        with pytest.raises(ConnectionLost):
            await signed.ping()
        again = await signed.connect()  # the same client object reconnects
        assert again.verified is True and again.token != first.token
        assert signed.connected
        assert (await signed.ping())["type"] == "pong"
        await signed.close()
    run(scenario())


# A hostile relay: whatever it sends, a call fails by its deadline with a precise, short, escaped reason,
# and memory stays bounded. ``HostileRelay`` is a small asyncio server on 127.0.0.1 in its own thread that
# answers HTTP requests and WebSocket upgrades (a real handshake, then raw frames) as the scenario says.

MiB = 1 << 20
A_ADDRESS = "0x" + "a1" * 20
HOSTILE_TIMEOUT = scaled(1.5)
def peak_rss_growth(call: Callable[[], Any]) -> tuple[Any, int]:
    """What ``call()`` returned and how far this process's peak RSS rose above its RSS before (bytes)."""
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    result = call()
    return result, status("VmHWM") - before


def hostile_call(relay: HostileRelay, websocket: bool, **kw: Any) -> ClientError:
    """The error one REST call (``health``) or one sign-in against ``relay`` fails with, by its deadline."""
    async def scenario() -> ClientError:
        c = RelayClient(relay.url, Identity.generate(), timeout=HOSTILE_TIMEOUT, **kw)
        try:
            await (c.connect() if websocket else c.health())
        except ClientError as exc:
            return exc
        finally:
            await c.close()
        raise AssertionError("the hostile relay's answer was accepted")
    return run(scenario())


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
def test_a_trickling_relay_fails_the_call_by_its_deadline(hostile_relay, websocket):
    relay = hostile_relay("trickle")
    started = time.monotonic()
    error = hostile_call(relay, websocket)
    took = time.monotonic() - started
    assert isinstance(error, ClientTimeout), error
    assert f"after {HOSTILE_TIMEOUT:g} s" in str(error)
    assert took < HOSTILE_TIMEOUT + scaled(3), f"the call took {took:.1f} s"


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
def test_a_huge_answer_or_frame_is_refused_and_memory_stays_bounded(hostile_relay, websocket):
    relay = hostile_relay("huge")
    error, growth = peak_rss_growth(lambda: hostile_call(relay, websocket, max_frame_bytes=MiB, max_body_bytes=MiB))
    assert isinstance(error, ProtocolViolation), error
    limit = "max_frame_bytes" if websocket else "max_body_bytes"
    assert f"larger than the client's limit of {MiB} bytes ({limit})" in str(error)
    assert growth < 50 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"
    assert relay.sent < 100 * MiB, f"the client read {relay.sent / MiB:.0f} MiB before refusing"


def test_the_default_limits_refuse_a_huge_frame(hostile_relay):
    error, growth = peak_rss_growth(lambda: hostile_call(hostile_relay("huge"), True))
    assert f"limit of {4 * MiB} bytes (max_frame_bytes)" in str(error)
    assert growth < 50 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB"


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
def test_a_long_error_is_cut(hostile_relay, websocket):
    error = hostile_call(hostile_relay("long_error"), websocket)
    assert isinstance(error, AuthRefused if websocket else HttpError), error
    assert "in all)" in str(error) and len(str(error)) < 400, str(error)[:1000]


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
def test_escape_sequences_from_the_relay_are_escaped(hostile_relay, websocket):
    error = hostile_call(hostile_relay("escapes"), websocket)
    text = str(error)
    assert not any(ch in text for ch in "\x1b\x07\x9b\u202e"), repr(text)
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202e" in text


@pytest.mark.parametrize("websocket", [False, True], ids=["rest", "websocket"])
def test_deeply_nested_json_fails_with_a_precise_reason(hostile_relay, websocket):
    error = hostile_call(hostile_relay("nested"), websocket)
    assert isinstance(error, ProtocolViolation), error
    assert "invalid JSON from the relay: nesting too deep" in str(error)


def test_relay_text_is_shown_cut_and_escaped():
    assert shown("a\x1bb\nc\u202e") == "a\\x1bb\\nc\\u202e"
    assert shown("x" * 500, 10) == "x" * 10 + "... (500 characters in all)"
    assert shown(b"\xff\x1b" * 300, 5).startswith("\ufffd\\x1b\ufffd\\x1b\ufffd... (600 bytes in all)")
    assert json.loads(json_line({"m": "\x1b\x9b\ud800"})) == {"m": "\x1b\x9b\ud800"}
    assert "\x9b" not in json_line({"m": "\x9b"})


def test_invalid_json_reasons_are_precise():
    for raw, reason in [(b"[" * 65 + b"]" * 65, "nesting too deep"), (b'{"a": }', "Expecting value at line 1"),
                        (b"\xff", "not UTF-8"), (b"1" * 5000, "Exceeds the limit"),
                        (b"[" + b"{}," * 100000 + b"{}]", "too many values")]:
        with pytest.raises(ProtocolViolation, match=f"invalid JSON from the relay: {reason}"):
            parse_json(raw)
    assert parse_json(b'"' + b"[" * 1000 + b'"') == "[" * 1000  # brackets in strings are not nesting
    assert parse_json(json.dumps(["a,b:{" * 100000])) == ["a,b:{" * 100000]  # nor are separators values
    listing = {"messages": [{"messageId": str(i), "from": A_ADDRESS, "to": A_ADDRESS, "content": "x",
                             "timestamp": 1, "queued": True} for i in range(10000)]}
    assert parse_json(json.dumps(listing)) == listing

"""Proof of address ownership: signed sign-in, nonces, ownership locks, signed keys and bearer tokens.

Every test drives a real relay (``start_relay``/``relay`` fixtures) with real
WebSocket clients and HTTP requests; signatures come from the deterministic
RFC 6979 signer in ``relayd.identity.signing`` with keys from the vectors file.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
from support import (ADDR_A, ADDR_A_EIP55, ADDR_B, ADDR_C, KEY_A, KEY_B, KEY_C, assert_closed_with, assert_error,
                     auth_text, bearer, challenge_of, key_body, signed_auth_frame, signed_login)

from relayd.identity.secp256k1 import N
from relayd.identity.signatures import recover_address
from relayd.identity.signing import address_of_private, sign_text
from relayd.identity.statements import key_statement

ZERO_ADDRESS = "0x" + "00" * 20
# V8: the Idena docs' sign-in example signature and the address the page claims for it.
DOCS_SIG = ("0xe0434ea8ff5123a570b6b7e5f1b837af4524372d4552021bfcede66219abe00c376a8c8417299be23938b9644ba922ff"
            "d36bbbdd1cdf15719da9b2af9affdec601")
DOCS_CLAIMED_ADDRESS = "0x53eaeffe305d9ad38f6db104cde3d4822a60bf4d"

# A canonical base64 X25519 key containing '+' and '/' (so URL-safe spelling differs).
PUB_RAW = bytes([0xFB, 0xFF, 0xBF]) * 10 + b"\x01\x02"
PUB_KEY = base64.b64encode(PUB_RAW).decode()
PUB_KEY_2 = base64.b64encode(bytes(range(32))).decode()
PUB_KEY_3 = base64.b64encode(bytes(range(100, 132))).decode()

PRIVATE_ROUTES = [
    ("GET", "/api/messages/{a}"),
    ("GET", "/api/messages/{a}?limit=5"),
    ("DELETE", "/api/messages/{a}"),
    ("DELETE", "/api/public-keys/{a}"),
]


# Helpers


def token_of(relay: Any, key: bytes) -> str:
    client, reply = signed_login(relay, key)
    client.close()
    return reply["token"]


def expect_closed(client: Any, code: int) -> None:
    """The server closes the connection with ``code``; no auth_success arrives meanwhile."""
    frames = assert_closed_with(client, code, timeout=3)
    assert "auth_success" not in [f.get("type") for f in frames], frames


def expect_refused(client: Any, code: str, close_code: int | None) -> dict[str, Any]:
    """The next non-challenge frame is ``error`` with ``code``; then the connection closes with ``close_code``,
    or (None) stays open and unauthenticated with nothing else pending."""
    while True:
        frame = client.recv()
        if frame["type"] != "challenge":
            break
    assert frame["type"] == "error", frame
    assert frame["code"] == code, frame
    if close_code is not None:
        expect_closed(client, close_code)
    else:
        client.send({"type": "ping", "messageId": "after-refusal"})
        assert_error(client.recv(), "not_authenticated", "after-refusal")
    return frame


def auth_failed(client: Any) -> None:
    expect_refused(client, "auth_failed", 4401)


def error_code(reply: Any) -> str:
    return reply.json["code"]


def assert_locked_to_its_key(relay: Any) -> None:
    """ADDR_A is locked: unsigned auth in any spelling is refused (4403); ADDR_B still signs in
    unsigned, and KEY_A still signs in."""
    for spelling in (ADDR_A, ADDR_A_EIP55, ADDR_A.upper().replace("0X", "0x")):
        with relay.ws() as again:
            again.send({"type": "auth", "address": spelling})
            expect_refused(again, "auth_required", 4403)
    with relay.ws() as other:
        assert other.auth(ADDR_B)["verified"] is False
    client, reply = signed_login(relay, KEY_A)
    client.close()
    assert reply["verified"] is True


# Sanity: the keys are the vectors' keys


def test_vector_keys_map_to_their_addresses() -> None:
    assert address_of_private(KEY_A) == ADDR_A == ADDR_A_EIP55.lower()
    assert address_of_private(KEY_B) == ADDR_B
    assert address_of_private(KEY_C) == ADDR_C


# Happy path


def test_challenge_frame_shape(relay) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
    assert set(ch) == {"type", "version", "nonce", "relay", "issuedAt", "expiresAt", "formats"}
    assert ch["version"] == 1
    assert ch["nonce"].startswith("signin-") and len(ch["nonce"]) == len("signin-") + 36
    assert ch["relay"] == f"ws://127.0.0.1:{relay.port}"
    assert isinstance(ch["issuedAt"], int) and abs(ch["issuedAt"] - time.time()) < 5
    assert ch["expiresAt"] - ch["issuedAt"] == 120
    assert ch["formats"] == ["doubleHash", "prefix"]


def test_challenges_are_unique_per_connection(relay) -> None:
    nonces = set()
    for _ in range(5):
        with relay.ws() as client:
            nonces.add(challenge_of(client)["nonce"])
    assert len(nonces) == 5


@pytest.mark.parametrize("fmt", ["doubleHash", "prefix"])
def test_signed_auth_succeeds_in_both_formats(relay, fmt: str) -> None:
    before = time.time()
    client, reply = signed_login(relay, KEY_A, fmt=fmt)
    with client:
        assert reply["address"] == ADDR_A
        assert reply["verified"] is True
        assert isinstance(reply["token"], str) and len(reply["token"]) >= 32
        assert isinstance(reply["tokenExpiresAt"], int)
        assert before * 1000 + 86_390_000 <= reply["tokenExpiresAt"] <= time.time() * 1000 + 86_410_000
        # The session is live: a message to itself is delivered.
        client.send({"type": "message", "to": ADDR_A, "content": "hi", "messageId": "self-1"})
        assert client.recv_type("delivered")["messageId"] == "self-1"
    # The token opens the private routes of that address.
    assert relay.http("GET", f"/api/messages/{ADDR_A}", headers=bearer(reply["token"])).status == 200


def test_signed_auth_with_eip55_address(relay) -> None:
    """The client sends a mixed-case address but signs the lower-case statement."""
    with relay.ws() as client:
        ch = challenge_of(client)
        frame = signed_auth_frame(KEY_A, ch, address=ADDR_A_EIP55)
        client.send(frame)
        reply = client.recv()
        assert reply["type"] == "auth_success" and reply["address"] == ADDR_A and reply["verified"] is True


def test_tokens_are_distinct_per_sign_in(relay) -> None:
    assert token_of(relay, KEY_A) != token_of(relay, KEY_A)


def test_v27_and_v28_signatures_are_accepted(relay) -> None:
    """web3dart writes v as 27/28; the relay normalises it. Sign until both recovery ids were seen."""
    seen: set[int] = set()
    for _ in range(24):
        with relay.ws() as client:
            ch = challenge_of(client)
            frame = signed_auth_frame(KEY_A, ch)
            raw = bytearray.fromhex(frame["signature"][2:])
            assert raw[64] in (0, 1)
            v = raw[64] + 27
            raw[64] = v
            client.send({**frame, "signature": "0x" + raw.hex()})
            reply = client.recv()
            assert reply["type"] == "auth_success" and reply["verified"] is True, (v, reply)
            seen.add(v)
        if seen == {27, 28}:
            break
    assert seen == {27, 28}


# Nonces


def test_replayed_nonce_on_a_new_connection_fails(relay) -> None:
    with relay.ws() as first:
        ch = challenge_of(first)
        frame = signed_auth_frame(KEY_A, ch)
        first.send(frame)
        assert first.recv()["type"] == "auth_success"
    with relay.ws() as second:
        fresh = challenge_of(second)
        assert fresh["nonce"] != ch["nonce"]
        second.send(frame)  # the old nonce and its (valid) signature
        auth_failed(second)


def test_second_auth_frame_on_the_same_connection_mints_nothing(relay) -> None:
    """Replaying the frame on its own (already signed-in) connection yields no new token
    and cannot rebind the connection to another address."""
    with relay.ws() as client:
        ch = challenge_of(client)
        frame = signed_auth_frame(KEY_A, ch)
        client.send(frame)
        first = client.recv()
        assert first["type"] == "auth_success" and "token" in first
        client.send(frame)
        again = client.recv()
        assert set(again) == {"type", "address", "timestamp", "verified"}, "a used nonce minted a second token"
        assert (again["type"], again["address"], again["verified"]) == ("auth_success", ADDR_A, True)
        # The same nonce signed for another address never switches the connection.
        client.send(signed_auth_frame(KEY_B, ch))
        assert_error(client.recv(), "already_authenticated")
        # Still A: a message to itself comes from A (and then its answer).
        client.send({"type": "message", "to": ADDR_A, "content": "x", "messageId": "still-a"})
        got = client.recv()
        assert (got["type"], got["from"], got["messageId"]) == ("message", ADDR_A, "still-a"), got
        assert client.recv()["type"] == "delivered"


def test_nonce_of_another_connection_fails_and_leaves_it_usable(relay) -> None:
    with relay.ws() as owner, relay.ws() as thief:
        owner_ch = challenge_of(owner)
        challenge_of(thief)
        thief.send(signed_auth_frame(KEY_B, owner_ch))
        auth_failed(thief)
        owner.send(signed_auth_frame(KEY_A, owner_ch))
        assert owner.recv()["type"] == "auth_success"


def test_expired_nonce_fails(start_relay, manual_clock) -> None:
    relay = start_relay(auth={"challenge_ttl_s": 5}, clock=manual_clock)
    with relay.ws() as client:
        ch = challenge_of(client)
        assert ch["expiresAt"] - ch["issuedAt"] == 5
        manual_clock.advance(ch["expiresAt"] - manual_clock.wall() + 0.3)
        client.send(signed_auth_frame(KEY_A, ch))
        auth_failed(client)
    # A fresh challenge on the same relay still works: the refusal was the expiry.
    client, reply = signed_login(relay, KEY_A)
    client.close()
    assert reply["verified"] is True


# What the signature binds


def test_statement_for_another_relay_fails(relay) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send(signed_auth_frame(KEY_A, ch, relay="wss://evil.example.org"))
        auth_failed(client)


def test_statement_with_other_issued_time_fails(relay) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send(signed_auth_frame(KEY_A, ch, issued=ch["issuedAt"] + 1))
        auth_failed(client)


def test_signature_by_another_key_fails(relay) -> None:
    """Signature made by key B over the statement naming A, sent as A."""
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({"type": "auth", "address": ADDR_A, "nonce": ch["nonce"], "format": "doubleHash",
                     "signature": sign_text(KEY_B, auth_text(ch, ADDR_A), "doubleHash")})
        auth_failed(client)


def test_own_statement_presented_for_another_address_fails(relay) -> None:
    """B signs a statement naming B, then claims address A with it."""
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_B, ch), "address": ADDR_A})
        auth_failed(client)


def test_format_mismatch_fails(relay) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_A, ch, fmt="prefix"), "format": "doubleHash"})
        auth_failed(client)


def test_unknown_format_is_invalid_field(relay) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_A, ch), "format": "raw"})
        expect_refused(client, "invalid_field", None)


def _tamper(sig: bytes, case: str) -> str:
    raw = bytearray(sig)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")

    def with_rs(r2: int, s2: int) -> bytes:
        return r2.to_bytes(32, "big") + s2.to_bytes(32, "big") + bytes(raw[64:])

    if case == "bitflip_r":
        raw[7] ^= 0x01
        out = bytes(raw)
    elif case == "bitflip_s":
        raw[45] ^= 0x10
        out = bytes(raw)
    elif case == "flip_recovery_id":
        raw[64] ^= 1
        out = bytes(raw)
    elif case == "v5":
        raw[64] = 5
        out = bytes(raw)
    elif case == "v29":
        raw[64] = 29
        out = bytes(raw)
    elif case == "64_bytes":
        out = bytes(raw[:64])
    elif case == "66_bytes":
        out = bytes(raw) + b"\x00"
    elif case == "all_zero":
        out = bytes(65)
    elif case == "r_zero":
        out = with_rs(0, s)
    elif case == "s_zero":
        out = with_rs(r, 0)
    elif case == "r_n":
        out = with_rs(N, s)
    elif case == "s_n":
        out = with_rs(r, N)
    elif case == "r_max":
        out = with_rs(2**256 - 1, s)
    elif case == "s_max":
        out = with_rs(r, 2**256 - 1)
    else:  # pragma: no cover
        raise AssertionError(case)
    return "0x" + out.hex()


TAMPERED = ["bitflip_r", "bitflip_s", "flip_recovery_id", "v5", "v29", "64_bytes", "66_bytes", "all_zero",
            "r_zero", "s_zero", "r_n", "s_n", "r_max", "s_max"]


@pytest.mark.parametrize("case", TAMPERED)
def test_malformed_signature_is_auth_failed(relay, case: str) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        frame = signed_auth_frame(KEY_A, ch)
        client.send({**frame, "signature": _tamper(bytes.fromhex(frame["signature"][2:]), case)})
        auth_failed(client)


@pytest.mark.parametrize("signature", ["", "0x", "0x" + "zz" * 65, "not a signature", "0x" + "ab" * 65 + "\n",
                                       " 0x" + "ab" * 65])
def test_garbage_signature_string_is_auth_failed(relay, signature: str) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_A, ch), "signature": signature})
        auth_failed(client)


@pytest.mark.parametrize("signature", [12345, 1.5, True, ["0x00"], {"r": 1}])
def test_non_string_signature_is_invalid_field(relay, signature: Any) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_A, ch), "signature": signature})
        expect_refused(client, "invalid_field", None)


def test_signature_over_another_text_fails(relay) -> None:
    """V8: a valid signature over a different text recovers another address."""
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_A, ch),
                     "signature": sign_text(KEY_A, auth_text(ch, ADDR_A) + " ", "doubleHash")})
        auth_failed(client)


def test_docs_example_signature_is_refused(relay) -> None:
    """V8: the Idena docs' example signature does not belong to the address the page claims."""
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({"type": "auth", "address": DOCS_CLAIMED_ADDRESS, "nonce": ch["nonce"],
                     "signature": DOCS_SIG, "format": "doubleHash"})
        auth_failed(client)


def test_zero_address_cannot_sign_in(relay) -> None:
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_A, ch, address=ZERO_ADDRESS)})
        auth_failed(client)


# The upgrade lock (mixed mode)


def test_unsigned_auth_in_mixed_mode_is_unverified(relay) -> None:
    with relay.ws() as client:
        challenge_of(client)
        reply = client.auth(ADDR_B)
        assert reply["verified"] is False
        assert "token" not in reply


def test_signed_address_is_locked_against_unsigned_auth(relay) -> None:
    client, _ = signed_login(relay, KEY_A)
    client.close()
    assert_locked_to_its_key(relay)


def test_lock_holds_while_a_signed_session_is_online(relay) -> None:
    """An impostor cannot attach an unsigned session next to the owner's signed one."""
    owner, _ = signed_login(relay, KEY_A)
    with owner, relay.ws() as impostor:
        impostor.send({"type": "auth", "address": ADDR_A})
        expect_refused(impostor, "auth_required", 4403)
        owner.send({"type": "ping"})
        assert owner.recv_type("pong")


def prove_by_signing_in(relay: Any) -> Any:
    owner, _ = signed_login(relay, KEY_A)
    return owner


def prove_by_a_signed_key(relay: Any) -> None:
    assert relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, int(time.time()))).status == 200


@pytest.mark.parametrize("prove", [prove_by_signing_in, prove_by_a_signed_key], ids=["signed_auth", "signed_key"])
def test_proving_ownership_evicts_earlier_unsigned_sessions(relay, prove: Any) -> None:
    with relay.ws() as impostor:
        challenge_of(impostor)
        assert impostor.auth(ADDR_A)["verified"] is False
        owner = prove(relay)
        with relay.ws() as sender:
            sender.auth(ADDR_B)
            sender.send({"type": "message", "to": ADDR_A, "content": "for the owner only", "messageId": "own-1"})
            assert sender.recv()["type"] == ("queued" if owner is None else "delivered")
        # The unsigned session is told why and closed; it never gets the owner's mail.
        frames = assert_closed_with(impostor, 4403)
        assert [(f["type"], f.get("code")) for f in frames] == [("error", "auth_required")], frames
    if owner is None:  # proven with a key: the owner signs in now and finds the message stored
        owner = prove_by_signing_in(relay)
    with owner:
        assert owner.recv_type("message")["messageId"] == "own-1"


def test_signed_key_locks_the_address(relay) -> None:
    reply = relay.http("POST", "/api/public-keys", key_body(KEY_C, PUB_KEY, int(time.time())))
    assert reply.status == 200, reply
    with relay.ws() as client:
        client.send({"type": "auth", "address": ADDR_C})
        expect_refused(client, "auth_required", 4403)


def test_locked_address_refuses_unsigned_key_writes(relay) -> None:
    client, _ = signed_login(relay, KEY_A)
    client.close()
    reply = relay.http("POST", "/api/public-keys", {"address": ADDR_A, "publicKey": "anything"})
    assert reply.status == 401 and error_code(reply) == "auth_required", reply
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").status == 404


def test_lock_survives_a_restart_with_sqlite(start_relay, tmp_path) -> None:
    from relayd.storage.sqlite.store import SQLiteStore

    path = str(tmp_path / "relayd.db")
    first = start_relay(SQLiteStore(path))
    client, _ = signed_login(first, KEY_A)
    client.close()
    first.stop()
    assert_locked_to_its_key(start_relay(SQLiteStore(path)))


# Signed keys


def test_signed_key_is_verified_and_verifiable_by_clients(relay) -> None:
    issued = int(time.time())
    for key, fmt, pub in ((KEY_A, "doubleHash", PUB_KEY), (KEY_B, "prefix", PUB_KEY_2)):
        reply = relay.http("POST", "/api/public-keys", key_body(key, pub, issued, fmt=fmt))
        assert reply.status == 200, reply
        assert reply.json["verified"] is True
    relay.http("POST", "/api/public-keys", {"address": ADDR_C, "publicKey": "unsigned-key"})

    views = {a: relay.http("GET", f"/api/public-keys/{a}").json for a in (ADDR_A, ADDR_B, ADDR_C)}
    batch = relay.http("POST", "/api/public-keys/batch", {"addresses": [ADDR_A, ADDR_B, ADDR_C]}).json
    assert batch["count"] == 3
    for address, key_fmt, pub in ((ADDR_A, "doubleHash", PUB_KEY), (ADDR_B, "prefix", PUB_KEY_2)):
        for view in (views[address], batch["keys"][address]):
            assert view["verified"] is True
            assert view["address"] == address and view["publicKey"] == pub
            assert view["keyType"] == "x25519" and view["issuedAt"] == issued and view["format"] == key_fmt
            assert view["statement"] == key_statement(address, "x25519", pub, issued)
            # What a client does: recover the signer from the statement alone.
            assert recover_address(view["statement"], view["signature"], view["format"]) == address
    for view in (views[ADDR_C], batch["keys"][ADDR_C]):
        assert view["verified"] is False
        assert not {"signature", "statement", "issuedAt", "keyType", "format"} & set(view)


def test_signed_key_rollback_is_refused(relay) -> None:
    now = int(time.time())
    first = key_body(KEY_A, PUB_KEY, now - 10)
    assert relay.http("POST", "/api/public-keys", first).status == 200
    replay = relay.http("POST", "/api/public-keys", first)
    assert replay.status == 409 and error_code(replay) == "stale_statement", replay
    older = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY_2, now - 20))
    assert older.status == 409 and error_code(older) == "stale_statement", older
    equal = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY_2, now - 10))
    assert equal.status == 409 and error_code(equal) == "stale_statement", equal
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").json["publicKey"] == PUB_KEY
    newer = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY_3, now))
    assert newer.status == 200, newer
    view = relay.http("GET", f"/api/public-keys/{ADDR_A}").json
    assert view["publicKey"] == PUB_KEY_3 and view["issuedAt"] == now


def test_unsigned_overwrite_of_a_signed_key_is_refused(relay) -> None:
    assert relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, int(time.time()))).status == 200
    reply = relay.http("POST", "/api/public-keys", {"address": ADDR_A_EIP55, "publicKey": PUB_KEY_2})
    assert reply.status == 401 and error_code(reply) == "auth_required", reply
    view = relay.http("GET", f"/api/public-keys/{ADDR_A}").json
    assert view["publicKey"] == PUB_KEY and view["verified"] is True


def _non_canonical_keys() -> list[str]:
    canonical = PUB_KEY
    assert "+" in canonical or "/" in canonical
    last = canonical[-2]  # the character before '=' carries 2 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    loose_bits = canonical[:-2] + alphabet[alphabet.index(last) | 1] + "="
    assert loose_bits != canonical and base64.b64decode(loose_bits) == PUB_RAW
    return [
        loose_bits,  # non-zero padding bits
        canonical.rstrip("="),  # missing padding
        canonical.replace("+", "-").replace("/", "_"),  # URL-safe alphabet
        canonical + "\n",
        " " + canonical,
        canonical[:20] + "\n" + canonical[20:],
    ]


@pytest.mark.parametrize("public_key", _non_canonical_keys())
def test_signed_key_must_be_canonical_base64(relay, public_key: str) -> None:
    reply = relay.http("POST", "/api/public-keys", key_body(KEY_A, public_key, int(time.time())))
    assert reply.status == 400 and error_code(reply) == "invalid_field", reply
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").status == 404


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_signed_key_must_be_32_bytes(relay, size: int) -> None:
    public_key = base64.b64encode(bytes(range(size))).decode() or "="
    reply = relay.http("POST", "/api/public-keys", key_body(KEY_A, public_key, int(time.time())))
    assert reply.status == 400 and error_code(reply) == "invalid_field", reply


@pytest.mark.parametrize("key_type", [None, "ed25519", "X25519", "", 25519, ["x25519"]])
def test_signed_key_needs_a_known_key_type(relay, key_type: Any) -> None:
    body = key_body(KEY_A, PUB_KEY, int(time.time()), key_type=key_type)
    reply = relay.http("POST", "/api/public-keys", body)
    assert reply.status == 400 and error_code(reply) == "invalid_field", reply


@pytest.mark.parametrize("offset", [-700, 700, -86400])
def test_signed_key_with_stale_or_future_issued_at_is_refused(relay, offset: int) -> None:
    reply = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, int(time.time()) + offset))
    assert reply.status == 400 and error_code(reply) == "invalid_field", reply


@pytest.mark.parametrize("issued", ["now", 1.5, True, None])
def test_signed_key_issued_at_must_be_integer_seconds(relay, issued: Any) -> None:
    body = key_body(KEY_A, PUB_KEY, int(time.time()))
    body["issuedAt"] = issued
    reply = relay.http("POST", "/api/public-keys", body)
    assert reply.status == 400 and error_code(reply) == "invalid_field", reply


def test_signed_key_with_milliseconds_is_refused(relay) -> None:
    """A client that sends Date.now() (ms) instead of seconds is out of the skew window."""
    reply = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, int(time.time() * 1000)))
    assert reply.status == 400 and error_code(reply) == "invalid_field", reply


@pytest.mark.parametrize("case", ["other_signer", "other_key_in_statement", "tampered"])
def test_signed_key_with_bad_signature_is_auth_failed(relay, case: str) -> None:
    issued = int(time.time())
    body = key_body(KEY_A, PUB_KEY, issued)
    if case == "other_signer":
        body = key_body(KEY_A, PUB_KEY, issued, signer=KEY_B)
    elif case == "other_key_in_statement":
        body["signature"] = key_body(KEY_A, PUB_KEY_2, issued)["signature"]
    else:
        body["signature"] = _tamper(bytes.fromhex(body["signature"][2:]), "bitflip_s")
    reply = relay.http("POST", "/api/public-keys", body)
    assert reply.status == 401 and error_code(reply) == "auth_failed", reply
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").status == 404


# Bearer tokens on private routes


@pytest.mark.parametrize("method,route", PRIVATE_ROUTES)
def test_private_route_needs_the_owners_token(relay, method: str, route: str) -> None:
    token_a = token_of(relay, KEY_A)
    token_b = token_of(relay, KEY_B)
    path = route.format(a=ADDR_A)

    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer bogus-token"},
                    {"Authorization": f"Basic {token_a}"}, {"Authorization": token_a}):
        reply = relay.http(method, path, headers=headers)
        assert reply.status == 401 and error_code(reply) == "unauthorized", (headers, reply)
        assert "bearer" in reply.headers.get("www-authenticate", "").lower(), reply.headers

    reply = relay.http(method, path, headers=bearer(token_b))
    assert reply.status == 403 and error_code(reply) == "forbidden", reply

    reply = relay.http(method, path, headers=bearer(token_a))
    assert reply.status == 200, reply
    # The same route with B's own token for B's address works too.
    assert relay.http(method, route.format(a=ADDR_B), headers=bearer(token_b)).status == 200


def test_tokens_per_address_are_bounded(relay) -> None:
    """Every sign-in mints a token; an address keeps at most 16, the oldest is revoked first."""
    tokens = [token_of(relay, KEY_A) for _ in range(17)]
    assert len(set(tokens)) == 17
    assert relay.http("DELETE", f"/api/messages/{ADDR_A}", headers=bearer(tokens[0])).status == 401
    for token in (tokens[1], tokens[-1]):
        assert relay.http("DELETE", f"/api/messages/{ADDR_A}", headers=bearer(token)).status == 200


def test_token_expires_after_its_ttl(start_relay, manual_clock) -> None:
    relay = start_relay(auth={"token_ttl_s": 10}, clock=manual_clock)
    token = token_of(relay, KEY_A)
    path = f"/api/messages/{ADDR_A}"
    manual_clock.advance(9.5)
    assert relay.http("GET", path, headers=bearer(token)).status == 200
    manual_clock.advance(0.5)
    reply = relay.http("GET", path, headers=bearer(token))
    assert reply.status == 401 and error_code(reply) == "unauthorized", reply


def test_token_drains_own_queue_and_peek_needs_it_too(relay) -> None:
    token = token_of(relay, KEY_A)  # signs in and out: A is offline again
    with relay.ws() as sender:
        sender.auth(ADDR_C)
        for i in range(2):
            sender.send({"type": "message", "to": ADDR_A, "content": f"m{i}", "messageId": f"q{i}"})
            assert sender.recv_type("queued")["messageId"] == f"q{i}"
    for path in (f"/api/messages/{ADDR_A}", f"/api/messages/{ADDR_A}?limit=10"):
        assert relay.http("GET", path).status == 401
        assert relay.http("GET", path, headers=bearer(token_of(relay, KEY_B))).status == 403
    assert relay.http("GET", f"/api/messages/{ADDR_A}/queue-size").json["queueSize"] == 2
    peek = relay.http("GET", f"/api/messages/{ADDR_A}?limit=10", headers=bearer(token))
    assert peek.status == 200 and peek.json["count"] == 2
    assert relay.http("GET", f"/api/messages/{ADDR_A}/queue-size").json["queueSize"] == 2
    drained = relay.http("GET", f"/api/messages/{ADDR_A}", headers=bearer(token))
    assert drained.status == 200 and [m["messageId"] for m in drained.json["messages"]] == ["q0", "q1"]
    assert relay.http("GET", f"/api/messages/{ADDR_A}/queue-size").json["queueSize"] == 0


def test_owner_can_delete_own_signed_key_but_lock_remains(relay) -> None:
    assert relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, int(time.time()))).status == 200
    token = token_of(relay, KEY_A)
    reply = relay.http("DELETE", f"/api/public-keys/{ADDR_A}", headers=bearer(token))
    assert reply.status == 200 and reply.json["success"] is True
    assert relay.http("GET", f"/api/public-keys/{ADDR_A}").status == 404
    unsigned = relay.http("POST", "/api/public-keys", {"address": ADDR_A, "publicKey": PUB_KEY_2})
    assert unsigned.status == 401 and error_code(unsigned) == "auth_required"


# Modes


def test_open_mode_has_no_challenge_and_no_token_checks(start_relay) -> None:
    relay = start_relay(auth={"mode": "open"})
    with relay.ws() as client:
        client.send({"type": "ping", "messageId": "first"})  # a challenge would come before its answer
        assert_error(client.recv(), "not_authenticated", "first")
        assert client.auth(ADDR_A)["type"] == "auth_success"
    with relay.ws() as other:
        assert other.auth(ADDR_B)["type"] == "auth_success"
        other.send({"type": "message", "to": ADDR_C, "content": "x", "messageId": "o1"})
        assert other.recv_type("queued")
    for method, route in PRIVATE_ROUTES:
        assert relay.http(method, route.format(a=ADDR_C)).status == 200, (method, route)
    assert relay.http("POST", "/api/public-keys", {"address": ADDR_A, "publicKey": "k"}).status == 200
    assert relay.http("GET", "/api/status/online/all").status == 200


def test_signed_mode_refuses_unsigned_auth_and_keys(start_relay) -> None:
    relay = start_relay(auth={"mode": "signed"})
    with relay.ws() as client:
        challenge_of(client)
        client.send({"type": "auth", "address": ADDR_B})
        expect_refused(client, "auth_required", 4403)
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send({**signed_auth_frame(KEY_B, ch), "signature": None})
        expect_refused(client, "auth_required", 4403)
    reply = relay.http("POST", "/api/public-keys", {"address": ADDR_B, "publicKey": PUB_KEY})
    assert reply.status == 401 and error_code(reply) == "auth_required", reply
    client, success = signed_login(relay, KEY_B, fmt="prefix")
    client.close()
    assert success["verified"] is True
    assert relay.http("POST", "/api/public-keys", key_body(KEY_B, PUB_KEY, int(time.time()))).status == 200
    assert relay.http("GET", f"/api/messages/{ADDR_B}").status == 401
    assert relay.http("GET", f"/api/messages/{ADDR_B}", headers=bearer(success["token"])).status == 200
    assert relay.http("GET", "/api/status/online/all").status == 404


def test_signed_mode_still_refuses_bad_signatures(start_relay) -> None:
    relay = start_relay(auth={"mode": "signed"})
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send(signed_auth_frame(KEY_A, ch, relay="ws://elsewhere:1"))
        auth_failed(client)


def test_public_url_is_the_bound_relay(start_relay) -> None:
    relay = start_relay(server={"public_url": "wss://relay.example.org"})
    with relay.ws() as client:
        ch = challenge_of(client)
        assert ch["relay"] == "wss://relay.example.org"
        client.send(signed_auth_frame(KEY_A, ch, relay=f"ws://127.0.0.1:{relay.port}"))
        auth_failed(client)
    with relay.ws() as client:
        ch = challenge_of(client)
        client.send(signed_auth_frame(KEY_A, ch))
        assert client.recv()["type"] == "auth_success"


def test_signed_key_in_open_mode_neither_locks_nor_evicts_its_own_session(start_relay) -> None:
    """Open mode: anyone may claim any address, so a signed key proves nothing to lock against."""
    relay = start_relay(auth={"mode": "open"})
    with relay.ws() as owner:
        owner.auth(ADDR_A)
        reply = relay.http("POST", "/api/public-keys", key_body(KEY_A, PUB_KEY, int(time.time())))
        assert reply.status == 200 and reply.json["verified"] is True, reply
        owner.send({"type": "ping"})
        assert owner.recv_type("pong")["type"] == "pong"
        with relay.ws() as other:
            assert other.auth(ADDR_A)["verified"] is False

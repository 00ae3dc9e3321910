"""relayd.identity.signing against the signing and address vectors of /work/shared/auth-test-vectors.md,
plus private-key generation and the key file format."""

from __future__ import annotations

import os
import stat

import pytest
from support import (V2_ADDRESS, V2_HASH, V2_KEY, V2_SIG, V2_TEXT, V3_HASH, V3_SIG, V5_KEYS, V5_SIG, V5_TEXT, V6_CASES,
                     V7_ADDRESS, V7_HASH, V7_KEY, V7_R, V7_S)

from relayd.identity.keccak import keccak256
from relayd.identity.secp256k1 import N
from relayd.identity.signatures import message_hash, recover_address, verify
from relayd.identity.signing import (
    KeyFileError,
    SigningKey,
    address_of_private,
    generate_private_key,
    load_key_file,
    sign_hash,
    sign_text,
    write_key_file,
)

def key(hex_text: str) -> bytes:
    return bytes.fromhex(hex_text)


# Vectors


def test_v2_address_and_double_hash_signature() -> None:
    assert address_of_private(key(V2_KEY)) == V2_ADDRESS.lower()
    assert message_hash(V2_TEXT, "doubleHash").hex() == V2_HASH
    assert sign_text(key(V2_KEY), V2_TEXT, "doubleHash") == "0x" + V2_SIG
    assert sign_hash(key(V2_KEY), bytes.fromhex(V2_HASH)).hex() == V2_SIG


def test_v3_prefix_signature() -> None:
    assert message_hash(V2_TEXT, "prefix").hex() == V3_HASH
    assert sign_text(key(V2_KEY), V2_TEXT, "prefix") == "0x" + V3_SIG


@pytest.mark.parametrize(("key_hex", "address"), V5_KEYS)
def test_v5_key_to_address(key_hex: str, address: str) -> None:
    assert address_of_private(key(key_hex)) == address
    assert SigningKey(key(key_hex)).address == address


def test_v5_signin_signature() -> None:
    assert SigningKey(key(V5_KEYS[0][0])).sign(V5_TEXT) == "0x" + V5_SIG
    assert SigningKey(key(V5_KEYS[0][0])).sign(V5_TEXT, "doubleHash") == "0x" + V5_SIG


@pytest.mark.parametrize(("key_hex", "address", "sig_hex"), V6_CASES)
def test_v6_signatures_over_a_digest(key_hex: str, address: str, sig_hex: str) -> None:
    assert sign_hash(key(key_hex), keccak256(b"message")).hex() == sig_hex
    assert address_of_private(key(key_hex)) == address


def test_v7_low_s_signature_with_recovery_id_0() -> None:
    sig = sign_hash(key(V7_KEY), bytes.fromhex(V7_HASH))
    assert sig[:32].hex() == V7_R
    assert sig[32:64].hex() == V7_S
    assert sig[64] == 0  # the vector's v = 27, normalised
    assert int(V7_S, 16) <= N // 2
    assert address_of_private(key(V7_KEY)) == V7_ADDRESS


def test_v8_a_signature_binds_its_text() -> None:
    other = sign_text(key(V2_KEY), "salt-0x010203-51", "doubleHash")
    assert other != "0x" + V2_SIG
    assert verify("salt-0x010203-51", other, "doubleHash", V2_ADDRESS)
    assert not verify("salt-0x010203-51", "0x" + V2_SIG, "doubleHash", V2_ADDRESS)


# Keys


def test_generated_keys_are_valid_distinct_and_sign() -> None:
    keys = {generate_private_key() for _ in range(4)}
    assert len(keys) == 4
    for secret in keys:
        assert len(secret) == 32 and 0 < int.from_bytes(secret, "big") < N
    signer = SigningKey.generate()
    for fmt in ("doubleHash", "prefix"):
        assert recover_address("hello", signer.sign("hello", fmt), fmt) == signer.address


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x00" * 32, N.to_bytes(32, "big"), b"\xff" * 32])
def test_invalid_private_keys_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        SigningKey(bad)
    with pytest.raises(ValueError):
        sign_text(bad, "x", "doubleHash")


def test_signing_key_hex_round_trip_and_repr_hides_the_secret() -> None:
    signer = SigningKey(key(V2_KEY))
    assert signer.hex() == "0x" + V2_KEY
    assert SigningKey.from_hex(signer.hex()) == signer
    assert SigningKey.from_hex(V2_KEY.upper()) == signer
    assert V2_KEY not in repr(signer)
    with pytest.raises(ValueError, match="64 hex digits"):
        SigningKey.from_hex("0x1234")


# Key files


def test_key_file_round_trip_with_mode_0600(tmp_path) -> None:
    path = str(tmp_path / "alice.key")
    signer = SigningKey.generate()
    write_key_file(path, signer)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path).read() == signer.hex() + "\n"
    assert load_key_file(path) == signer


def test_key_file_is_never_overwritten(tmp_path) -> None:
    path = tmp_path / "alice.key"
    path.write_text("precious")
    with pytest.raises(KeyFileError, match=f"{path}.*already exists"):
        write_key_file(str(path), SigningKey.generate())
    assert path.read_text() == "precious"


def test_key_file_in_a_missing_directory(tmp_path) -> None:
    path = tmp_path / "nowhere" / "alice.key"
    with pytest.raises(KeyFileError, match=f"cannot create key file {path}"):
        write_key_file(str(path), SigningKey.generate())


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "is empty"),
    (b"   \n", "is empty"),
    (b"0x1234\n", "does not hold a private key"),
    (b"hello world", "does not hold a private key"),
    (b"0x" + V2_KEY.encode() + b"\n0x" + V2_KEY.encode(), "does not hold a private key"),
    (b"\xff\xfe\x00", "is not text"),
    (b"0x" + b"0" * 64, "not a valid secp256k1 private key"),
    (b"0x" + b"f" * 64, "not a valid secp256k1 private key"),
])
def test_bad_key_files_get_precise_errors(tmp_path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        load_key_file(str(path))
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_key_file_and_directory(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_key_file(str(tmp_path / "absent.key"))
    with pytest.raises(KeyFileError, match="is a directory"):
        load_key_file(str(tmp_path))


def test_key_file_accepts_hex_without_prefix_and_surrounding_space(tmp_path) -> None:
    path = tmp_path / "plain.key"
    path.write_text(f"  {V2_KEY}\n\n")
    assert load_key_file(str(path)).address == V2_ADDRESS.lower()

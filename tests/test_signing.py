"""relayd.identity.signing against the signing and address vectors of /work/shared/auth-test-vectors.md,
plus private-key generation and the key file format."""

from __future__ import annotations

import os
import stat

import pytest

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

# V2 / V3: idena-web dnaSign test key, doubleHash and prefix over the same text.
V2_KEY = "c6fccb1b926e774d7e3a1716eddeba55ae7d40db4fb7c22d2705835f48d5be1b"
V2_ADDRESS = "0xa79b11814a162129a6dC136885C1c92EE1336Ffc"
V2_TEXT = "salt-0x010203-50"
V2_HASH = "e640350d786814f43742f18bee7333c5d1d44bfcd9f5f2e65ffdfe0a3c2278c0"
V2_SIG = ("4adf3bb775e94b56ce0acbbbcede83cd6382841e4152a1956bff2b73105adc0c"
          "0292f84193648f83e0f2b66b7095055ded4a062330199970e26613dc392336eb01")
V3_HASH = "0cf72780b2992a8fa8bf1055046ab6826ee7d1f1dfd9d67a9ddb6a9cea3f049b"
V3_SIG = ("8f18c02c8e6724dcb117cbcf7c9450c004b9e4ef0a8d62bc14c62c7fe6734639"
          "4a2f4bc415f65cb02169620d1aae198b9dbbd751e194fee223476c6f0e76432a01")
# V5: key to address, and a sign-in nonce signed by the first key.
V5_KEYS = [("289c2857d4598e37fb9647507e47a309d6133539bf21a8b9cb6df88fd5232032",
            "0x970e8128ab834e8eac17ab8e3812f010678cf791"),
           ("58d23b55bc9cdce1f18c2500f40ff4ab7245df9a89505e9b1fa4851f623d241d",
            "0xdc544d1aa88ff8bbd2f2aec754b1f1e99e1812fd")]
V5_TEXT = "signin-0652c409-17ef-4ad6-b580-3faaefcc204d"
V5_SIG = ("ca5f6ac5ee526685de07b60eec8c1e02e9f2ce09cecf887fa4adca654a2f82ac"
          "7e25c4e90eb4f5537e2e60c8478ae1e8ee7ec35435701a624549599cb7441d6b00")
# V6: eth-keys signatures over keccak256(b"message").
V6_CASES = [
    ("9c0257114eb9399a2985f8e75dad7600c5d89fe3824ffa99ec1c3eb8bf3b0501",
     "0x328809bc894f92807417d2dad6b7c998c1afdac6",
     "b20e2ea5d3cbaa83c1e0372f110cf12535648613b479b64c1a8c1a20c5021f38"
     "0434d07ec5795e3f789794351658e80b7faf47a46328f41e019d7b853745cdfd01"),
    ("38e47a7b719dce63662aeaf43440326f551b8a7ee198cee35cb5d517f2d296a2",
     "0x1d96f2f6bef1202e4ce1ff6dad0c2cb002861d3e",
     "5c48ea4f0f2257fa23bd25e6fcb0b75bbe2ff9bbda0167118dab2bb6e31ba76e"
     "691dbdaf2a231fc9958cd8edd99507121f8184042e075cf10f98ba88abff1f3601"),
]
# V7: ethereumjs-util, v = 27 (recovery id 0).
V7_KEY = "3c9229289a6125f7fdf1885a77bb12c37a8d3b4962d936f7e3084dece32a3ca1"
V7_HASH = "82ff40c0a986c6a5cfad4ddf4c3aa6996f1a7837f9c398e17e5de5cbd5a12b28"
V7_R = "99e71a99cb2270b8cac5254f9e99b6210c6c10224a1579cf389ef88b20a1abe9"
V7_S = "129ff05af364204442bdb53ab6f18a99ab48acc9326fa689f228040429e3ca66"
V7_ADDRESS = "0xed54a7c1d8634bb589f24bb7f05a5554b36f9618"


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

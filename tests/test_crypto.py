"""Known-answer and property tests for keccak, secp256k1 recovery and Idena signatures."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (V2_ADDRESS, V2_HASH, V2_KEY, V2_SIG, V2_TEXT, V3_HASH, V3_SIG, V5_KEYS, V5_SIG, V5_TEXT, V6_CASES,
                     V7_ADDRESS, V7_HASH, V7_KEY, V7_R, V7_S)

from relayd.identity import secp256k1, signatures
from relayd.identity.keccak import _sponge, keccak256
from relayd.identity.secp256k1 import N, P, point_mul_g, recover_pubkey
from relayd.identity.signatures import (
    PURE_BACKEND,
    ZERO_ADDRESS,
    CryptoBackend,
    SignatureFormat,
    address_of,
    message_hash,
    recover_address,
    select_backend,
    verify,
)
from relayd.identity.signing import address_of_private, sign_hash, sign_text

DOUBLE = SignatureFormat.DOUBLE_HASH
PREFIX = SignatureFormat.PREFIX

V1_ABC = "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"
V1_EMPTY = "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
V1_SHA3_ABC = "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532"

V4_HASH = "ce0677bb30baa8cf067c88db9811f4333d131bf8bcf12fe7065d211dce971008"
V4_SIG = (
    "90f27b8b488db00b00606796d2987f6a5f59ae62ea05effe84fef5b8b0e54998"
    "4a691139ad57a3f0b906637673aa2f63d1f55cb1a69199d4009eea23ceaddc9301"
)
V4_PUBKEY = (
    "04e32df42865e97135acfb65f3bae71bdc86f4d49150ad6a440b6f15878109880a"
    "0a2b2667f7e725ceea70c673093bf67663e0312623c8e091b13cf2c0f11ef652"
)
V4_ADDRESS = "0xa19d069d48d2e9392ec2bb41ecab0a72119d633b"

V8_OTHER_TEXT = "salt-0x010203-51"
V8_DOCS_SIG = (
    "e0434ea8ff5123a570b6b7e5f1b837af4524372d4552021bfcede66219abe00c"
    "376a8c8417299be23938b9644ba922ffd36bbbdd1cdf15719da9b2af9affdec601"
)
V8_DOCS_RECOVERS_TO = "0xbea8bf0f659e07aa7c9de7d8ab3a7bf28c2aca44"
V8_DOCS_CLAIMED = "0x53eaeffe305d9ad38f6db104cde3d4822a60bf4d"


def _hex(value: int) -> str:
    return value.to_bytes(32, "big").hex()


def _split(sig_hex: str) -> tuple[bytes, int, int, int]:
    raw = bytes.fromhex(sig_hex.removeprefix("0x"))
    return raw, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]


# V1 ------------------------------------------------------------------------

def test_v1_keccak_known_answers(crypto_backend: str) -> None:
    assert keccak256(b"abc").hex() == V1_ABC
    assert keccak256(b"").hex() == V1_EMPTY
    assert signatures.keccak256(b"abc").hex() == V1_ABC
    assert signatures.keccak256(b"").hex() == V1_EMPTY


def test_v1_sha3_is_not_keccak() -> None:
    assert hashlib.sha3_256(b"abc").hexdigest() == V1_SHA3_ABC
    assert keccak256(b"abc").hex() != V1_SHA3_ABC


@pytest.mark.parametrize("length", [0, 1, 31, 32, 135, 136, 137, 200, 271, 272, 273, 1000])
def test_permutation_matches_sha3_with_fips_padding(length: int) -> None:
    data = bytes((i * 37 + 11) & 0xFF for i in range(length))
    assert _sponge(data, 0x06) == hashlib.sha3_256(data).digest()


# V2 / V3 -------------------------------------------------------------------

def test_v2_address_of_private_key() -> None:
    assert address_of_private(bytes.fromhex(V2_KEY)) == V2_ADDRESS.lower()


def test_v2_double_hash_digest(crypto_backend: str) -> None:
    assert message_hash(V2_TEXT, DOUBLE).hex() == V2_HASH
    assert message_hash(V2_TEXT, "doubleHash").hex() == V2_HASH


def test_v2_signer_reproduces_signature() -> None:
    assert sign_text(bytes.fromhex(V2_KEY), V2_TEXT, DOUBLE) == "0x" + V2_SIG


def test_v2_recovery(crypto_backend: str) -> None:
    assert recover_address(V2_TEXT, "0x" + V2_SIG, DOUBLE) == V2_ADDRESS.lower()
    assert recover_address(V2_TEXT, V2_SIG, DOUBLE) == V2_ADDRESS.lower()
    assert recover_address(V2_TEXT, "0x" + V2_SIG.upper(), DOUBLE) == V2_ADDRESS.lower()
    assert verify(V2_TEXT, "0x" + V2_SIG, DOUBLE, V2_ADDRESS)
    assert verify(V2_TEXT, "0x" + V2_SIG, DOUBLE, V2_ADDRESS.upper().replace("0X", "0x"))


def test_v2_v28_form_is_normalised(crypto_backend: str) -> None:
    assert recover_address(V2_TEXT, "0x" + V2_SIG[:-2] + "1c", DOUBLE) == V2_ADDRESS.lower()


def test_v3_prefix_digest(crypto_backend: str) -> None:
    assert message_hash(V2_TEXT, PREFIX).hex() == V3_HASH
    assert message_hash(V2_TEXT, "prefix").hex() == V3_HASH


def test_v3_signer_reproduces_signature() -> None:
    assert sign_text(bytes.fromhex(V2_KEY), V2_TEXT, PREFIX) == "0x" + V3_SIG


def test_v3_recovery(crypto_backend: str) -> None:
    assert recover_address(V2_TEXT, "0x" + V3_SIG, PREFIX) == V2_ADDRESS.lower()
    assert verify(V2_TEXT, "0x" + V3_SIG, PREFIX, V2_ADDRESS)


def test_formats_are_not_interchangeable(crypto_backend: str) -> None:
    assert not verify(V2_TEXT, "0x" + V3_SIG, DOUBLE, V2_ADDRESS)
    assert not verify(V2_TEXT, "0x" + V2_SIG, PREFIX, V2_ADDRESS)


# V4 / V5 / V6 / V7 ---------------------------------------------------------

def test_v4_recover_pubkey_from_hash(crypto_backend: str) -> None:
    _, r, s, v = _split(V4_SIG)
    pubkey = recover_pubkey(bytes.fromhex(V4_HASH), r, s, v)
    assert pubkey is not None and pubkey.hex() == V4_PUBKEY
    assert signatures.current_backend().recover(bytes.fromhex(V4_HASH), r, s, v) == pubkey
    assert address_of(pubkey) == V4_ADDRESS


@pytest.mark.parametrize(("key_hex", "address"), V5_KEYS)
def test_v5_key_to_address(key_hex: str, address: str) -> None:
    assert address_of_private(bytes.fromhex(key_hex)) == address


def test_v5_signer_reproduces_signin_signature() -> None:
    assert sign_text(bytes.fromhex(V5_KEYS[0][0]), V5_TEXT, DOUBLE) == "0x" + V5_SIG


def test_v5_signin_recovery(crypto_backend: str) -> None:
    assert recover_address(V5_TEXT, "0x" + V5_SIG, DOUBLE) == V5_KEYS[0][1]
    assert verify(V5_TEXT, "0x" + V5_SIG, "doubleHash", V5_KEYS[0][1])


@pytest.mark.parametrize(("key_hex", "address", "sig_hex"), V6_CASES)
def test_v6_signer_reproduces_signature(key_hex: str, address: str, sig_hex: str) -> None:
    assert sign_hash(bytes.fromhex(key_hex), keccak256(b"message")).hex() == sig_hex
    assert address_of_private(bytes.fromhex(key_hex)) == address


@pytest.mark.parametrize(("key_hex", "address", "sig_hex"), V6_CASES)
def test_v6_recovery(crypto_backend: str, key_hex: str, address: str, sig_hex: str) -> None:
    _, r, s, v = _split(sig_hex)
    pubkey = signatures.current_backend().recover(keccak256(b"message"), r, s, v)
    assert pubkey is not None and address_of(pubkey) == address


def test_v7_signer_reproduces_r_and_s() -> None:
    sig = sign_hash(bytes.fromhex(V7_KEY), bytes.fromhex(V7_HASH))
    assert sig[:32].hex() == V7_R and sig[32:64].hex() == V7_S
    assert sig[64] + 27 == 27
    assert address_of_private(bytes.fromhex(V7_KEY)) == V7_ADDRESS


def test_v7_v27_form_recovers(crypto_backend: str) -> None:
    parsed = signatures._parse_signature("0x" + V7_R + V7_S + "1b")
    assert parsed is not None and parsed[2] == 0
    pubkey = signatures.current_backend().recover(bytes.fromhex(V7_HASH), *parsed)
    assert pubkey is not None and address_of(pubkey) == V7_ADDRESS
    other = signatures._parse_signature("0x" + V7_R + V7_S + "1c")
    assert other is not None
    wrong = signatures.current_backend().recover(bytes.fromhex(V7_HASH), *other)
    assert wrong is None or address_of(wrong) != V7_ADDRESS


# V8: everything that must be rejected ---------------------------------------

FLIPPED_BITS = sorted(set(range(0, 512, 11)) | set(range(512, 520)))


@pytest.mark.parametrize("bit", FLIPPED_BITS)
def test_v8_flipped_bit_never_recovers_signer(bit: int) -> None:
    raw = bytearray.fromhex(V2_SIG)
    raw[bit // 8] ^= 1 << (bit % 8)
    assert recover_address(V2_TEXT, "0x" + raw.hex(), DOUBLE) != V2_ADDRESS.lower()
    assert not verify(V2_TEXT, "0x" + raw.hex(), DOUBLE, V2_ADDRESS)


def test_v8_other_text_recovers_another_address(crypto_backend: str) -> None:
    other = recover_address(V8_OTHER_TEXT, "0x" + V2_SIG, DOUBLE)
    assert other is not None and other != V2_ADDRESS.lower()
    assert not verify(V8_OTHER_TEXT, "0x" + V2_SIG, DOUBLE, V2_ADDRESS)


@pytest.mark.parametrize("v", [2, 3, 4, 5, 26, 29, 0x80, 0xFF])
def test_v8_bad_recovery_id(crypto_backend: str, v: int) -> None:
    sig = "0x" + V2_SIG[:-2] + f"{v:02x}"
    assert recover_address(V2_TEXT, sig, DOUBLE) is None
    assert not verify(V2_TEXT, sig, DOUBLE, V2_ADDRESS)


@pytest.mark.parametrize(
    "sig",
    [
        "0x" + V2_SIG[:128],
        "0x" + V2_SIG + "00",
        "0x" + V2_SIG[:-2],
        "0x" + "00" * 65,
        "0x" + "00" * 64 + "01",
    ],
    ids=["64-bytes", "66-bytes", "odd-length", "all-zero", "zero-r-s"],
)
def test_v8_wrong_length_or_zero_signature(crypto_backend: str, sig: str) -> None:
    assert recover_address(V2_TEXT, sig, DOUBLE) is None
    assert not verify(V2_TEXT, sig, DOUBLE, V2_ADDRESS)


_, _V2_R, _V2_S, _ = _split(V2_SIG)


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, _V2_S), (_V2_R, 0), (N, _V2_S), (_V2_R, N), (N + 1, _V2_S), (_V2_R, 2**256 - 1)],
    ids=["r=0", "s=0", "r=n", "s=n", "r>n", "s=max"],
)
def test_v8_r_or_s_out_of_range(crypto_backend: str, r: int, s: int) -> None:
    sig = "0x" + _hex(r) + _hex(s) + "01"
    assert recover_address(V2_TEXT, sig, DOUBLE) is None
    assert recover_pubkey(bytes.fromhex(V2_HASH), r, s, 1) is None


def test_v8_zero_address_is_never_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    def keccak_zeroing_keys(data: bytes) -> bytes:
        return bytes(32) if len(data) == 64 else keccak256(data)

    fake = CryptoBackend("fake", keccak_zeroing_keys, "pure", PURE_BACKEND.recover)
    monkeypatch.setattr(signatures, "_backend", fake)
    assert recover_address(V2_TEXT, "0x" + V2_SIG, DOUBLE) is None
    assert not verify(V2_TEXT, "0x" + V2_SIG, DOUBLE, ZERO_ADDRESS)


def test_v8_zero_address_never_verifies(crypto_backend: str) -> None:
    for sig in ("0x" + V2_SIG, "0x" + "00" * 65):
        assert not verify(V2_TEXT, sig, DOUBLE, ZERO_ADDRESS)


def test_v8_idena_docs_example_recovers_other_address(crypto_backend: str) -> None:
    assert recover_address(V5_TEXT, "0x" + V8_DOCS_SIG, DOUBLE) == V8_DOCS_RECOVERS_TO
    assert not verify(V5_TEXT, "0x" + V8_DOCS_SIG, DOUBLE, V8_DOCS_CLAIMED)


@pytest.mark.parametrize(
    "sig",
    [
        None,
        b"0x" + V2_SIG.encode(),
        42,
        "",
        "0x",
        "0x0x" + V2_SIG,
        " 0x" + V2_SIG,
        "0x" + V2_SIG + "\n",
        "0x" + " ".join(V2_SIG[i:i + 2] for i in range(0, 130, 2)),
        "0x" + V2_SIG[:-1] + "g",
        "0x" + V2_SIG[:-1] + "\uff11",
    ],
)
def test_malformed_signature_fails_closed(sig: object) -> None:
    assert recover_address(V2_TEXT, sig, DOUBLE) is None  # type: ignore[arg-type]
    assert not verify(V2_TEXT, sig, DOUBLE, V2_ADDRESS)  # type: ignore[arg-type]


def test_bad_text_format_or_address_fails_closed() -> None:
    sig = "0x" + V2_SIG
    assert recover_address(V2_TEXT, sig, "sha3") is None
    assert recover_address(b"salt-0x010203-50", sig, DOUBLE) is None  # type: ignore[arg-type]
    assert recover_address("\ud800", sig, DOUBLE) is None
    assert not verify(V2_TEXT, sig, DOUBLE, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        message_hash(V2_TEXT, "sha3")


# secp256k1 internals ---------------------------------------------------------

def test_recover_pubkey_rejects_bad_inputs() -> None:
    digest = bytes.fromhex(V4_HASH)
    _, r, s, v = _split(V4_SIG)
    assert recover_pubkey(digest[:31], r, s, v) is None
    assert recover_pubkey(digest, r, s, 4) is None
    assert recover_pubkey(digest, r, s, -1) is None
    assert recover_pubkey(digest, r, s, True) is None
    off_curve = next(x for x in range(1, 100) if secp256k1.lift_x(x, 0) is None)
    assert recover_pubkey(digest, off_curve, s, 0) is None
    assert recover_pubkey(digest, P - N, s, 2) is None


def test_recover_pubkey_rejects_point_at_infinity() -> None:
    k = 7
    rx, ry = point_mul_g(k)
    digest = bytes.fromhex(V4_HASH)
    s = int.from_bytes(digest, "big") * pow(k, -1, N) % N
    assert rx < N
    assert recover_pubkey(digest, rx, s, ry & 1) is None
    assert recover_pubkey(digest, rx, s, (ry & 1) ^ 1) is not None


def _double_and_add(point: tuple[int, int], k: int) -> tuple[int, int] | None:
    acc = secp256k1._INFINITY
    for bit in bin(k)[2:]:
        acc = secp256k1._double(acc)
        if bit == "1":
            acc = secp256k1._add_affine(acc, *point)
    return secp256k1._to_affine(acc)


@pytest.mark.parametrize(
    "k",
    [1, 2, 3, 127, 128, 255, 256, 2**128, 2**255, N - 1, N - 2,
     secp256k1._LAMBDA, 0x1234567 << 200],
)
def test_scalar_multiplication_matches_double_and_add(k: int) -> None:
    assert point_mul_g(k) == _double_and_add(secp256k1.G, k)
    base = point_mul_g(0xC0FFEE)
    assert secp256k1._to_affine(secp256k1._mul_glv(base, k)) == _double_and_add(base, k)


def test_endomorphism_and_edge_scalars() -> None:
    gx, gy = secp256k1.G
    assert point_mul_g(secp256k1._LAMBDA) == (secp256k1._BETA * gx % P, gy)
    assert point_mul_g(N - 1) == (gx, P - gy)
    with pytest.raises(ValueError):
        point_mul_g(N)


# Backend selection ---------------------------------------------------------

def _install_fake_pycryptodome(monkeypatch: pytest.MonkeyPatch, digest) -> None:
    keccak_mod = types.ModuleType("Crypto.Hash.keccak")

    class _Hash:
        def __init__(self, data: bytes) -> None:
            self._data = data

        def digest(self) -> bytes:
            return digest(self._data)

    def new(digest_bits: int, data: bytes = b"") -> _Hash:
        assert digest_bits == 256
        return _Hash(data)

    keccak_mod.new = new  # type: ignore[attr-defined]
    hash_pkg = types.ModuleType("Crypto.Hash")
    hash_pkg.keccak = keccak_mod  # type: ignore[attr-defined]
    crypto_pkg = types.ModuleType("Crypto")
    crypto_pkg.Hash = hash_pkg  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "Crypto", crypto_pkg)
    monkeypatch.setitem(sys.modules, "Crypto.Hash", hash_pkg)
    monkeypatch.setitem(sys.modules, "Crypto.Hash.keccak", keccak_mod)
    monkeypatch.setitem(sys.modules, "Cryptodome", None)


def _install_fake_coincurve(monkeypatch: pytest.MonkeyPatch, recover, calls: list) -> None:
    class _Key:
        def __init__(self, raw: bytes) -> None:
            self._raw = raw

        def format(self, compressed: bool = True) -> bytes:
            assert not compressed
            return self._raw

    class PublicKey:
        @staticmethod
        def from_signature_and_message(sig: bytes, message: bytes, hasher=None) -> _Key:
            assert hasher is None and len(sig) == 65
            calls.append(sig)
            raw = recover(message, int.from_bytes(sig[:32], "big"),
                          int.from_bytes(sig[32:64], "big"), sig[64])
            if raw is None:
                raise ValueError("invalid signature")
            return _Key(raw)

    module = types.ModuleType("coincurve")
    module.PublicKey = PublicKey  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "coincurve", module)


def test_select_backend_pure() -> None:
    assert select_backend("pure") == "keccak=pure recover=pure"
    assert signatures.current_backend() is PURE_BACKEND


def test_select_backend_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        select_backend("fastest")


def test_auto_falls_back_to_pure_without_packages(no_optional_backends) -> None:
    assert select_backend("auto") == "keccak=pure recover=pure"


def test_auto_uses_optional_backends_after_self_test(no_optional_backends) -> None:
    calls: list = []
    _install_fake_pycryptodome(no_optional_backends, keccak256)
    _install_fake_coincurve(no_optional_backends, recover_pubkey, calls)
    assert select_backend("auto") == "keccak=pycryptodome recover=coincurve"
    calls.clear()
    assert verify(V2_TEXT, "0x" + V2_SIG, DOUBLE, V2_ADDRESS)
    assert verify(V2_TEXT, "0x" + V3_SIG, PREFIX, V2_ADDRESS)
    assert recover_address(V2_TEXT, "0x" + "00" * 65, DOUBLE) is None
    assert recover_address(V2_TEXT, "0x" + V2_SIG[:-2] + "05", DOUBLE) is None
    assert len(calls) == 2


def test_auto_rejects_backends_failing_self_test(no_optional_backends) -> None:
    fixed = bytes.fromhex(V4_PUBKEY)
    _install_fake_pycryptodome(no_optional_backends, lambda data: hashlib.sha3_256(data).digest())
    _install_fake_coincurve(no_optional_backends, lambda *args: fixed, [])
    assert select_backend("auto") == "keccak=pure recover=pure"
    assert verify(V2_TEXT, "0x" + V2_SIG, DOUBLE, V2_ADDRESS)


@pytest.mark.parametrize(
    ("impl", "expected"),
    [(keccak256, "keccak=hashlib recover=pure"),
     (lambda data: hashlib.sha3_256(data).digest(), "keccak=pure recover=pure")],
    ids=["genuine", "sha3-impostor"],
)
def test_auto_hashlib_keccak_is_self_tested(no_optional_backends, impl, expected: str) -> None:
    real_new = hashlib.new

    class _Hash:
        def __init__(self, data: bytes) -> None:
            self._data = data

        def digest(self) -> bytes:
            return impl(self._data)

    def fake_new(name: str, data: bytes = b"", **kwargs):
        if name == "keccak-256":
            return _Hash(data)
        return real_new(name, data, **kwargs)

    no_optional_backends.setattr(hashlib, "algorithms_available", {"keccak-256", "sha256"})
    no_optional_backends.setattr(hashlib, "new", fake_new)
    assert select_backend("auto") == expected
    assert verify(V2_TEXT, "0x" + V2_SIG, DOUBLE, V2_ADDRESS)


# Properties --------------------------------------------------------------------

PRIVATE_KEYS = st.integers(min_value=1, max_value=N - 1).map(lambda d: d.to_bytes(32, "big"))


@settings(max_examples=25, deadline=None)
@given(
    privkey=PRIVATE_KEYS,
    text=st.text(max_size=80),
    fmt=st.sampled_from(list(SignatureFormat)),
    bit=st.integers(min_value=0, max_value=519),
)
def test_sign_then_recover_roundtrip(
    privkey: bytes, text: str, fmt: SignatureFormat, bit: int
) -> None:
    address = address_of_private(privkey)
    sig = sign_text(privkey, text, fmt)
    assert recover_address(text, sig, fmt) == address
    assert verify(text, sig, fmt.value, address.upper().replace("0X", "0x"))
    raw = bytearray.fromhex(sig[2:])
    raw[bit // 8] ^= 1 << (bit % 8)
    assert recover_address(text, "0x" + raw.hex(), fmt) != address
    assert not verify(text, "0x" + raw.hex(), fmt, address)

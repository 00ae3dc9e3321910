"""Idena message signatures: hashing schemes, address recovery, backends.

Every failure to decode or recover a signature yields None/False rather than
an exception, so callers can treat "not authenticated" as the only outcome of
bad input. Optional C backends are used only after a known-answer self-test,
because a silently wrong hash or recovery would authenticate nobody (or the
wrong party).
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import re
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Callable, Iterator

from . import keccak as _pure_keccak
from . import secp256k1 as _pure_ec

__all__ = [
    "SignatureFormat",
    "CryptoBackend",
    "PURE_BACKEND",
    "ZERO_ADDRESS",
    "address_of",
    "current_backend",
    "keccak256",
    "message_hash",
    "recover_address",
    "select_backend",
    "verify",
]

KeccakFn = Callable[[bytes], bytes]
RecoverFn = Callable[[bytes, int, int, int], bytes | None]

ZERO_ADDRESS = "0x" + "00" * 20
_PREFIX = b"\x00Idena Signed Message:\n"
_SIGNATURE_RE = re.compile(r"(?:0[xX])?([0-9a-fA-F]{130})")


class SignatureFormat(str, enum.Enum):
    """How the signed text is turned into the 32-byte digest."""

    DOUBLE_HASH = "doubleHash"
    PREFIX = "prefix"


@dataclass(frozen=True)
class CryptoBackend:
    """The keccak and recovery implementations currently in use."""

    keccak_name: str
    keccak: KeccakFn
    recover_name: str
    recover: RecoverFn

    @property
    def description(self) -> str:
        return f"keccak={self.keccak_name} recover={self.recover_name}"


PURE_BACKEND = CryptoBackend("pure", _pure_keccak.keccak256, "pure", _pure_ec.recover_pubkey)
_backend: CryptoBackend = PURE_BACKEND


def current_backend() -> CryptoBackend:
    return _backend


def keccak256(data: bytes) -> bytes:
    """Legacy Keccak-256 via the selected backend."""
    return _backend.keccak(data)


def message_hash(text: str, fmt: SignatureFormat | str) -> bytes:
    """The digest Idena signs for ``text`` under ``fmt``."""
    return _message_hash(text, fmt, _backend.keccak)


def _message_hash(text: str, fmt: SignatureFormat | str, hasher: KeccakFn) -> bytes:
    fmt = SignatureFormat(fmt)
    data = text.encode("utf-8")
    if fmt is SignatureFormat.DOUBLE_HASH:
        return hasher(hasher(data))
    return hasher(_PREFIX + str(len(data)).encode("ascii") + data)


def address_of(pubkey65: bytes) -> str:
    """Lower-case "0x" address of an uncompressed public key."""
    if len(pubkey65) != 65 or pubkey65[0] != 4:
        raise ValueError("expected a 65-byte uncompressed public key")
    return "0x" + _backend.keccak(bytes(pubkey65[1:]))[12:].hex()


def _parse_signature(signature_hex: str) -> tuple[int, int, int] | None:
    """(r, s, recid) from 65-byte r||s||v hex, or None if malformed."""
    if not isinstance(signature_hex, str):
        return None
    match = _SIGNATURE_RE.fullmatch(signature_hex)
    if match is None:
        return None
    raw = bytes.fromhex(match.group(1))
    r = int.from_bytes(raw[:32], "big")
    s = int.from_bytes(raw[32:64], "big")
    v = raw[64]
    if v in (27, 28):
        v -= 27
    if v not in (0, 1) or not (0 < r < _pure_ec.N and 0 < s < _pure_ec.N):
        return None
    return r, s, v


def recover_address(text: str, signature_hex: str, fmt: SignatureFormat | str) -> str | None:
    """Address that signed ``text``, or None for any invalid signature."""
    try:
        parsed = _parse_signature(signature_hex)
        if parsed is None or not isinstance(text, str):
            return None
        backend = _backend
        digest = _message_hash(text, fmt, backend.keccak)
        pubkey = backend.recover(digest, *parsed)
        if not isinstance(pubkey, bytes) or len(pubkey) != 65 or pubkey[0] != 4:
            return None
        address = "0x" + backend.keccak(pubkey[1:])[12:].hex()
        if address == ZERO_ADDRESS:
            return None
        return address
    except Exception:
        return None


def verify(text: str, signature_hex: str, fmt: SignatureFormat | str, address: str) -> bool:
    """True only if the signature recovers to ``address`` (case-insensitive)."""
    if not isinstance(address, str):
        return False
    recovered = recover_address(text, signature_hex, fmt)
    return recovered is not None and recovered == address.lower()


# Known answers used to vet optional backends before trusting them.
_KAT_KECCAK = (
    (b"abc", "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"),
    (b"", "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"),
)
_KAT_RECOVER_V2 = (
    "e640350d786814f43742f18bee7333c5d1d44bfcd9f5f2e65ffdfe0a3c2278c0",
    "4adf3bb775e94b56ce0acbbbcede83cd6382841e4152a1956bff2b73105adc0c"
    "0292f84193648f83e0f2b66b7095055ded4a062330199970e26613dc392336eb01",
    "0xa79b11814a162129a6dc136885c1c92ee1336ffc",
)
_KAT_RECOVER_V4 = (
    "ce0677bb30baa8cf067c88db9811f4333d131bf8bcf12fe7065d211dce971008",
    "90f27b8b488db00b00606796d2987f6a5f59ae62ea05effe84fef5b8b0e54998"
    "4a691139ad57a3f0b906637673aa2f63d1f55cb1a69199d4009eea23ceaddc9301",
    "04e32df42865e97135acfb65f3bae71bdc86f4d49150ad6a440b6f15878109880a"
    "0a2b2667f7e725ceea70c673093bf67663e0312623c8e091b13cf2c0f11ef652",
)


def _keccak_self_test(fn: KeccakFn) -> bool:
    try:
        if any(fn(data) != bytes.fromhex(digest) for data, digest in _KAT_KECCAK):
            return False
        long_input = bytes(range(256)) * 2
        return fn(long_input) == _pure_keccak.keccak256(long_input)
    except Exception:
        return False


def _recover_self_test(fn: RecoverFn) -> bool:
    try:
        h2, sig2, addr2 = _KAT_RECOVER_V2
        h4, sig4, pub4 = _KAT_RECOVER_V4
        for digest_hex, sig_hex, expected in ((h2, sig2, addr2), (h4, sig4, pub4)):
            parsed = _parse_signature(sig_hex)
            if parsed is None:
                return False
            pubkey = fn(bytes.fromhex(digest_hex), *parsed)
            if not isinstance(pubkey, bytes) or len(pubkey) != 65:
                return False
            if expected.startswith("0x"):
                got = "0x" + _pure_keccak.keccak256(pubkey[1:])[12:].hex()
            else:
                got = pubkey.hex()
            if got != expected:
                return False
        r, s, recid = _parse_signature(sig2)  # type: ignore[misc]
        tampered = fn(bytes.fromhex(h2), r ^ 1, s, recid)
        return tampered is None or "0x" + _pure_keccak.keccak256(tampered[1:])[12:].hex() != addr2
    except Exception:
        return False


def _keccak_candidates() -> Iterator[tuple[str, KeccakFn]]:
    for name in sorted(hashlib.algorithms_available):
        if name.lower() == "keccak-256":
            yield "hashlib", partial(_hashlib_keccak, name)
            break
    for package in ("Crypto", "Cryptodome"):
        try:
            module = importlib.import_module(f"{package}.Hash.keccak")
        except Exception:
            continue
        yield "pycryptodome", partial(_pycryptodome_keccak, module)


def _hashlib_keccak(name: str, data: bytes) -> bytes:
    return hashlib.new(name, data).digest()


def _pycryptodome_keccak(module: ModuleType, data: bytes) -> bytes:
    digest: bytes = module.new(digest_bits=256, data=data).digest()
    return digest


def _recover_candidates() -> Iterator[tuple[str, RecoverFn]]:
    try:
        import coincurve
    except Exception:
        return

    def recover(msg_hash: bytes, r: int, s: int, recid: int) -> bytes | None:
        try:
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((recid,))
            key = coincurve.PublicKey.from_signature_and_message(sig, msg_hash, hasher=None)
            out = key.format(compressed=False)
            return bytes(out) if len(out) == 65 else None
        except Exception:
            return None

    yield "coincurve", recover


def select_backend(mode: str = "auto") -> str:
    """Choose implementations ("auto" or "pure") and describe the choice.

    In "auto", each optional backend is used only if importable and its
    known-answer self-test passes; otherwise the pure-Python code is kept.
    """
    global _backend
    if mode == "pure":
        _backend = PURE_BACKEND
        return _backend.description
    if mode != "auto":
        raise ValueError(f"unknown crypto backend mode: {mode!r}")
    keccak_name, keccak_fn = PURE_BACKEND.keccak_name, PURE_BACKEND.keccak
    for name, keccak in _keccak_candidates():
        if _keccak_self_test(keccak):
            keccak_name, keccak_fn = name, keccak
            break
    recover_name, recover_fn = PURE_BACKEND.recover_name, PURE_BACKEND.recover
    for name, recover in _recover_candidates():
        if _recover_self_test(recover):
            recover_name, recover_fn = name, recover
            break
    _backend = CryptoBackend(keccak_name, keccak_fn, recover_name, recover_fn)
    return _backend.description

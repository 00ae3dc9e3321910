"""Deterministic secp256k1 signer for tests (RFC 6979, HMAC-SHA256).

Mirrors libsecp256k1's defaults (RFC 6979 nonces, low-s with recid flip) so
it reproduces signatures produced by Idena clients byte for byte. Not for
production use: it is neither constant-time nor hardened.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterator

from relayd.identity.secp256k1 import N, point_mul_g
from relayd.identity.signatures import SignatureFormat, address_of, message_hash

__all__ = ["address_of_private", "sign_hash", "sign_text"]


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _rfc6979_nonces(secret: int, msg_hash: bytes) -> Iterator[int]:
    """Candidate nonces per RFC 6979 section 3.2; the next one is drawn on rejection."""
    seed = secret.to_bytes(32, "big") + (int.from_bytes(msg_hash, "big") % N).to_bytes(32, "big")
    v = b"\x01" * 32
    k = b"\x00" * 32
    k = _hmac(k, v + b"\x00" + seed)
    v = _hmac(k, v)
    k = _hmac(k, v + b"\x01" + seed)
    v = _hmac(k, v)
    while True:
        v = _hmac(k, v)
        candidate = int.from_bytes(v, "big")
        if 0 < candidate < N:
            yield candidate
        k = _hmac(k, v + b"\x00")
        v = _hmac(k, v)


def _secret(privkey: bytes) -> int:
    d = int.from_bytes(privkey, "big")
    if len(privkey) != 32 or not 0 < d < N:
        raise ValueError("private key must be 32 bytes in (0, n)")
    return d


def sign_hash(privkey: bytes, msg_hash: bytes) -> bytes:
    """65-byte r||s||v (v in {0, 1}) signature of a 32-byte digest."""
    if len(msg_hash) != 32:
        raise ValueError("digest must be 32 bytes")
    d = _secret(privkey)
    e = int.from_bytes(msg_hash, "big") % N
    for nonce in _rfc6979_nonces(d, msg_hash):
        x, y = point_mul_g(nonce)
        r = x % N
        if r == 0:
            continue
        s = pow(nonce, -1, N) * (e + r * d) % N
        if s == 0:
            continue
        recid = (y & 1) | (2 if x >= N else 0)
        if s > N // 2:
            s = N - s
            recid ^= 1
        return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes((recid,))
    raise AssertionError("unreachable")


def sign_text(privkey: bytes, text: str, fmt: SignatureFormat | str) -> str:
    """Hex signature (with 0x prefix) of ``text`` under the Idena scheme ``fmt``."""
    return "0x" + sign_hash(privkey, message_hash(text, fmt)).hex()


def address_of_private(privkey: bytes) -> str:
    """Lower-case address controlled by ``privkey``."""
    x, y = point_mul_g(_secret(privkey))
    return address_of(b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big"))

"""Idena signing for clients: private keys, deterministic signatures, key files.

The relay itself only verifies (``signatures``); signing lives here for
relayd's own client and command line. Signatures are deterministic (RFC 6979
nonces with HMAC-SHA256, low-s with the recovery id flipped accordingly),
so they reproduce libsecp256k1 and therefore Idena's own clients byte for
byte. The arithmetic is pure Python and neither constant-time nor hardened
against side channels: fine for test identities and operators' checks, not
for keys that guard funds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Iterator

from .secp256k1 import N, point_mul_g
from .signatures import SignatureFormat, address_of, message_hash

__all__ = [
    "KeyFileError",
    "SigningKey",
    "address_of_private",
    "generate_private_key",
    "load_key_file",
    "sign_hash",
    "sign_text",
    "write_key_file",
]

_KEY_TEXT = re.compile(r"(?:0[xX])?([0-9a-fA-F]{64})")


class KeyFileError(ValueError):
    """A key file that cannot be read, written or understood; the message names the file."""


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


def generate_private_key() -> bytes:
    """32 random bytes from ``secrets`` that form a valid secp256k1 private key."""
    while True:
        candidate = secrets.token_bytes(32)
        if 0 < int.from_bytes(candidate, "big") < N:
            return candidate


def sign_hash(privkey: bytes, msg_hash: bytes) -> bytes:
    """65-byte r||s||v (v in {0, 1}) signature of a 32-byte digest.

    Low level: protocols sign texts (``sign_text``), never raw digests a peer chose.
    Raises ValueError for a bad key or digest length.
    """
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
    """``0x``-hex signature of ``text`` under the Idena scheme ``fmt`` (doubleHash or prefix)."""
    return "0x" + sign_hash(privkey, message_hash(text, fmt)).hex()


def address_of_private(privkey: bytes) -> str:
    """Lower-case address controlled by ``privkey``; ValueError for an invalid key."""
    x, y = point_mul_g(_secret(privkey))
    return address_of(b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big"))


@dataclass(frozen=True)
class SigningKey:
    """One private key and the address it controls."""

    secret: bytes = field(repr=False)
    address: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", address_of_private(self.secret))

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(generate_private_key())

    @classmethod
    def from_hex(cls, text: str) -> "SigningKey":
        """Parse ``0x`` + 64 hex digits (the prefix is optional); ValueError otherwise."""
        match = _KEY_TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError("expected a private key as 0x followed by 64 hex digits")
        return cls(bytes.fromhex(match.group(1)))

    def hex(self) -> str:
        return "0x" + self.secret.hex()

    def sign(self, text: str, fmt: SignatureFormat | str = SignatureFormat.DOUBLE_HASH) -> str:
        return sign_text(self.secret, text, fmt)


def write_key_file(path: str, key: SigningKey) -> None:
    """Write ``key`` as one line of 0x-hex, readable by its owner only (mode 0600).

    Never overwrites: an existing file raises KeyFileError, as does any OS error.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; not overwriting it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key.hex() + "\n")
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror or exc}") from None


def load_key_file(path: str) -> SigningKey:
    """Read a key file written by ``write_key_file`` (or any file holding one 0x-hex key).

    Raises KeyFileError naming the file and what is wrong with it.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read(4096)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not text: expected 0x followed by 64 hex digits") from None
    if not text:
        raise KeyFileError(f"key file {path} is empty: expected 0x followed by 64 hex digits")
    if _KEY_TEXT.fullmatch(text) is None:
        raise KeyFileError(f"key file {path} does not hold a private key: expected one line of 0x followed "
                           f"by 64 hex digits")
    try:
        return SigningKey.from_hex(text)
    except ValueError:
        raise KeyFileError(f"key file {path} holds a number that is not a valid secp256k1 private key "
                           f"(zero or not below the group order)") from None

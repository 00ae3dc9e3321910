"""Storage keys and sealed values for encryption at rest: key files, blind indexes (keyed HMAC-SHA256) and values
sealed with AES-256-GCM, each naming the key that sealed it (its first byte), so several keys can be read.

The ``cryptography`` package (optional extra ``encryption``) is imported only
when a key is loaded; ``sealed`` builds the storage layer on this.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_SEALED = "~"
"""Sealed values start with this (base64url never does), so a clear record left from before is told apart."""
_INDEX_CHARS = 32
_NONCE = 12


class StorageKeyError(Exception):
    """A storage key file cannot be used (missing, wrong size, unreadable, the extra missing)."""


class SealError(Exception):
    """A sealed value cannot be opened with any configured key."""


def generate_key_file(path: str) -> None:
    """Write 32 random bytes to a new file with mode 0600 (never overwriting)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(os.urandom(KEY_BYTES))


@dataclass(frozen=True, slots=True)
class StorageKey:
    """One key file: its id byte (in every value it seals), its AEAD and its blind-index key."""

    ident: int
    aead: AESGCM
    index_key: bytes
    path: str


def _derive(raw: bytes, label: bytes) -> bytes:
    return hmac.new(raw, b"relayd storage " + label, hashlib.sha256).digest()


def load_keys(paths: Iterable[str]) -> list[StorageKey]:
    """The keys of these files, the writing key first; raises ``StorageKeyError`` naming what is wrong."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise StorageKeyError(f"[storage] encryption_key_file needs the optional extra encryption: {_install_hint()}")\
            from None
    keys: list[StorageKey] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read(KEY_BYTES + 1)
        except OSError as exc:
            raise StorageKeyError(f"[storage] encryption_key_file {path}: {exc.strerror or exc}") from None
        if len(raw) != KEY_BYTES:
            raise StorageKeyError(f"[storage] encryption_key_file {path}: holds {len(raw)} bytes, not {KEY_BYTES} "
                                  f"random bytes (create one with relayd keygen --storage-key {path})")
        ident = hashlib.sha256(b"relayd storage key id " + raw).digest()[0]
        twin = next((k for k in keys if k.ident == ident), None)
        if twin is not None:
            same = "is the same key as" if _derive(raw, b"index") == twin.index_key else "has the same key id as"
            raise StorageKeyError(f"[storage] encryption_key_file {path} {same} {twin.path}; "
                                  "list each key once (or create another key)")
        keys.append(StorageKey(ident, AESGCM(_derive(raw, b"seal")), _derive(raw, b"index"), path))
    if not keys:
        raise StorageKeyError("[storage] encryption_key_file: no key file named")
    return keys


def _install_hint() -> str:
    import sys
    from pathlib import Path
    checkout = Path(__file__).resolve().parents[2]
    target = str(checkout) if (checkout / "pyproject.toml").is_file() else "CHECKOUT"
    return f"{sys.executable} -m pip install '{target}[encryption]'"


class Sealer:
    """Blind indexes and sealed values with a set of keys (the first writes)."""

    def __init__(self, keys: list[StorageKey]) -> None:
        self.keys = keys
        self.writer = keys[0]
        self._by_id = {k.ident: k for k in keys}

    @staticmethod
    def index(key: StorageKey, *parts: str) -> str:
        digest = hmac.new(key.index_key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()
        return digest[:_INDEX_CHARS]

    def seal(self, fields: list[str], bound_to: str) -> str:
        nonce = os.urandom(_NONCE)
        body = self.writer.aead.encrypt(nonce, _pack(fields), bound_to.encode())
        return _SEALED + base64.urlsafe_b64encode(bytes([self.writer.ident]) + nonce + body).decode()

    def key_of(self, value: str) -> int | None:
        """The id of the key that sealed ``value``; None when it is not sealed (written before encryption)."""
        if not value.startswith(_SEALED) or len(value) < 4:
            return None
        try:
            return base64.urlsafe_b64decode(value[1:5] + "==")[0]
        except ValueError:
            return None

    def open(self, value: str, bound_to: str) -> list[str]:
        from cryptography.exceptions import InvalidTag
        if not value.startswith(_SEALED):
            raise SealError("the record is not sealed (written before encryption was turned on: run relayd reseal)")
        try:
            raw = base64.urlsafe_b64decode(value[1:])
        except ValueError:
            raise SealError("the sealed value is damaged") from None
        key = self._by_id.get(raw[0]) if raw else None
        if key is None:
            raise SealError(f"the record was sealed with key id {raw[0] if raw else '?'}, which no configured key "
                            "file has")
        try:
            return _unpack(key.aead.decrypt(raw[1:1 + _NONCE], raw[1 + _NONCE:], bound_to.encode()))
        except (InvalidTag, ValueError, struct.error):
            raise SealError(f"the record does not open with {key.path} (damaged or moved)") from None


def _pack(fields: list[str]) -> bytes:
    """Length-prefixed UTF-8: a content grows by 4 bytes, never by escaping."""
    out = bytearray()
    for field in fields:
        raw = field.encode()
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def _unpack(raw: bytes) -> list[str]:
    fields, at = [], 0
    while at < len(raw):
        (size,) = struct.unpack_from(">I", raw, at)
        at += 4
        if at + size > len(raw):
            raise ValueError("truncated")
        fields.append(raw[at:at + size].decode())
        at += size
    return fields


_FIELDS_BYTES = 4 * 4 + 2 * 64 + 2 * 256
"""Room for the length prefixes, the recipient and sender (addresses) and the messageId, with margin."""


def sealed_size(content_bytes: int) -> int:
    """What a content of ``content_bytes`` UTF-8 bytes takes at most once sealed: a queue's byte cap and a
    page's byte bound are compared with this (the storage budget counts sealed bytes as they are)."""
    body = 1 + _NONCE + _FIELDS_BYTES + content_bytes + 16
    return 1 + 4 * ((body + 2) // 3)


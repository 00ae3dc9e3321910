"""Who the client is (an address, maybe a signing key) and what it gets back: identities, sign-ins, key records."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..addresses import is_address
from ..identity.signatures import SignatureFormat, verify
from ..identity.signing import SigningKey, load_key_file
from ..identity.statements import key_statement
from .errors import KeyVerificationError

DEFAULT_TIMEOUT = 10.0
# A relay's frames are at most twice its largest message (256 KiB by default) and a REST listing about 4 MiB:
# these defaults leave room for relays configured larger and still bound what a hostile relay can cost.
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_INCOMING = 1024
DEFAULT_MAX_INCOMING_BYTES = 8 * 1024 * 1024
MAX_ACK_IDS = 1000
Frame = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """What one client spends on a relay at most: time per call, bytes per frame, answer and unread backlog.

    ``timeout`` bounds each call as a whole (a relay that trickles one byte a
    second still fails it in time); ``max_frame_bytes`` bounds one WebSocket
    message and ``max_body_bytes`` one REST answer; ``max_incoming`` frames or
    ``max_incoming_bytes`` unread make the client stop reading the socket.
    """

    timeout: float = DEFAULT_TIMEOUT
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_incoming: int = DEFAULT_MAX_INCOMING
    max_incoming_bytes: int = DEFAULT_MAX_INCOMING_BYTES

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")
        for name in ("max_frame_bytes", "max_body_bytes", "max_incoming", "max_incoming_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")


class Deadline:
    """The moment one call must be over by, on the running loop's clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - asyncio.get_running_loop().time())

    @property
    def passed(self) -> bool:
        return self.remaining() <= 0.0

@dataclass(frozen=True)
class Identity:
    """Who signs in: an address, and the private key that proves it when there is one."""

    address: str
    key: SigningKey | None = field(default=None, repr=False)
    throwaway: bool = False
    """Signed proofs carry ``throwaway: true``: the relay records no ownership lock for this address (relayd
    check's identities, used once), so nothing of it outlives the check."""

    def __post_init__(self) -> None:
        if not is_address(self.address):
            raise ValueError(f"not an Idena address (0x followed by 40 hex digits): {self.address!r}")
        object.__setattr__(self, "address", self.address.lower())
        if self.key is not None and self.key.address != self.address:
            raise ValueError(f"the key controls {self.key.address}, not {self.address}")

    @classmethod
    def from_key(cls, key: SigningKey) -> "Identity":
        return cls(key.address, key)

    @classmethod
    def generate(cls, *, throwaway: bool = False) -> "Identity":
        """A signed identity with a fresh random key (``throwaway``: see the field)."""
        key = SigningKey.generate()
        return cls(key.address, key, throwaway)

    @classmethod
    def parse(cls, spec: str) -> "Identity":
        """An address (plain sign-in) or the path of a key file (signed sign-in).

        Raises ValueError for a malformed address, KeyFileError for a bad key file.
        """
        if is_address(spec):
            return cls(spec)
        if spec.lower().startswith("0x") and not os.path.exists(spec):
            raise ValueError(f"{spec!r} is neither an Idena address (0x followed by 40 hex digits) "
                             f"nor an existing key file")
        return cls.from_key(load_key_file(spec))

    @property
    def signed(self) -> bool:
        return self.key is not None


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in: the ``auth_success`` frame and what it granted."""

    address: str
    verified: bool
    token: str | None
    token_expires_at: int | None
    challenge: Frame | None
    frame: Frame


def random_public_key() -> str:
    """Canonical base64 of 32 random bytes: the shape of an X25519 public key, for checks and tests."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def verify_key_record(record: Frame, address: str | None = None) -> None:
    """Check a ``GET /api/public-keys/:address`` answer locally instead of trusting the relay.

    The statement must be exactly the one rebuilt from the record's own fields
    and its signature must recover to the record's address (and to ``address``
    when given). Raises KeyVerificationError saying which check failed.
    """
    owner = record.get("address")
    if not isinstance(owner, str) or not is_address(owner):
        raise KeyVerificationError(f"the record has no valid address: {owner!r}")
    if address is not None and owner.lower() != address.lower():
        raise KeyVerificationError(f"the record is for {owner}, not {address}")
    missing = [name for name in ("keyType", "issuedAt", "format", "signature", "statement", "publicKey")
               if record.get(name) is None]
    if missing:
        raise KeyVerificationError(f"the key of {owner} is not signed (no {', '.join(missing)})")
    issued = record["issuedAt"]
    if isinstance(issued, bool) or not isinstance(issued, int):
        raise KeyVerificationError(f"issuedAt is not an integer: {issued!r}")
    expected = key_statement(owner.lower(), record["keyType"], record["publicKey"], issued)
    if record["statement"] != expected:
        raise KeyVerificationError(f"the statement does not match the record's fields: {record['statement']!r}")
    if record["format"] not in [f.value for f in SignatureFormat]:
        raise KeyVerificationError(f"unknown signature format {record['format']!r}")
    if not verify(expected, record["signature"], record["format"], owner):
        raise KeyVerificationError(f"the signature does not recover to {owner.lower()}")

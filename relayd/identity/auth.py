"""Proof of address ownership: sign-in challenges, bearer tokens, signed keys.

An Idena address is a secp256k1 key, so a client proves it owns one by
signing a text the relay made up (NIP-42 style). The relay always rebuilds
that text from its own records, never from the client's words, and every
failure is a refusal. Verification runs on one worker thread so a burst of
sign-ins cannot monopolise the event loop, and is rate limited per IP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import field_str
from ..net.clientip import limit_key
from ..ops.metrics import RelayMetrics
from ..ratelimit import FixedWindow
from ..session import Session
from ..storage.store import KeyRecord, StorageUnavailable, Store
from . import signatures

log = logging.getLogger("relayd.auth")

FORMATS = (signatures.SignatureFormat.DOUBLE_HASH.value, signatures.SignatureFormat.PREFIX.value)
KEY_TYPES = ("x25519",)
MAX_TOKENS_PER_ADDRESS = 16


def auth_statement(relay: str, address: str, nonce: str, issued: int) -> str:
    """The text a client signs to open a session (LF-separated, no trailing newline)."""
    return f"Idena relay auth v1\nrelay: {relay}\naddress: {address}\nnonce: {nonce}\nissued: {issued}"


def key_statement(address: str, key_type: str, public_key: str, issued: int) -> str:
    """The text a client signs to publish its encryption key."""
    return (f"Idena relay key v1\naddress: {address}\nkey_type: {key_type}\n"
            f"public_key: {public_key}\nissued: {issued}")


@dataclass(slots=True)
class Challenge:
    nonce: str
    issued_at: int
    expires_at: int
    used: bool = False


class Tokens:
    """Opaque bearer tokens for the REST API, each bound to one address until it expires."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}
        self._by_address: dict[str, list[str]] = {}

    def issue(self, address: str, ttl_s: float, now: float) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        expires = now + ttl_s
        self._tokens[token] = (address, expires)
        owned = self._by_address.setdefault(address, [])
        owned.append(token)
        if len(owned) > MAX_TOKENS_PER_ADDRESS:
            self._tokens.pop(owned.pop(0), None)
        return token, expires

    def address_of(self, token: str, now: float) -> str | None:
        entry = self._tokens.get(token)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def sweep(self, now: float) -> None:
        for token, (address, expires) in list(self._tokens.items()):
            if expires <= now:
                del self._tokens[token]
                owned = self._by_address.get(address)
                if owned is not None:
                    owned.remove(token)
                    if not owned:
                        del self._by_address[address]


def canonical_x25519(public_key: str) -> bool:
    try:
        raw = base64.b64decode(public_key, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and base64.b64encode(raw).decode() == public_key


class Authenticator:
    """Applies ``[auth] mode`` to WebSocket sign-ins and to REST writes."""

    def __init__(self, config: Config, store: Store, metrics: RelayMetrics,
                 verify: Callable[[str, str, str, str], bool] = signatures.verify) -> None:
        self.store = store
        self.metrics = metrics
        self.verify = verify
        self.tokens = Tokens()
        self.on_locked: Callable[[str], None] = lambda address: None
        self.attempts = FixedWindow(config.limits.auth_attempts_per_ip_per_min, 60.0)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relayd-verify")
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.mode = config.auth.mode
        self.relay = config.effective_public_url
        self.challenge_ttl = config.auth.challenge_ttl_s
        self.token_ttl = config.auth.token_ttl_s
        self.skew = config.auth.key_clock_skew_s
        self.expose_online_list = config.expose_online_list
        self.attempts.limit = config.limits.auth_attempts_per_ip_per_min

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # WebSocket sign-in

    def challenge_for(self, session: Session) -> dict[str, Any] | None:
        """The frame sent when a connection opens; None in open mode."""
        if self.mode == "open":
            return None
        issued = int(time.time())
        challenge = Challenge(f"signin-{uuid.uuid4()}", issued, issued + int(self.challenge_ttl))
        session.extra = challenge
        return {"type": "challenge", "version": 1, "nonce": challenge.nonce, "relay": self.relay,
                "issuedAt": challenge.issued_at, "expiresAt": challenge.expires_at, "formats": list(FORMATS)}

    async def authenticate(self, session: Session, address: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Return the extra ``auth_success`` fields, or raise the refusal."""
        signature = frame.get("signature")
        if signature is None or self.mode == "open":
            return await self._unsigned(address)
        nonce = field_str(frame, "nonce")
        if not isinstance(signature, str):
            raise RelayError(ErrorCode.INVALID_FIELD, "Field signature must be a 0x-prefixed hex string")
        fmt = self._format(frame.get("format"))
        challenge = session.extra
        now = time.time()
        if (not isinstance(challenge, Challenge) or challenge.nonce != nonce or challenge.used
                or now > challenge.expires_at):
            self._fail("nonce")
            raise RelayError(ErrorCode.AUTH_FAILED, "Unknown, used or expired nonce: ask for a new challenge")
        challenge.used = True
        text = auth_statement(self.relay, address, challenge.nonce, challenge.issued_at)
        await self._check_signature(session.ip, text, signature, fmt, address)
        session.verified = True
        await self._lock(address)
        token, _ = self.tokens.issue(address, self.token_ttl, time.monotonic())
        return {"verified": True, "token": token, "tokenExpiresAt": int((now + self.token_ttl) * 1000)}

    async def _unsigned(self, address: str) -> dict[str, Any]:
        if self.mode == "signed":
            self._fail("unsigned")
            raise RelayError(ErrorCode.AUTH_REQUIRED, "This relay requires a signed auth: sign the challenge")
        if self.mode == "mixed" and await self._locked(address):
            self._fail("locked")
            raise RelayError(ErrorCode.AUTH_REQUIRED,
                             "This address has proven ownership before: unsigned auth is refused, sign the challenge")
        return {"verified": False}

    def _format(self, value: Any) -> str:
        fmt = FORMATS[0] if value is None else value
        if fmt not in FORMATS:
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field format must be one of {', '.join(FORMATS)}")
        return fmt

    def _fail(self, reason: str) -> None:
        self.metrics.auth_failures.labels(reason=reason).inc()

    async def _check_signature(self, ip: str, text: str, signature: str, fmt: str, address: str) -> None:
        wait = self.attempts.hit(limit_key(ip), time.monotonic())
        if wait:
            self.metrics.rate_limited.labels(limit="auth").inc()
            self._fail("rate_limited")
            log.debug("auth attempt limit hit by %s", ip)
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many signature checks from this address; retry later")
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(self._executor, self.verify, text, signature, fmt, address)
        except Exception:
            log.exception("signature verification failed unexpectedly")
            ok = False
        if not ok:
            self._fail("signature")
            raise RelayError(ErrorCode.AUTH_FAILED, "The signature does not prove ownership of this address")

    async def _locked(self, address: str) -> bool:
        try:
            return await self.store.is_locked(address)
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Cannot check this address's lock right now") from None

    async def _lock(self, address: str) -> None:
        """Record proven ownership, and end any unsigned session that claimed the address before."""
        try:
            await self.store.lock(address)
        except StorageUnavailable as exc:
            log.error("cannot record an ownership lock: %s", exc)
        self.on_locked(address)

    # REST

    async def authorize(self, req: Any, address: str) -> None:
        """Private REST routes need a bearer token of ``address`` outside open mode."""
        if self.mode == "open":
            return
        header = req.headers.get("authorization") or ""
        scheme, _, token = header.partition(" ")
        challenge = (("WWW-Authenticate", 'Bearer realm="relayd"'),)
        if scheme.lower() != "bearer" or not token.strip():
            raise RelayError(ErrorCode.UNAUTHORIZED, "This route needs Authorization: Bearer <token> from a "
                             "signed WebSocket auth", headers=challenge)
        owner = self.tokens.address_of(token.strip(), time.monotonic())
        if owner is None:
            raise RelayError(ErrorCode.UNAUTHORIZED, "Bearer token unknown or expired", headers=challenge)
        if owner != address:
            raise RelayError(ErrorCode.FORBIDDEN)

    async def check_key_write(self, req: Any, body: dict[str, Any], record: KeyRecord) -> KeyRecord:
        """Refuse unsigned writes over proven ownership; verify signed statements."""
        existing = await self.store.get_key(record.address)
        signature = body.get("signature")
        if signature is None:
            if self.mode == "signed":
                raise RelayError(ErrorCode.AUTH_REQUIRED, "This relay only accepts signed keys")
            if self.mode == "mixed" and ((existing is not None and existing.signed)
                                         or await self._locked(record.address)):
                raise RelayError(ErrorCode.AUTH_REQUIRED, "This address has a signed key or proved ownership: "
                                 "unsigned key writes are refused")
            return record
        if not isinstance(signature, str):
            raise RelayError(ErrorCode.INVALID_FIELD, "Field signature must be a 0x-prefixed hex string")
        key_type = body.get("keyType")
        if key_type not in KEY_TYPES:
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field keyType must be one of {', '.join(KEY_TYPES)}")
        if not canonical_x25519(record.public_key):
            raise RelayError(ErrorCode.INVALID_FIELD, "A signed publicKey must be canonical base64 of 32 bytes")
        issued = body.get("issuedAt")
        if isinstance(issued, bool) or not isinstance(issued, int):
            raise RelayError(ErrorCode.INVALID_FIELD, "Field issuedAt must be an integer of unix seconds")
        if abs(time.time() - issued) > self.skew:
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field issuedAt must be within {int(self.skew)} s of now")
        if existing is not None and existing.signed and issued <= (existing.issued_at or 0):
            raise RelayError(ErrorCode.STALE_STATEMENT,
                             "issuedAt must be newer than the stored signed key's (no rollback)")
        fmt = self._format(body.get("format"))
        text = key_statement(record.address, key_type, record.public_key, issued)
        await self._check_signature(req.client_ip, text, signature, fmt, record.address)
        record.key_type, record.issued_at, record.format, record.signature = key_type, issued, fmt, signature
        await self._lock(record.address)
        return record

    def key_view(self, record: KeyRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"address": record.address, "publicKey": record.public_key,
                               "updatedAt": record.updated_at, "createdAt": record.created_at,
                               "verified": record.signed}
        if record.signed:
            assert record.key_type is not None and record.issued_at is not None
            out.update(keyType=record.key_type, issuedAt=record.issued_at, format=record.format,
                       signature=record.signature,
                       statement=key_statement(record.address, record.key_type, record.public_key,
                                               record.issued_at))
        return out

    def sweep(self) -> None:
        now = time.monotonic()
        self.tokens.sweep(now)
        self.attempts.sweep(now)

"""Proof of address ownership: sign-in challenges, ownership locks, signed keys, REST authorization.

An Idena address is a secp256k1 key, so a client proves it owns one by
signing a text the relay made up (NIP-42 style). Every failure is a
``RelayError``; the caller turns it into an error frame or an HTTP answer.
Verification runs on one worker thread so a burst of sign-ins cannot
monopolise the event loop, and is rate limited per client IP.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from ..access import DenyList, denied
from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import field_str
from ..ops.metrics import RelayMetrics
from ..ratelimit import FixedWindow, limit_key
from ..storage.store import KeyRecord, StorageUnavailable, Store
from . import secp256k1, signatures
from .statements import auth_statement, canonical_x25519, key_statement
from .tokens import new_token, token_hash

log = logging.getLogger("relayd.auth")

FORMATS = (signatures.SignatureFormat.DOUBLE_HASH.value, signatures.SignatureFormat.PREFIX.value)
KEY_TYPES = ("x25519",)
MAX_TOKENS_PER_ADDRESS = 16

Verifier = Callable[[str, str, str, str], bool]
"""``verify(text, signature_hex, format, address) -> bool``; ``signatures.verify`` in production."""


@dataclass(slots=True)
class Challenge:
    nonce: str
    issued_at: int
    expires_at: int


@dataclass(slots=True)
class SignIn:
    """A sign-in the authenticator accepted.

    ``fields`` go into ``auth_success``; ``proven`` means the client proved
    ownership, so sessions that merely claimed the address must be evicted.
    """

    fields: dict[str, Any]
    proven: bool


class Authenticator:
    """Applies ``[auth] mode`` to WebSocket sign-ins and to REST writes.

    ``open`` accepts every claim; ``mixed`` accepts unsigned claims until an
    address has proven ownership once (then it is locked); ``signed`` accepts
    only signatures.
    """

    def __init__(self, config: Config, relay_url: str, store: Store, metrics: RelayMetrics, clock: Clock,
                 verify: Verifier = signatures.verify) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.verify = verify
        self.attempts = FixedWindow(config.limits.auth_attempts_per_ip_per_min, 60.0)
        self._challenges: dict[int, Challenge] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relayd-verify")
        self.configure(config, relay_url)

    def configure(self, config: Config, relay_url: str) -> None:
        """Apply (re)loaded settings; ``relay_url`` is the URL signed sign-ins are bound to."""
        self.mode = config.auth.mode
        self.relay = relay_url
        self.challenge_ttl = config.auth.challenge_ttl_s
        self.token_ttl = config.auth.token_ttl_s
        self.skew = config.auth.key_clock_skew_s
        self.attempts.limit = config.limits.auth_attempts_per_ip_per_min
        self.deny = DenyList(config.access.deny)

    def _check_denied(self, address: str) -> None:
        if self.deny.denies_address(address):
            self.metrics.access_denied.labels(kind="address").inc()
            raise denied("address")

    def prepare(self, crypto: str) -> str:
        """Pick the verification backend (``auto`` or ``pure``) and warm it up; returns its description."""
        backend = signatures.select_backend(crypto)
        if self.mode != "open":
            secp256k1.precompute()
        return backend

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # WebSocket sign-in

    def challenge(self, session_id: int) -> dict[str, Any] | None:
        """The ``challenge`` frame for a new connection; None in open mode.

        The challenge is kept until the session signs in, fails or ``forget``
        is called for it; its nonce is single-use.
        """
        if self.mode == "open":
            return None
        issued = int(self.clock.wall())
        challenge = Challenge(f"signin-{uuid.uuid4()}", issued, issued + int(self.challenge_ttl))
        self._challenges[session_id] = challenge
        return {"type": "challenge", "version": 1, "nonce": challenge.nonce, "relay": self.relay,
                "issuedAt": challenge.issued_at, "expiresAt": challenge.expires_at, "formats": list(FORMATS)}

    def forget(self, session_id: int) -> None:
        """The session closed: drop its challenge."""
        self._challenges.pop(session_id, None)

    async def sign_in(self, session_id: int, ip: str, address: str, frame: dict[str, Any]) -> SignIn:
        """Check an ``auth`` frame for ``address``; raise the refusal as a ``RelayError``.

        Unsigned frames are judged by the mode and the address's lock; signed
        ones against this session's challenge, which is used up either way.
        """
        self._check_denied(address)
        signature = frame.get("signature")
        if signature is None or self.mode == "open":
            await self._check_unsigned(address)
            self._challenges.pop(session_id, None)  # signed in: a session cannot sign in again
            return SignIn({"verified": False}, proven=False)
        nonce = field_str(frame, "nonce")
        if not isinstance(signature, str):
            raise RelayError(ErrorCode.INVALID_FIELD, "Field signature must be a 0x-prefixed hex string")
        fmt = self._format(frame.get("format"))
        challenge = self._challenges.get(session_id)
        now = self.clock.wall()
        if challenge is None or challenge.nonce != nonce or now > challenge.expires_at:
            self._count_failure("nonce")
            raise RelayError(ErrorCode.AUTH_FAILED, "Unknown, used or expired nonce: ask for a new challenge")
        del self._challenges[session_id]
        text = auth_statement(self.relay, address, challenge.nonce, challenge.issued_at)
        await self._check_signature(ip, text, signature, fmt, address)
        if not _throwaway(frame):
            await self._lock(address)
        await self._drop_planted_key(address)
        token, expires = new_token(), int((now + self.token_ttl) * 1000)
        try:
            await self.store.save_token(token_hash(token), address, expires, MAX_TOKENS_PER_ADDRESS)
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Signed in, but the REST token cannot be stored right "
                             "now; sign in again later") from None
        return SignIn({"verified": True, "token": token, "tokenExpiresAt": expires}, proven=True)

    async def _check_unsigned(self, address: str) -> None:
        if self.mode == "signed":
            self._count_failure("unsigned")
            raise RelayError(ErrorCode.AUTH_REQUIRED, "This relay requires a signed auth: sign the challenge")
        if self.mode == "mixed" and await self._locked(address):
            self._count_failure("locked")
            raise RelayError(ErrorCode.AUTH_REQUIRED,
                             "This address has proven ownership before: unsigned auth is refused, sign the challenge")

    def _format(self, value: Any) -> str:
        fmt = FORMATS[0] if value is None else value
        if fmt not in FORMATS:
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field format must be one of {', '.join(FORMATS)}")
        return fmt

    def _count_failure(self, reason: str) -> None:
        self.metrics.auth_failures.labels(reason=reason).inc()

    async def _check_signature(self, ip: str, text: str, signature: str, fmt: str, address: str) -> None:
        wait = self.attempts.hit(limit_key(ip), self.clock.monotonic())
        if wait:
            self.metrics.rate_limited.labels(limit="auth").inc()
            self._count_failure("rate_limited")
            log.debug("auth attempt limit hit by %s", ip)
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many signature checks from this address; retry later")
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(self._executor, self.verify, text, signature, fmt, address)
        except Exception:
            log.exception("signature verification failed unexpectedly")
            ok = False
        if not ok:
            self._count_failure("signature")
            raise RelayError(ErrorCode.AUTH_FAILED, "The signature does not prove ownership of this address")

    async def _locked(self, address: str) -> bool:
        try:
            return await self.store.is_locked(address)
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Cannot check this address's lock right now") from None

    async def _lock(self, address: str) -> None:
        """Record proven ownership, so unsigned claims of the address are refused from now on.

        A lock that cannot be recorded fails the sign-in or key write: the
        address must never stay claimable by anyone after proving ownership.
        """
        try:
            await self.store.lock(address)
        except StorageUnavailable as exc:
            log.error("cannot record an ownership lock: %s", exc)
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Ownership cannot be recorded right now; "
                             "retry later") from None

    async def _drop_planted_key(self, address: str) -> None:
        """The address is locked: an unsigned key of it (which anyone may have uploaded before) stops being
        served; its owner publishes a signed one. Tried at every signed sign-in, so one that fails now is done
        by the next."""
        try:
            if await self.store.drop_unsigned_key(address):
                log.info("an unsigned key of an address that signed in was deleted: only its owner's signed "
                         "key is served now")
        except StorageUnavailable as exc:
            log.warning("cannot delete the unsigned key of an address that signed in: %s", exc)

    # REST

    async def authorize(self, authorization: str | None, address: str) -> None:
        """Private REST routes need ``Authorization: Bearer <token of address>`` outside open mode."""
        if self.mode == "open":
            return
        scheme, _, token = (authorization or "").partition(" ")
        challenge = (("WWW-Authenticate", 'Bearer realm="relayd"'),)
        if scheme.lower() != "bearer" or not token.strip():
            raise RelayError(ErrorCode.UNAUTHORIZED, "This route needs Authorization: Bearer <token> from a "
                             "signed WebSocket auth", headers=challenge)
        try:
            owner = await self.store.token_address(token_hash(token.strip()), int(self.clock.wall() * 1000))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "Cannot check the token right now") from None
        if owner is None:
            raise RelayError(ErrorCode.UNAUTHORIZED, "Bearer token unknown or expired", headers=challenge)
        if owner != address:
            raise RelayError(ErrorCode.FORBIDDEN)

    async def check_key_write(self, body: dict[str, Any], record: KeyRecord, ip: str) -> bool:
        """Refuse unsigned writes over proven ownership; verify and fill in signed statements.

        Returns True when the write proved ownership of the address (a valid
        signed statement outside open mode), so unsigned sessions of it must
        be evicted.
        """
        self._check_denied(record.address)
        existing = await self.store.get_key(record.address)
        signature = body.get("signature")
        if signature is None:
            if self.mode == "signed":
                raise RelayError(ErrorCode.AUTH_REQUIRED, "This relay only accepts signed keys")
            if self.mode == "mixed" and ((existing is not None and existing.signed)
                                         or await self._locked(record.address)):
                raise RelayError(ErrorCode.AUTH_REQUIRED, "This address has a signed key or proved ownership: "
                                 "unsigned key writes are refused")
            return False
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
        if abs(self.clock.wall() - issued) > self.skew:
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field issuedAt must be within {int(self.skew)} s of now")
        floor = await self.store.key_floor(record.address)
        if floor is not None and issued <= floor:
            raise RelayError(ErrorCode.STALE_STATEMENT, "issuedAt must be newer than every signed key ever "
                             "stored for this address, deleted ones included (no rollback, no replay)")
        fmt = self._format(body.get("format"))
        text = key_statement(record.address, key_type, record.public_key, issued)
        await self._check_signature(ip, text, signature, fmt, record.address)
        record.key_type, record.issued_at, record.format, record.signature = key_type, issued, fmt, signature
        if self.mode == "open":  # anyone may claim any address: nothing to lock, nobody to evict
            return False
        if not _throwaway(body):
            await self._lock(record.address)
        return True

    def sweep(self) -> None:
        """Forget finished rate windows (expired tokens leave the store with retention expiry)."""
        self.attempts.sweep(self.clock.monotonic())


def _throwaway(frame: dict[str, Any]) -> bool:
    """``throwaway: true`` on a signed sign-in or key: proof for this session or key only, no ownership lock
    recorded (an identity used once, like relayd check's: otherwise each check would lock addresses for ever).
    Only the key's holder can send it, and it never removes a lock another proof recorded."""
    value = frame.get("throwaway", False)
    if not isinstance(value, bool):
        raise RelayError(ErrorCode.INVALID_FIELD, "Field throwaway must be true or false")
    return value

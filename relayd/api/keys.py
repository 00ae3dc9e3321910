"""REST routes for public keys: upload, lookup (single, cached, and batch), delete, count."""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol

from ..addresses import normalize_address
from ..clock import Clock, wall_ms
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..identity.auth import Authenticator
from ..identity.statements import key_statement
from ..storage.store import KeyRecord, Store, key_bytes
from .http import Route, address_batch, cached_json_response, json_body, json_response
from ..net.http_values import HttpRequest, HttpResponse
from .limits import Budget, RestLimits

MAX_PUBLIC_KEY_CHARS = 4096


class SessionRegistry(Protocol):
    """What key uploads tell live sessions: an address proved ownership (unsigned sessions go), or published a key."""

    def evict_unverified(self, address: str) -> None: ...
    def key_uploaded(self, address: str) -> None: ...


def key_view(record: KeyRecord) -> dict[str, Any]:
    """A key as REST returns it: for signed keys with the exact statement, so clients can verify it."""
    out: dict[str, Any] = {"address": record.address, "publicKey": record.public_key,
                           "updatedAt": record.updated_at, "createdAt": record.created_at,
                           "verified": record.signed}
    if record.signed:
        assert record.key_type is not None and record.issued_at is not None
        out.update(keyType=record.key_type, issuedAt=record.issued_at, format=record.format,
                   signature=record.signature,
                   statement=key_statement(record.address, record.key_type, record.public_key, record.issued_at))
    return out


def key_cache_control(max_age_s: int) -> str:
    """``Cache-Control`` of a key lookup: a short max-age, or revalidation every time (0)."""
    return f"max-age={max_age_s}" if max_age_s else "no-cache"


class KeyRoutes:
    def __init__(self, config: Config, store: Store, authenticator: Authenticator, sessions: SessionRegistry,
                 limits: RestLimits, clock: Clock, budget: Callable[[], int]) -> None:
        self.store = store
        self.budget = budget
        """The storage budget in force (0: none)."""
        self.authenticator = authenticator
        self.sessions = sessions
        self.limits = limits
        self.clock = clock
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.cache_control = key_cache_control(config.server.key_cache_max_age_s)

    def routes(self) -> list[Route]:
        return [Route("/api/public-keys", "POST", self.put_key, Budget.WRITE),
                Route("/api/public-keys/batch", "POST", self.get_keys, Budget.READ),
                Route("/api/public-keys/stats/all", "GET", self.key_stats, Budget.WRITE),
                Route("/api/public-keys/*", "GET", self.get_key, Budget.READ),
                Route("/api/public-keys/*", "DELETE", self.delete_key, Budget.WRITE)]

    async def put_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        body = json_body(req)
        address = normalize_address(body.get("address"))
        public_key = body.get("publicKey")
        if not isinstance(public_key, str) or not public_key:
            raise RelayError(ErrorCode.INVALID_FIELD, "Invalid public key: publicKey must be a non-empty string")
        if len(public_key) > MAX_PUBLIC_KEY_CHARS:
            raise RelayError(ErrorCode.INVALID_FIELD,
                             f"Invalid public key: longer than {MAX_PUBLIC_KEY_CHARS} characters")
        now = wall_ms(self.clock)
        record = KeyRecord(address, public_key, now, now)
        proven = await self.authenticator.check_key_write(body, record, req.client_ip)
        size = key_bytes(record.public_key, record.signature)
        self.limits.charge_key_bytes(req.client_ip, self.clock.monotonic(), size)
        await self._check_room(record.address, size)
        stored = await self.store.put_key(record)
        if proven:
            self.sessions.evict_unverified(address)
        self.sessions.key_uploaded(address)
        return json_response(HTTPStatus.OK, {"success": True, "address": stored.address,
                                             "createdAt": stored.created_at, "updatedAt": stored.updated_at,
                                             "verified": stored.signed})

    async def _check_room(self, address: str, size: int) -> None:
        """Refuse a key that would take the store past its budget; replacing a key no smaller always passes,
        so owners keep refreshing theirs when the store is full."""
        budget = self.budget()
        if not budget or self.store.stored_bytes() + size <= budget:
            return
        old = await self.store.get_key(address)
        if old is None or key_bytes(old.public_key, old.signature) < size:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "The relay's storage budget is used up; the key was "
                             "not stored, retry later")

    async def get_keys(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """A batch costs one read per address (the request itself paid the first)."""
        addresses = address_batch(json_body(req))
        self.limits.charge(Budget.READ, req.client_ip, self.clock.monotonic(), len(addresses) - 1)
        found = await self.store.get_keys(addresses)
        keys = {a: key_view(r) for a, r in found.items()}
        return json_response(HTTPStatus.OK, {"count": len(keys), "keys": keys})

    async def key_stats(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        return json_response(HTTPStatus.OK, {"totalKeys": await self.store.key_count()})

    async def get_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        record = await self.store.get_key(normalize_address(args[0]))
        if record is None:
            raise RelayError(ErrorCode.KEY_NOT_FOUND)
        return cached_json_response(req, key_view(record), self.cache_control)

    async def delete_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        await self.authenticator.authorize(req.header("authorization"), address)
        deleted = await self.store.delete_key(address)
        return json_response(HTTPStatus.OK, {"success": deleted,
                                             "message": "Public key deleted" if deleted else "Public key not found"})

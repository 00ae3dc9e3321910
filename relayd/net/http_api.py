"""The REST API of the seed, as a function from an ``HttpRequest`` to an ``HttpResponse``.

No sockets: ``net.gateway`` turns bytes into the request and the response
back into bytes. Errors are ``RelayError`` values rendered as
``{"error": ..., "code": ...}``. Handlers await the store, so this is the
REST logic with its storage I/O, not a Sans-I/O core.
"""

from __future__ import annotations

import datetime
import logging
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Protocol
from urllib.parse import unquote

from .. import __version__
from ..addresses import normalize_address
from ..clock import Clock, wall_ms
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import loads
from ..identity.auth import Authenticator
from ..identity.statements import key_statement
from ..ops.metrics import RelayMetrics
from ..ops.prometheus import CONTENT_TYPE
from ..presence import Presence
from ..ratelimit import FixedWindow, retry_after_header
from ..storage.store import KeyRecord, QueuedMessage, StorageUnavailable, Store
from .clientip import limit_key
from .http import HttpRequest, HttpResponse, error_response, json_response
from .origins import OriginPolicy

log = logging.getLogger("relayd.http")

MAX_BATCH = 1000
UNLIMITED_PATHS = ("/health", "/health/live", "/health/ready", "/metrics")

Handler = Callable[[HttpRequest, list[str]], Awaitable[HttpResponse]]


class RelayStatus(Protocol):
    """What the health routes report about the running relay."""

    def session_count(self) -> int: ...
    def accepting(self) -> bool: ...


class SessionRegistry(Protocol):
    """What REST tells live sessions: an address proved ownership (unsigned sessions go), or published a key."""

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


def message_view(msg: QueuedMessage) -> dict[str, Any]:
    """A queued message in the REST listing shape of the original relay."""
    return {"from": msg.sender, "content": msg.content, "messageId": msg.message_id,
            "timestamp": msg.timestamp, "queuedAt": msg.queued_at}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class HttpApi:
    """Routes requests to handlers; applies CORS, the per-IP rate limit and HEAD."""

    def __init__(self, config: Config, presence: Presence, store: Store, metrics: RelayMetrics,
                 authenticator: Authenticator, sessions: SessionRegistry, relay: RelayStatus, clock: Clock) -> None:
        self.presence = presence
        self.store = store
        self.metrics = metrics
        self.authenticator = authenticator
        self.sessions = sessions
        self.relay = relay
        self.clock = clock
        self.started = clock.monotonic()
        self._routes: list[tuple[tuple[str, ...], dict[str, Handler]]] = [
            (("health",), {"GET": self.health}),
            (("health", "live"), {"GET": self.live}),
            (("health", "ready"), {"GET": self.ready}),
            (("metrics",), {"GET": self.metrics_text}),
            (("api", "public-keys"), {"POST": self.put_key}),
            (("api", "public-keys", "batch"), {"POST": self.get_keys}),
            (("api", "public-keys", "stats", "all"), {"GET": self.key_stats}),
            (("api", "public-keys", "*"), {"GET": self.get_key, "DELETE": self.delete_key}),
            (("api", "messages", "stats", "all"), {"GET": self.queue_stats}),
            (("api", "messages", "*"), {"GET": self.get_messages, "DELETE": self.clear_messages}),
            (("api", "messages", "*", "queue-size"), {"GET": self.queue_size}),
            (("api", "status", "batch"), {"POST": self.status_batch}),
            (("api", "status", "online", "all"), {"GET": self.online_all}),
            (("api", "status", "*"), {"GET": self.status}),
        ]
        self._routes_by_length: dict[int, list[tuple[tuple[str, ...], dict[str, Handler]]]] = {}
        for route in self._routes:
            self._routes_by_length.setdefault(len(route[0]), []).append(route)
        self.limiter = FixedWindow(config.limits.rate_limit_max_requests, config.limits.rate_limit_window_ms / 1000)
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.metrics_enabled = config.metrics.enabled and not config.metrics.listen
        self.origins = OriginPolicy(config.server.allowed_origins)
        limits = config.limits
        window = limits.rate_limit_window_ms / 1000
        if self.limiter.window_s != window:
            self.limiter = FixedWindow(limits.rate_limit_max_requests, window)
        self.limiter.limit = limits.rate_limit_max_requests

    def _match(self, path: str) -> tuple[dict[str, Handler], list[str]] | None:
        stripped = path.strip("/")
        parts = stripped.split("/") if stripped else []
        if "%" in stripped:
            parts = [unquote(p) for p in parts]
        for pattern, methods in self._routes_by_length.get(len(parts), ()):
            args = []
            for want, got in zip(pattern, parts):
                if want == "*":
                    args.append(got)
                elif want != got:
                    break
            else:
                return methods, args
        return None

    def sweep(self) -> None:
        """Forget finished rate windows, so idle clients cost no memory."""
        self.limiter.sweep(self.clock.monotonic())

    async def handle(self, req: HttpRequest) -> HttpResponse:
        """Answer one request; never raises.

        Applies the Origin policy, the per-IP rate limit (health and metrics
        exempt), routing, ``405`` with ``Allow``, ``OPTIONS`` preflight and
        ``HEAD`` (the caller drops the body); refusals become JSON errors and
        any unexpected exception a logged ``500``. CORS headers are added to
        every answer for an allowed Origin.
        """
        origin = req.header("origin")
        try:
            response = await self._dispatch(req, origin)
        except RelayError as err:
            response = error_response(err)
        except Exception:
            log.exception("internal error answering a %s request", req.method)
            response = error_response(RelayError(ErrorCode.INTERNAL_ERROR))
        allow = self.origins.allow_header(origin)
        if allow is not None and origin is not None:
            response.headers.append(("Access-Control-Allow-Origin", allow))
            response.headers.append(("Vary", "Origin"))
        self.metrics.http.labels(status=f"{response.status // 100}xx").inc()
        return response

    async def _dispatch(self, req: HttpRequest, origin: str | None) -> HttpResponse:
        if not self.origins.allows(origin):
            raise RelayError(ErrorCode.ORIGIN_NOT_ALLOWED, f"Origin not allowed: {origin}")
        if req.path.rstrip("/") not in UNLIMITED_PATHS:
            wait = self.limiter.hit(limit_key(req.client_ip), self.clock.monotonic())
            if wait:
                self.metrics.rate_limited.labels(limit="http").inc()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("rate limit hit by %s", req.client_ip)
                raise RelayError(ErrorCode.RATE_LIMITED, "Too many requests; retry later",
                                 headers=(("Retry-After", retry_after_header(wait)),))
        found = self._match(req.path)
        if found is None:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        methods, args = found
        if req.method == "OPTIONS":
            return self._preflight(req, methods)
        method = "GET" if req.method == "HEAD" else req.method
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted({*methods, "OPTIONS"} | ({"HEAD"} if "GET" in methods else set())))
            raise RelayError(ErrorCode.METHOD_NOT_ALLOWED, f"Method {req.method} not allowed on {req.path}",
                             headers=(("Allow", allow),))
        try:
            return await handler(req, args)
        except StorageUnavailable as exc:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, f"Storage is unavailable: {exc}") from None

    def _preflight(self, req: HttpRequest, methods: dict[str, Handler]) -> HttpResponse:
        allowed = sorted({*methods, "OPTIONS"} | ({"HEAD"} if "GET" in methods else set()))
        headers = [("Access-Control-Allow-Methods", ", ".join(allowed)),
                   ("Access-Control-Allow-Headers",
                    req.header("access-control-request-headers") or "Content-Type, Authorization"),
                   ("Access-Control-Max-Age", "600"), ("Allow", ", ".join(allowed))]
        return HttpResponse(HTTPStatus.NO_CONTENT, b"", headers, content_type="")

    # Helpers

    def _json_body(self, req: HttpRequest) -> dict[str, Any]:
        if not req.body.strip():
            return {}
        try:
            body = loads(req.body)
        except ValueError:
            raise RelayError(ErrorCode.INVALID_JSON, "Request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RelayError(ErrorCode.BAD_REQUEST, "Request body must be a JSON object")
        return body

    def _addresses(self, body: dict[str, Any]) -> list[str]:
        addresses = body.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            raise RelayError(ErrorCode.BAD_REQUEST, "addresses must be a non-empty array")
        if len(addresses) > MAX_BATCH:
            raise RelayError(ErrorCode.BAD_REQUEST, f"addresses may hold at most {MAX_BATCH} entries")
        out = []
        for a in addresses:
            try:
                out.append(normalize_address(a))
            except RelayError:
                raise RelayError(ErrorCode.INVALID_ADDRESS, f"Invalid address format: {str(a)[:64]}") from None
        return out

    async def _authorize(self, req: HttpRequest, address: str) -> None:
        await self.authenticator.authorize(req.header("authorization"), address)

    # Health and metrics

    def _storage(self) -> dict[str, Any]:
        state = {"backend": self.store.name, "status": "ok" if self.store.healthy else "unavailable"}
        if self.store.problem:
            state["problem"] = self.store.problem
        return state

    async def health(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        healthy = self.store.healthy
        return json_response(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, {
            "status": "ok" if healthy else "degraded",
            "timestamp": datetime.datetime.fromtimestamp(self.clock.wall(), datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "uptime": round(self.clock.monotonic() - self.started, 3),
            "connections": self.relay.session_count(),
            "queuedMessages": self.store.total(),
            "version": __version__,
            "storage": self._storage(),
        })

    async def live(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        return json_response(HTTPStatus.OK, {"status": "ok"})

    async def ready(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        ok = self.store.healthy and self.relay.accepting()
        return json_response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                             {"status": "ready" if ok else "not_ready", "storage": self._storage(),
                              "accepting": self.relay.accepting()})

    async def metrics_text(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.metrics_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        return HttpResponse(HTTPStatus.OK, self.metrics.render().encode(), content_type=CONTENT_TYPE)

    # Public keys

    async def put_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        body = self._json_body(req)
        address = normalize_address(body.get("address"))
        public_key = body.get("publicKey")
        if not isinstance(public_key, str) or not public_key:
            raise RelayError(ErrorCode.INVALID_FIELD, "Invalid public key: publicKey must be a non-empty string")
        if len(public_key) > 4096:
            raise RelayError(ErrorCode.INVALID_FIELD, "Invalid public key: longer than 4096 characters")
        now = wall_ms(self.clock)
        record = KeyRecord(address, public_key, now, now)
        proven = await self.authenticator.check_key_write(body, record, req.client_ip)
        stored = await self.store.put_key(record)
        if proven:
            self.sessions.evict_unverified(address)
        self.sessions.key_uploaded(address)
        return json_response(HTTPStatus.OK, {"success": True, "address": stored.address,
                                             "createdAt": stored.created_at, "updatedAt": stored.updated_at,
                                             "verified": stored.signed})

    async def get_keys(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        addresses = self._addresses(self._json_body(req))
        found = await self.store.get_keys(addresses)
        keys = {a: key_view(r) for a, r in found.items()}
        return json_response(HTTPStatus.OK, {"count": len(keys), "keys": keys})

    async def key_stats(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        return json_response(HTTPStatus.OK, {"totalKeys": await self.store.key_count()})

    async def get_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        record = await self.store.get_key(address)
        if record is None:
            raise RelayError(ErrorCode.KEY_NOT_FOUND)
        return json_response(HTTPStatus.OK, key_view(record))

    async def delete_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        await self._authorize(req, address)
        deleted = await self.store.delete_key(address)
        return json_response(HTTPStatus.OK, {"success": deleted,
                                             "message": "Public key deleted" if deleted else "Public key not found"})

    # Messages

    async def get_messages(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """Without ``limit`` a GET drains the queue; ``limit`` and HEAD only peek."""
        address = normalize_address(args[0])
        raw_limit = req.query.get("limit")
        cap = self.config.queue.max_offline_messages
        limit = cap
        if raw_limit:
            try:
                limit = int(raw_limit[0])
            except ValueError:
                limit = -1
            if limit < 0:
                raise RelayError(ErrorCode.BAD_REQUEST, "limit must be a non-negative integer")
        await self._authorize(req, address)
        messages = await self.store.pending(address, min(limit, cap)) if limit else []
        if messages and not raw_limit and req.method == "GET":
            await self.store.remove(address, [m.seq for m in messages])
        return json_response(HTTPStatus.OK, {"address": address, "count": len(messages),
                                             "messages": [message_view(m) for m in messages]})

    async def clear_messages(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        await self._authorize(req, address)
        removed = await self.store.clear(address)
        return json_response(HTTPStatus.OK, {"address": address, "cleared": removed > 0, "removed": removed,
                                             "message": "Queue cleared" if removed else "No messages to clear"})

    async def queue_size(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        return json_response(HTTPStatus.OK, {"address": address, "queueSize": await self.store.size(address)})

    async def queue_stats(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        stats = await self.store.stats()
        q = self.config.queue
        return json_response(HTTPStatus.OK, {"totalUsers": stats["recipients"], "totalMessages": stats["messages"],
                                             "maxMessagesPerUser": q.max_offline_messages,
                                             "retentionHours": _number(q.message_retention_hours)})

    # Status

    async def status(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        online = (await self.presence.statuses([address]))[address]
        return json_response(HTTPStatus.OK, {"address": address, "online": online, "timestamp": wall_ms(self.clock)})

    async def status_batch(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        addresses = self._addresses(self._json_body(req))
        return json_response(HTTPStatus.OK, {"timestamp": wall_ms(self.clock),
                                             "statuses": await self.presence.statuses(addresses)})

    async def online_all(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.config.expose_online_list:
            raise RelayError(ErrorCode.DISABLED, "The online list is disabled on this relay")
        users = await self.presence.online_list()
        return json_response(HTTPStatus.OK, {"count": len(users), "users": users,
                                             "timestamp": wall_ms(self.clock)})

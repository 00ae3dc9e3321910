"""The REST API of the seed, as a function from a parsed request to a response.

No sockets: ``server.py`` turns bytes into an ``HttpRequest`` and the
``HttpResponse`` back into bytes. Errors are ``RelayError`` values rendered
as ``{"error": ..., "code": ...}``.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import parse_qs, unquote

from .. import __version__
from ..addresses import normalize_address
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import encode, loads
from ..ops.metrics import RelayMetrics
from ..ops.prometheus import CONTENT_TYPE
from ..presence import LocalPresence
from ..ratelimit import FixedWindow, retry_after_header
from ..storage.store import KeyRecord, StorageUnavailable, Store
from .clientip import limit_key
from .origins import OriginPolicy

log = logging.getLogger("relayd.http")

JSON_TYPE = "application/json; charset=utf-8"
MAX_BATCH = 1000
ALLOWED_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
UNLIMITED_PATHS = ("/health", "/health/live", "/health/ready", "/metrics")


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    """Lower-cased names; repeated headers joined with ", " (RFC 9110 5.3)."""
    body: bytes = b""
    client_ip: str = "127.0.0.1"
    query: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_target(cls, method: str, target: str, headers: Mapping[str, str], body: bytes,
                    client_ip: str) -> "HttpRequest":
        path, _, qs = target.partition("?")
        return cls(method.upper(), path, headers, body, client_ip, parse_qs(qs, keep_blank_values=True))


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON_TYPE


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, encode(payload).encode(), headers or [])


def error_response(err: RelayError) -> HttpResponse:
    return json_response(err.status, err.body(), list(err.headers))


Handler = Callable[[HttpRequest, list[str]], Awaitable[HttpResponse]]


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class HttpApi:
    """Routes requests to handlers; applies CORS, the per-IP rate limit and HEAD."""

    def __init__(self, config: Config, presence: LocalPresence, store: Store, metrics: RelayMetrics,
                 *, connections: Callable[[], int], accepting: Callable[[], bool],
                 guard: Any = None) -> None:
        self.presence = presence
        self.store = store
        self.metrics = metrics
        self.connections = connections
        self.accepting = accepting
        self.guard = guard
        self.started = time.monotonic()
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

    async def handle(self, req: HttpRequest) -> HttpResponse:
        origin = req.headers.get("origin")
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
            wait = self.limiter.hit(limit_key(req.client_ip), time.monotonic())
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
                    req.headers.get("access-control-request-headers") or "Content-Type, Authorization"),
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
        if self.guard is not None:
            await self.guard.authorize(req, address)

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
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "uptime": round(time.monotonic() - self.started, 3),
            "connections": self.connections(),
            "queuedMessages": self.store.total(),
            "version": __version__,
            "storage": self._storage(),
        })

    async def live(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        return json_response(HTTPStatus.OK, {"status": "ok"})

    async def ready(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        ok = self.store.healthy and self.accepting()
        return json_response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                             {"status": "ready" if ok else "not_ready", "storage": self._storage(),
                              "accepting": self.accepting()})

    async def metrics_text(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.metrics_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        return HttpResponse(HTTPStatus.OK, self.metrics.render().encode(), content_type=CONTENT_TYPE)

    # Public keys

    @staticmethod
    def _key_json(record: KeyRecord) -> dict[str, Any]:
        return {"address": record.address, "publicKey": record.public_key,
                "updatedAt": record.updated_at, "createdAt": record.created_at}

    def key_view(self, record: KeyRecord) -> dict[str, Any]:
        return self.guard.key_view(record) if self.guard is not None else self._key_json(record)

    async def put_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        body = self._json_body(req)
        address = normalize_address(body.get("address"))
        public_key = body.get("publicKey")
        if not isinstance(public_key, str) or not public_key:
            raise RelayError(ErrorCode.INVALID_FIELD, "Invalid public key: publicKey must be a non-empty string")
        if len(public_key) > 4096:
            raise RelayError(ErrorCode.INVALID_FIELD, "Invalid public key: longer than 4096 characters")
        now = int(time.time() * 1000)
        record = KeyRecord(address, public_key, now, now)
        if self.guard is not None:
            record = await self.guard.check_key_write(req, body, record)
        stored = await self.store.put_key(record)
        return json_response(HTTPStatus.OK, {"success": True, "address": stored.address,
                                             "createdAt": stored.created_at, "updatedAt": stored.updated_at,
                                             "verified": stored.signed})

    async def get_keys(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        addresses = self._addresses(self._json_body(req))
        found = await self.store.get_keys(addresses)
        keys = {a: self.key_view(r) for a, r in found.items()}
        return json_response(HTTPStatus.OK, {"count": len(keys), "keys": keys})

    async def key_stats(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        return json_response(HTTPStatus.OK, {"totalKeys": await self.store.key_count()})

    async def get_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        record = await self.store.get_key(address)
        if record is None:
            raise RelayError(ErrorCode.KEY_NOT_FOUND)
        return json_response(HTTPStatus.OK, self.key_view(record))

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
                                             "messages": [m.rest() for m in messages]})

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
        return json_response(HTTPStatus.OK, {"address": address, "online": self.presence.is_online(address),
                                             "timestamp": int(time.time() * 1000)})

    async def status_batch(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        addresses = self._addresses(self._json_body(req))
        return json_response(HTTPStatus.OK, {"timestamp": int(time.time() * 1000),
                                             "statuses": {a: self.presence.is_online(a) for a in addresses}})

    async def online_all(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if self.guard is not None and not self.guard.expose_online_list:
            raise RelayError(ErrorCode.DISABLED, "The online list is disabled on this relay")
        users = self.presence.online_addresses()
        return json_response(HTTPStatus.OK, {"count": len(users), "users": users,
                                             "timestamp": int(time.time() * 1000)})

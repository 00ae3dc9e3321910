"""The I/O edge: one ``websockets`` server carries WebSocket sessions and REST.

Everything here only moves bytes: handshakes become ``HttpRequest`` values
for ``HttpApi``, WebSocket messages go to ``Router``. The one place that
reaches into ``websockets`` internals is ``BodyReader``/``RelayConnection``
(request bodies and non-blocking writes); ``tests/test_websockets_compat.py``
fails loudly if a new release breaks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import logging
import re
import ssl
import time
from http import HTTPStatus
from typing import Any, Callable, Generator

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.streams import StreamReader

from .config import Config
from .errors import ErrorCode, RelayError
from .identity import secp256k1, signatures
from .identity.auth import Authenticator
from .net.clientip import ClientIpResolver, limit_key
from .net.http_api import HttpApi, HttpRequest, HttpResponse, error_response
from .net.origins import OriginPolicy
from .ops.metrics import RelayMetrics
from .presence import LocalPresence
from .ratelimit import TokenBucket
from .router import Router
from .session import Session
from .storage.memory import MemoryStore
from .storage.store import Store

log = logging.getLogger("relayd.server")

MAX_CHUNK_LINE = 128
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
FRAME_OVERHEAD = 4096
JSON_ESCAPE_FACTOR = 6  # a character may take six bytes as a JSON \uXXXX escape
CLOSE_TIMEOUT = 5.0
STATS_INTERVAL_S = 15.0
WRITE_LIMIT = 64 * 1024
MAX_OUTBOUND_BUFFER = 1024 * 1024


class RequestHead:
    """What BodyReader learnt from one request head; dropped once it is answered."""

    __slots__ = ("max_body", "length", "chunked", "body", "error", "upgrade", "done")

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.length: int | None = None
        self.chunked = False
        self.body = b""
        self.error: ErrorCode | None = None
        self.upgrade = False
        self.done = False

    def note_length(self, raw: bytes) -> None:
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0 or (self.length is not None and self.length != length):
            self.error = ErrorCode.BAD_REQUEST
        self.length = length


class BodyReader(StreamReader):
    """A StreamReader that consumes an HTTP request body after the headers.

    websockets' request parser refuses any ``Content-Length`` but 0 and any
    ``Transfer-Encoding``. While the head is parsed, this reader hides those
    headers from it and, at the blank line that ends the head, reads a
    bounded body (fixed length or chunked) so REST POSTs work on the same
    port. ``head.error`` records a body that must be refused.
    """

    def __init__(self, max_body: int) -> None:
        super().__init__()
        self.head: RequestHead | None = RequestHead(max_body)
        self.swallow = False

    def release(self) -> RequestHead:
        """Hand over the parsed head, so an open WebSocket does not keep it."""
        head, self.head = self.head, None
        assert head is not None and head.done
        return head

    def read_line(self, m: int, too_long_exc_type: type[Exception] = RuntimeError
                  ) -> Generator[None, None, bytearray]:
        line = yield from super().read_line(m, too_long_exc_type)
        head = self.head
        if head is None or head.done:
            return line
        while True:
            name, sep, value = bytes(line).partition(b":")
            lname = name.strip().lower()
            if sep and lname == b"content-length":
                head.note_length(value.strip())
            elif sep and lname == b"transfer-encoding":
                if value.strip().lower() == b"chunked":
                    head.chunked = True
                else:
                    head.error = ErrorCode.LENGTH_REQUIRED
            else:
                if sep and lname == b"upgrade" and value.strip().lower() == b"websocket":
                    head.upgrade = True
                break
            line = yield from super().read_line(m, too_long_exc_type)
        if line in (b"\r\n", b"\n"):
            head.done = True
            if head.error is None:
                yield from self._read_body(head)
            self.swallow = head.error is not None or not head.upgrade
        return line

    def read_exact(self, n: int) -> Generator[None, None, bytearray]:
        """After a REST request (one per connection) or a refused body, swallow
        whatever follows instead of parsing it as WebSocket frames."""
        if self.swallow:
            while True:
                self.discard()
                yield
        return (yield from super().read_exact(n))

    def _read_body(self, head: RequestHead) -> Generator[None, None, None]:
        if head.chunked and head.length is not None:
            head.error = ErrorCode.BAD_REQUEST
        elif head.chunked:
            parts, total = [], 0
            while True:
                size_line = yield from super().read_line(MAX_CHUNK_LINE, RuntimeError)
                digits = bytes(size_line).split(b";")[0].strip()
                if not _CHUNK_SIZE.fullmatch(digits):
                    head.error = ErrorCode.BAD_REQUEST
                    return
                size = int(digits, 16)
                total += size
                if total > head.max_body:
                    head.error = ErrorCode.PAYLOAD_TOO_LARGE
                    return
                if size == 0:
                    break
                chunk = yield from super().read_exact(size + 2)
                parts.append(bytes(chunk[:-2]))
            while (yield from super().read_line(MAX_CHUNK_LINE, RuntimeError)) not in (b"\r\n", b"\n"):
                pass
            head.body = b"".join(parts)
        elif head.length:
            if head.length > head.max_body:
                head.error = ErrorCode.PAYLOAD_TOO_LARGE
                return
            head.body = bytes((yield from super().read_exact(head.length)))


class RelayConnection(ServerConnection):
    """A connection that can read REST bodies and write frames without awaiting."""

    max_body = 262144
    max_outbound = MAX_OUTBOUND_BUFFER

    def __init__(self, protocol: Any, server: Server, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        protocol.reader = BodyReader(self.max_body)
        protocol.parser = protocol.parse()
        next(protocol.parser)

    def push(self, data: str) -> bool:
        """Queue one text frame; False when closed or when the peer stopped reading.

        A peer whose unread backlog passes ``max_outbound`` is cut off, so a
        client that never reads cannot grow the server's memory.
        """
        if self.protocol.state is not State.OPEN:
            return False
        if self.transport.get_write_buffer_size() > self.max_outbound:
            log.debug("closing a connection whose peer stopped reading")
            self.transport.abort()
            return False
        self.protocol.send_text(data.encode())
        self.send_data()
        return True

    def congested(self) -> Any:
        """While the transport is paused above ``write_limit``, the awaitable that resumes."""
        return self.drain() if self.paused else None

    def close_soon(self, code: int, reason: str) -> None:
        self.loop.create_task(self.close(code, reason))


def _fold_headers(headers: Headers) -> dict[str, str]:
    """Lower-cased names, repeated fields joined with ", " so no lookup can be ambiguous."""
    folded: dict[str, str] = {}
    for name, value in headers.raw_items():
        key = name.lower()
        folded[key] = f"{folded[key]}, {value}" if key in folded else value
    return folded


def _is_upgrade(request: Request) -> bool:
    return any(v.strip().lower() == "websocket" for v in request.headers.get_all("Upgrade"))


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """The Date header, formatted once a second rather than once a request."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def _to_response(resp: HttpResponse, head: bool) -> Response:
    headers = Headers([("Date", _http_date()), ("Connection", "close")])
    if resp.content_type:
        headers["Content-Type"] = resp.content_type
    headers["Content-Length"] = str(len(resp.body))
    for name, value in resp.headers:
        headers[name] = value
    status = HTTPStatus(resp.status)
    return Response(status.value, status.phrase, headers, b"" if head else resp.body)


class RelayServer:
    """Owns the loop-side objects and the lifecycle of one relay."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.store: Store = store if store is not None else MemoryStore()
        self.metrics = RelayMetrics()
        self.presence = LocalPresence()
        self.authenticator = Authenticator(config, self.store, self.metrics)
        self.authenticator.on_locked = self._evict_unverified
        self.router = Router(config, self.presence, self.store, self.metrics, self.authenticator)
        self.api = HttpApi(config, self.presence, self.store, self.metrics,
                           connections=self.session_count, accepting=self.accepting, guard=self.authenticator)
        self._connection_class: type[RelayConnection] = type("RelayConnection", (RelayConnection,), {})
        self._per_ip: dict[str, int] = {}
        self._arrivals: dict[str, TokenBucket] = {}
        self._ids = itertools.count(1)
        self._sessions: dict[Session, RelayConnection] = {}
        self._unauthenticated: dict[Session, float] = {}
        self.server: Server | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._tick_callbacks: list[Callable[[float], None]] = []
        self.max_tick = 1.0
        self._stopping = asyncio.Event()
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.origins = OriginPolicy(config.server.allowed_origins)
        self.ip_resolver = ClientIpResolver(config.server.trusted_proxies)
        self.router.configure(config)
        self.api.configure(config)
        self.authenticator.configure(config)
        if self.server is not None and not config.server.public_url and config.server.port == 0:
            self.authenticator.relay = config.replace("server", port=self.port).effective_public_url
        self._connection_class.max_body = config.limits.max_body_bytes
        self._connection_class.max_outbound = config.limits.max_outbound_bytes

    # Introspection used by REST and metrics

    def connections(self) -> dict[Session, RelayConnection]:
        return self._sessions

    def on_tick(self, callback: Callable[[float], None]) -> None:
        """Run ``callback(loop_time)`` on every housekeeping tick (watchdog, status)."""
        self._tick_callbacks.append(callback)

    def session_count(self) -> int:
        return sum(1 for s in self._sessions if s.address is not None)

    def accepting(self) -> bool:
        return self.server is not None and self.server.is_serving() and not self._stopping.is_set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    # Lifecycle

    async def start(self, *, sock: Any = None, ssl_context: ssl.SSLContext | None = None) -> None:
        if hasattr(self.store, "commit_observer"):
            self.store.commit_observer = self.metrics.commit_latency.observe
        await self.store.open()
        log.info("signature verification: %s", signatures.select_backend(self.config.auth.crypto))
        if self.config.auth.mode != "open":
            secp256k1.precompute()
        cfg = self.config.server
        self.metrics.bind(connections=lambda: len(self._sessions), sessions=self.session_count,
                          online=self.presence.online_count, queue_depth=self.store.total,
                          storage_healthy=lambda: 1 if self.store.healthy else 0)
        ping_interval = cfg.ping_interval_s or None
        kwargs: dict[str, Any] = {"sock": sock} if sock is not None else {"host": cfg.host, "port": cfg.port}
        self.server = await serve(
            self._handle_ws,
            process_request=self._process_request,
            create_connection=self._connection_class,
            compression=None,
            ping_interval=ping_interval,
            ping_timeout=cfg.ping_timeout_s if ping_interval else None,
            close_timeout=min(CLOSE_TIMEOUT, cfg.ping_timeout_s),
            max_size=self.config.limits.max_message_bytes * JSON_ESCAPE_FACTOR + FRAME_OVERHEAD,
            max_queue=16,
            write_limit=WRITE_LIMIT,
            ssl=ssl_context,
            **kwargs,
        )
        if not cfg.public_url and cfg.port == 0:
            self.authenticator.relay = self.config.replace("server", port=self.port).effective_public_url
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping())
        log.info("relayd listening on %s (storage: %s)",
                 ", ".join(str(s.getsockname()[:2]) for s in self.server.sockets), self.store.name)

    async def stop(self) -> None:
        """Stop accepting, close sessions with 1001, finish storage writes."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("shutting down")
        if self.server is not None:
            self.server.close(close_connections=True)
            try:
                await asyncio.wait_for(asyncio.shield(self.server.wait_closed()),
                                       self.config.server.shutdown_timeout_s)
            except asyncio.TimeoutError:
                log.warning("%d connections did not close within %.1f s; dropping them",
                            len(self._sessions), self.config.server.shutdown_timeout_s)
                for conn in list(self._sessions.values()):
                    conn.transport.abort()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.server.wait_closed(), 1.0)
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.router.settle(), self.config.server.shutdown_timeout_s)
        self.authenticator.close()
        await self.store.close()
        log.info("stopped")

    # REST and handshake

    async def _process_request(self, conn: RelayConnection, request: Request) -> Response | None:
        peer = conn.remote_address[0] if conn.remote_address else "unknown"
        headers = _fold_headers(request.headers)
        client_ip = self.ip_resolver.resolve(peer, headers.get("x-forwarded-for"))
        head = conn.protocol.reader.release()
        if head.error is not None:
            return _to_response(error_response(RelayError(head.error)), request.method == "HEAD")
        if request.method == "GET" and _is_upgrade(request):
            origin = headers.get("origin")
            if not self.origins.allows(origin):
                return _to_response(error_response(RelayError(ErrorCode.ORIGIN_NOT_ALLOWED,
                                                              f"Origin not allowed: {origin}")), False)
            refusal = self._admit_connection(client_ip)
            if refusal is not None:
                return _to_response(error_response(refusal), False)
            conn.client_ip = client_ip  # type: ignore[attr-defined]
            return None
        req = HttpRequest.from_target(request.method, request.path, headers, head.body, client_ip)
        return _to_response(await self.api.handle(req), request.method == "HEAD")

    def _evict_unverified(self, address: str) -> None:
        """Once an address proves ownership, sessions that merely claimed it must go."""
        refusal = RelayError(ErrorCode.AUTH_REQUIRED, "This address has proven ownership: sign in with a signature")
        for session in self.presence.sessions(address):
            if not session.verified:
                session.send(refusal.frame())
                session.close(4403, refusal.code.value)
                self.router.closed(session)

    def _admit_connection(self, ip: str) -> RelayError | None:
        """Per-IP caps on concurrent and new connections, checked before the upgrade."""
        limits = self.config.limits
        key = limit_key(ip)
        if limits.max_connections_per_ip and self._per_ip.get(key, 0) >= limits.max_connections_per_ip:
            self.metrics.rate_limited.labels(limit="connections").inc()
            log.debug("connection cap reached for %s", ip)
            return RelayError(ErrorCode.RATE_LIMITED, "Too many open connections from this address",
                              headers=(("Retry-After", "5"),))
        if limits.connections_per_ip_per_s:
            now = time.monotonic()
            bucket = self._arrivals.get(key)
            if bucket is None:
                rate = limits.connections_per_ip_per_s
                bucket = self._arrivals[key] = TokenBucket(rate, rate * 2, now)
            if not bucket.take(now):
                self.metrics.rate_limited.labels(limit="connection_rate").inc()
                log.debug("connection rate limit hit by %s", ip)
                return RelayError(ErrorCode.RATE_LIMITED, "Too many new connections from this address",
                                  headers=(("Retry-After", "1"),))
        return None

    # WebSocket sessions

    async def _handle_ws(self, conn: RelayConnection) -> None:
        session = Session(next(self._ids), getattr(conn, "client_ip", "unknown"), time.monotonic(),
                          conn.push, conn.close_soon, conn.congested)
        self._sessions[session] = conn
        self._unauthenticated[session] = session.opened_at + self.config.server.auth_timeout_s
        key = limit_key(session.ip)
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        challenge = self.authenticator.challenge_for(session)
        if challenge is not None:
            session.send(challenge)
        waiting_auth = True
        try:
            async for message in conn:
                await self.router.handle(session, message)
                if waiting_auth and session.address is not None:
                    waiting_auth = False
                    self._unauthenticated.pop(session, None)
        except ConnectionClosed:
            pass
        finally:
            self._unauthenticated.pop(session, None)
            del self._sessions[session]
            left = self._per_ip[key] - 1
            if left:
                self._per_ip[key] = left
            else:
                del self._per_ip[key]
            self.router.closed(session)

    # One shared timer for every periodic job

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        next_expiry = 0.0
        next_sweep = 0.0
        next_stats = 0.0
        while True:
            tick = max(0.02, min(self.max_tick, self.config.server.auth_timeout_s / 4))
            planned = loop.time() + tick
            await asyncio.sleep(tick)
            now = loop.time()
            self.metrics.loop_lag.observe(max(0.0, now - planned))
            self._expire_unauthenticated(time.monotonic())
            for callback in self._tick_callbacks:
                callback(now)
            if now >= next_sweep:
                self._sweep_limits()
                next_sweep = now + min(60.0, self.api.limiter.window_s)
            if now >= next_expiry:
                next_expiry = now + self.config.queue.expiry_interval_s
                await self._expire_messages()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                await self._refresh_queue_stats()

    def _sweep_limits(self) -> None:
        now = time.monotonic()
        self.api.limiter.sweep(now)
        self.authenticator.sweep()
        full = [k for k, b in self._arrivals.items() if now - b.stamp > 2 * b.burst / max(b.rate, 1e-9)]
        for key in full:
            del self._arrivals[key]

    def _expire_unauthenticated(self, now: float) -> None:
        """Deadlines are in insertion order, so stop at the first one still running."""
        pending = self._unauthenticated
        while pending:
            session, deadline = next(iter(pending.items()))
            if session.address is not None:
                del pending[session]
                continue
            if deadline > now:
                break
            del pending[session]
            session.send(RelayError(ErrorCode.AUTH_TIMEOUT).frame())
            session.close(1008, "authentication timeout")

    async def _refresh_queue_stats(self) -> None:
        """Byte and recipient totals take a table scan, so metrics read a recent copy."""
        try:
            stats = await self.store.stats()
        except Exception as exc:
            log.debug("queue statistics unavailable: %s", exc)
            return
        self.metrics.queue_bytes.set(stats["bytes"])
        self.metrics.queue_recipients.set(stats["recipients"])

    async def _expire_messages(self) -> None:
        cutoff = int(time.time() * 1000 - self.config.queue.message_retention_hours * 3_600_000)
        try:
            removed = await self.store.expire(cutoff)
        except Exception as exc:
            log.error("retention expiry failed: %s", exc)
            return
        if removed:
            self.metrics.expired.inc(removed)
            log.info("expired %d queued messages past retention", removed)

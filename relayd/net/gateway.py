"""The one port: each websockets connection becomes a REST request for ``HttpApi`` or a session for ``Router``.

This module only moves bytes and events. ``process_request`` answers REST
requests (returning None only for admitted WebSocket upgrades); the handler
feeds a session's frames to the router, through the connection's frame
limiter, and reports its close.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from functools import partial
from typing import Any

from websockets.asyncio.server import Server, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..housekeeping import Housekeeping
from ..ratelimit import FrameLimiter, Verdict
from ..router import Router
from ..session import Session
from .admission import Admission
from .clientip import ClientIpResolver
from .connection import ConnectionLimits, RelayConnection, is_upgrade, to_response
from .http import HttpRequest, error_response, header_value
from .http_api import HttpApi
from .origins import OriginPolicy

log = logging.getLogger("relayd.server")

CLOSE_TIMEOUT = 5.0
FRAME_OVERHEAD = 4096
JSON_ESCAPE_FACTOR = 6  # a character may take six bytes as a JSON \uXXXX escape
WRITE_LIMIT = 64 * 1024
MAX_QUEUE = 16


class Gateway:
    """Serves WebSocket sessions and REST on one listening socket."""

    def __init__(self, config: Config, api: HttpApi, router: Router, admission: Admission,
                 housekeeping: Housekeeping, clock: Clock) -> None:
        self.api = api
        self.router = router
        self.admission = admission
        self.housekeeping = housekeeping
        self.clock = clock
        self.connections: dict[Session, RelayConnection] = {}
        self.server: Server | None = None
        self._ids = itertools.count(1)
        self._limits = ConnectionLimits(config.limits.max_body_bytes, config.limits.max_outbound_bytes)
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.origins = OriginPolicy(config.server.allowed_origins)
        self.ip_resolver = ClientIpResolver(config.server.trusted_proxies)
        self._limits.max_body = config.limits.max_body_bytes
        self._limits.max_outbound = config.limits.max_outbound_bytes

    async def start(self, *, sock: Any = None, ssl_context: ssl.SSLContext | None = None) -> Server:
        """Listen on ``sock`` or on ``[server] host:port``; returns the websockets server."""
        cfg = self.config.server
        ping_interval = cfg.ping_interval_s or None
        where: dict[str, Any] = {"sock": sock} if sock is not None else {"host": cfg.host, "port": cfg.port}
        self.server = await serve(
            self._handle_session,
            process_request=self._process_request,
            create_connection=partial(RelayConnection, limits=self._limits),
            compression=None,
            ping_interval=ping_interval,
            ping_timeout=cfg.ping_timeout_s if ping_interval else None,
            close_timeout=min(CLOSE_TIMEOUT, cfg.ping_timeout_s),
            max_size=self.config.limits.max_message_bytes * JSON_ESCAPE_FACTOR + FRAME_OVERHEAD,
            max_queue=MAX_QUEUE,
            write_limit=WRITE_LIMIT,
            ssl=ssl_context,
            **where,
        )
        return self.server

    def session_count(self) -> int:
        return sum(1 for s in self.connections if s.address is not None)

    async def _process_request(self, conn: RelayConnection, request: Request) -> Response | None:
        peer = conn.remote_address[0] if conn.remote_address else "unknown"
        client_ip = self.ip_resolver.resolve(peer, header_value(request.headers, "x-forwarded-for"))
        head = conn.protocol.reader.release()
        if head.error is not None:
            return to_response(error_response(RelayError(head.error)), request.method == "HEAD")
        if request.method == "GET" and is_upgrade(request):
            origin = header_value(request.headers, "origin")
            if not self.origins.allows(origin):
                return to_response(error_response(RelayError(ErrorCode.ORIGIN_NOT_ALLOWED,
                                                             f"Origin not allowed: {origin}")), False)
            refusal = self.admission.admit(client_ip)
            if refusal is not None:
                return to_response(error_response(refusal), False)
            conn.client_ip = client_ip
            return None
        req = HttpRequest.from_target(request.method, request.path, request.headers, head.body, client_ip)
        return to_response(await self.api.handle(req), request.method == "HEAD")

    async def _handle_session(self, conn: RelayConnection) -> None:
        session = Session(next(self._ids), conn.client_ip, self.clock.monotonic(), conn)
        limits = self.config.limits
        limiter = FrameLimiter(limits.frames_per_s, limits.frame_burst, limits.rate_limited_close_after,
                               session.opened_at)
        self.connections[session] = conn
        self.admission.opened(session.ip)
        self.housekeeping.awaiting_auth(session)
        self.router.opened(session)
        try:
            async for message in conn:
                verdict = limiter.admit(self.clock.monotonic())
                if verdict is Verdict.ALLOW:
                    await self.router.received(session, message)
                else:
                    self.router.throttled(session, verdict)
        except ConnectionClosed:
            pass
        finally:
            self.housekeeping.forget(session)
            del self.connections[session]
            self.admission.closed(session.ip)
            self.router.closed(session)

"""The one port: each connection is admitted, then serves REST requests or becomes a session.

This module only moves bytes and events. It is the context every
``RelayConnection`` reports to (accept, head, budget, release), it answers
REST requests in ``respond``, the websockets server's ``process_request``
hook, through its ``RequestHandler`` (returning None only for admitted
WebSocket upgrades; a plain closing request's ``PlainRequest`` calls the same
hook before any of websockets' machinery exists), and it hands a session's frames
and its close to its ``SessionHandler``. The composition root
(``relayd.server``) passes the REST API and the router as these two: the
transport imports neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Awaitable
from functools import partial
from typing import Any, Protocol

from websockets.asyncio.server import Server, serve
from websockets.exceptions import ConnectionClosed
from websockets.server import ServerProtocol

from ..access import denied
from ..clock import Clock
from ..config import Config
from ..errors import CloseCode, ErrorCode, RelayError
from ..protocol.session import Session
from ..ratelimit import FrameLimiter, Verdict
from .admission import Admission
from .clientip import ClientIpResolver
from .connection import RelayConnection
from .http_connection import Accepted, ConnectionLimits, HttpConnection
from .http_framing import ParsedRequest
from .http_values import HttpRequest, HttpResponse, error_response, header_value
from .listen import plan
from .origins import OriginPolicy
from .plain_request import PlainRequest
from .turns import Turns

log = logging.getLogger("relayd.server")

CLOSE_TIMEOUT = 5.0
LISTEN_BACKLOG = 4096
"""Connections the kernel completes before relayd accepts them (capped by net.core.somaxconn). asyncio listens
with 100, which drops the SYNs of a reconnect storm (each dropped client waits a second or more to retry);
asyncio's own batches of up to 100 accepts per loop turn, which the descriptor reserve covers, stay as they are."""
WRITE_LIMIT = 64 * 1024
MAX_QUEUE = 16


class RequestHandler(Protocol):
    """Answers REST requests (``relayd.api.rest.HttpApi``)."""

    async def handle(self, req: HttpRequest) -> HttpResponse:
        """The answer to ``req``; never raises (refusals are answers too)."""
        ...


class SessionHandler(Protocol):
    """What happens to sessions (``relayd.protocol.router.Router``): opened, frames, refusals, close."""

    def opened(self, session: Session) -> None: ...

    def receive(self, session: Session, raw: str | bytes) -> Awaitable[None] | None:
        """Apply a whole message; an awaitable when it is not applied in full yet (later ones wait for it)."""
        ...

    def throttled(self, session: Session, verdict: Verdict) -> None: ...

    def undelivered(self, session: Session, parcels: list[object]) -> None: ...

    def auth_timed_out(self, session: Session) -> None: ...

    def closed(self, session: Session) -> None: ...


class RoutedSession:
    """A connection's ``SessionEvents``, handed to the session handler with the session they are about."""

    __slots__ = ("handler", "session")

    def __init__(self, handler: SessionHandler, session: Session) -> None:
        self.handler = handler
        self.session = session

    def receive(self, message: str | bytes) -> Awaitable[None] | None:
        return self.handler.receive(self.session, message)

    def throttled(self, verdict: Verdict) -> None:
        self.handler.throttled(self.session, verdict)

    def undelivered(self, parcels: list[object]) -> None:
        self.handler.undelivered(self.session, parcels)


LIVENESS_SLICE = 1000
"""Sessions checked per loop iteration in a liveness pass (about a microsecond each when idle)."""


class Gateway:
    """Serves WebSocket sessions and REST on one listening socket."""

    def __init__(self, config: Config, requests: RequestHandler, sessions: SessionHandler, admission: Admission,
                 clock: Clock) -> None:
        self.requests = requests
        self.session_handler = sessions
        self.admission = admission
        self.clock = clock
        self.sessions: dict[Session, RelayConnection] = {}
        self.server: Server | None = None
        self._ids = itertools.count(1)
        self.connection_limits = ConnectionLimits(0, 0, 0, 0.0, 0.0, 0, 0.0, 0)
        self.answers: set[asyncio.Task[None]] = set()
        """Plain requests being answered (``PlainRequest``)."""
        self.turns = Turns()
        self._liveness: asyncio.Handle | None = None
        """The next slice of a liveness pass under way (``tick``)."""
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.origins = OriginPolicy(config.server.allowed_origins)
        self.ip_resolver = ClientIpResolver(config.server.trusted_proxies)
        limits, server, cl = config.limits, config.server, self.connection_limits
        cl.max_body, cl.max_outbound, cl.max_inbound = (limits.max_body_bytes, limits.max_outbound_bytes,
                                                        limits.max_inbound_bytes)
        cl.head_timeout, cl.idle_timeout = server.head_timeout_s, server.http_idle_timeout_s
        cl.max_requests = server.max_requests_per_connection
        cl.stall_timeout, cl.refused_close_after = server.stall_timeout_s, limits.rate_limited_close_after
        cl.close_timeout = min(CLOSE_TIMEOUT, server.ping_timeout_s)
        self.close_denied()

    def close_denied(self) -> None:
        """Close the sessions a (re)loaded deny list names, by client IP or signed-in address."""
        deny = self.admission.deny
        if not deny:
            return
        for session, conn in list(self.sessions.items()):
            kind = ("ip" if deny.denies_ip(conn.client_ip)
                    else "address" if session.address is not None and deny.denies_address(session.address)
                    else None)
            if kind is not None and not session.closed:
                self.admission.metrics.access_denied.labels(kind=kind).inc()
                refusal = denied("IP address" if kind == "ip" else "address")
                session.send(refusal.frame())
                session.close(CloseCode.ACCESS_DENIED, refusal.code.value)

    async def start(self, *, sock: socket.socket | None = None, ssl_context: ssl.SSLContext | None = None) -> Server:
        """Listen on ``sock`` or on ``[server] host:port``; returns the websockets server."""
        cfg = self.config.server
        where: dict[str, Any] = {"sock": sock}
        if sock is None:
            chosen = plan(cfg.host, cfg.port)
            where = ({"sock": chosen.sock} if chosen.sock is not None
                     else {"host": list(chosen.hosts), "port": chosen.port})
        # websockets types these for its own ServerConnection class; it only calls create_connection to make the
        # connections it then hands to the other two, so they get RelayConnections.
        self.server = await serve(
            self._handle_session,  # type: ignore[arg-type]
            process_request=self.respond,  # type: ignore[arg-type]  # relayd's handshake calls it with its own types
            create_connection=self._accept,  # type: ignore[arg-type]
            compression=None,
            open_timeout=None,  # RelayConnection times the head and idle keep-alive itself
            ping_interval=None,  # one shared timer pings quiet peers: see check_liveness
            ping_timeout=None,
            close_timeout=self.connection_limits.close_timeout,
            max_size=self.config.max_frame_bytes,
            max_queue=MAX_QUEUE,
            write_limit=WRITE_LIMIT,
            ssl=ssl_context,
            **where,
        )
        for listening in self.server.sockets:
            with listening.dup() as sock:  # the same socket: a longer kernel queue, same accept batches
                sock.listen(LISTEN_BACKLOG)
        return self.server

    def session_count(self) -> int:
        return sum(1 for s in self.sessions if s.address is not None)

    def tick(self, now: float) -> None:
        """Per-session timers (housekeeping calls it about once a second): auth deadlines, pings, stalls, in
        slices of ``LIVENESS_SLICE`` sessions, one slice per loop iteration, so a pass over many thousands does
        not stop the loop for all of them at once. A pass still under way when the next tick comes goes on;
        that tick starts none."""
        if self._liveness is not None:
            return
        # Two flat lists, not list(items()): a pair per session, alive through the pass, is promoted by the
        # collector and soon triggers its full pass over every object (3,000 sessions, 300 passes: one full
        # collection of 121 ms with items(), none this way).
        sessions = self.sessions
        self._check_liveness(list(sessions), list(sessions.values()), 0, now)

    def _check_liveness(self, sessions: list[Session], conns: list[RelayConnection], start: int,
                        now: float) -> None:
        server = self.config.server
        auth_deadline = self.clock.monotonic() - server.auth_timeout_s
        end = min(start + LIVENESS_SLICE, len(sessions))
        for i in range(start, end):
            session = sessions[i]
            if session.address is None and not session.closed and session.opened_at <= auth_deadline:
                self.session_handler.auth_timed_out(session)
                continue
            conns[i].check_liveness(now, server.ping_interval_s, server.ping_timeout_s, server.stall_timeout_s)
        self._liveness = (asyncio.get_running_loop().call_soon(self._check_liveness, sessions, conns, end, now)
                          if end < len(sessions) else None)

    def stop_liveness(self) -> None:
        """End a liveness pass under way (at shutdown)."""
        if self._liveness is not None:
            self._liveness.cancel()
            self._liveness = None

    # The connection context

    def _accept(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> PlainRequest:
        """Every accepted connection starts as a ``PlainRequest``, which makes the full connection only when
        the first request needs it (websockets' ``serve`` calls this with what it would give a connection)."""
        return PlainRequest(self, partial(RelayConnection, protocol, server, context=self, **kwargs))

    def accepted(self, conn: Accepted) -> RelayError | None:
        conn.trusted_peer = self.ip_resolver.is_trusted(conn.peer_ip)
        refusal = self.admission.accept(conn.peer_ip, conn.trusted_peer)
        if refusal is None:
            self.admission.track(conn.client_ip, conn)
        return refusal

    def may_linger(self, conn: Accepted) -> bool:
        return self.admission.start_lingering()

    def lingered(self, conn: Accepted) -> None:
        self.admission.stop_lingering()

    def head_done(self, conn: Accepted) -> None:
        self.admission.head_done(conn.peer_ip)

    def charge(self, conn: Accepted, delta: int) -> None:
        self.admission.charge(conn.client_ip, delta)

    def released(self, conn: Accepted) -> None:
        self.admission.untrack(conn.client_ip, conn)
        self.admission.closed(conn.peer_ip, conn.in_head)

    def handed_over(self, front: Accepted, conn: HttpConnection) -> None:
        self.admission.untrack(front.client_ip, front)
        self.admission.track(conn.client_ip, conn)

    def answering(self, task: asyncio.Task[None]) -> None:
        self.answers.add(task)
        task.add_done_callback(self.answers.discard)

    async def answered(self) -> None:
        """Until every plain request being answered is (the server's handlers cover the others)."""
        while self.answers:
            await asyncio.wait(list(self.answers))

    # REST and the handshake

    async def respond(self, conn: Accepted, parsed: ParsedRequest) -> HttpResponse | None:
        request = parsed.request
        client_ip = self.ip_resolver.resolve(conn.peer_ip, header_value(request.headers, "x-forwarded-for"))
        if client_ip != conn.client_ip:
            self.admission.untrack(conn.client_ip, conn)
            conn.client_ip = client_ip
            self.admission.track(client_ip, conn)
        refusal = self.admission.refuses(client_ip)
        if refusal is not None:
            return error_response(refusal)
        if parsed.upgrade:
            origin = header_value(request.headers, "origin")
            if not self.origins.allows(origin):
                return error_response(RelayError(ErrorCode.ORIGIN_NOT_ALLOWED, f"Origin not allowed: {origin}"))
            refusal = self.admission.admit_upgrade(client_ip)
            if refusal is not None:
                return error_response(refusal)
            return None
        req = HttpRequest.from_target(request.method, request.path, request.headers, parsed.body, client_ip)
        async with self.turns.turn(client_ip):
            return await self.requests.handle(req)

    async def _handle_session(self, conn: RelayConnection) -> None:
        session = Session(next(self._ids), conn.client_ip, self.clock.monotonic(), conn)
        limits = self.config.limits
        conn.limiter = FrameLimiter(limits.frames_per_s, limits.frame_burst, limits.rate_limited_close_after,
                                    self.clock.monotonic())
        conn.events = RoutedSession(self.session_handler, session)
        self.sessions[session] = conn
        self.session_handler.opened(session)
        conn.direct = True
        try:
            # Messages arriving with nothing ahead of them were applied by the connection as they came in;
            # the others queue here, behind whatever is still being applied. An idle session waits on
            # ``conn.idle()``'s one future, not in recv() (websockets' chain of coroutines and a future, 0.9 KiB),
            # nor in ``async for`` (an async generator too).
            while True:
                idle = conn.idle()
                if idle is not None:
                    await idle
                    continue
                message = await conn.recv()
                conn.handling = True
                await conn.wait_applied()
                verdict = conn.consumed()
                if verdict is Verdict.ALLOW:
                    pending = self.session_handler.receive(session, message)
                    if pending is not None:
                        await pending
                else:
                    self.session_handler.throttled(session, verdict)
                conn.handling = False
        except ConnectionClosed:
            pass
        finally:
            conn.direct = False
            with contextlib.suppress(Exception):
                await conn.wait_applied()
            del self.sessions[session]
            self.admission.socket_closed(conn.client_ip)
            self.session_handler.closed(session)

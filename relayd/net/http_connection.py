"""The HTTP side of a connection on the shared port: REST requests (kept alive, pipelined), then maybe an upgrade.

``HttpConnection`` specialises websockets' ``ServerConnection`` at its
seams: it replaces the protocol's handshake parser by ``http_framing``'s
strict one (bodies, keep-alive, pipelining) and runs the handshake loop that
answers REST requests through the server's ``process_request`` hook (the
gateway's ``respond``) until one upgrades. Every
connection is counted from accept by its ``ConnectionContext`` (the
gateway); a refused one gets its answer (429/503) once its first request head
arrives, or is closed. ``RelayConnection`` adds the WebSocket side. The
websockets internals used here are listed in ``relayd.net``'s docstring.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WsProtocol, State
from websockets.server import ServerProtocol

from ..clock import Clock
from ..errors import RelayError
from .frame_parser import FrameParser
from .http_framing import BadRequest, ParsedRequest, read_request
from .http_values import HttpResponse, error_response
from .transports import release

log = logging.getLogger("relayd.server")
_WEBSOCKETS_LOG = logging.getLogger("websockets.server")
_UNNAMED = uuid.UUID(int=0)
"""Every connection's websockets id (see ``HttpConnection.__init__``)."""


@dataclass(slots=True)
class ConnectionLimits:
    """Per-connection limits, shared by every connection so that a reload reaches open ones too."""

    max_body: int
    max_outbound: int
    max_inbound: int
    head_timeout: float
    idle_timeout: float
    max_requests: int
    stall_timeout: float
    """A kept-alive REST connection whose peer takes none of its answers for this long is cut."""
    refused_close_after: int
    """Answers refused with 429 in a row after which the connection is closed."""
    close_timeout: float = 5.0
    """How long a closing connection waits for its peer to take the last answer (or to close too)."""


class Accepted(Protocol):
    """A connection as its context counts it from accept: an ``HttpConnection``, or the ``PlainRequest`` that
    accepted it before any handover."""

    peer_ip: str
    client_ip: str
    trusted_peer: bool
    in_head: bool
    held: int

    def cut(self, reason: str) -> None: ...


class ConnectionContext(Protocol):
    """What a connection reports to from accept to release (the gateway): admission, budgets, limits."""

    connection_limits: ConnectionLimits
    clock: Clock

    def accepted(self, conn: Accepted) -> RelayError | None:
        """A TCP connection was accepted; the refusal to answer when it must not stay."""
        ...

    def may_linger(self, conn: Accepted) -> bool:
        """May a refused connection stay to be answered (it holds a descriptor meanwhile)?"""
        ...

    def lingered(self, conn: Accepted) -> None:
        """A refused connection got its answer."""
        ...

    def head_done(self, conn: Accepted) -> None:
        """The connection's first request head arrived."""
        ...

    def charge(self, conn: Accepted, delta: int) -> None:
        """The connection buffers ``delta`` more bytes (or fewer, when negative)."""
        ...

    def released(self, conn: Accepted) -> None:
        """A counted connection is gone."""
        ...

    def respond(self, conn: Accepted, parsed: ParsedRequest) -> Awaitable[HttpResponse | None]:
        """The answer to a request on ``conn``; None when it is a WebSocket upgrade that may proceed. The same
        function is the websockets server's ``process_request`` hook, which ``handshake`` is given."""
        ...

    def handed_over(self, front: Accepted, conn: HttpConnection) -> None:
        """``conn`` took over the connection ``front`` accepted (and counted, unless it was refused)."""
        ...

    def answering(self, task: asyncio.Task[None]) -> None:
        """A plain request is being answered by ``task`` (shutdown waits for it)."""
        ...


class Adoptable(Accepted, Protocol):
    """What ``HttpConnection.adopt`` takes over (``relayd.net.plain_request.PlainRequest``)."""

    transport: asyncio.Transport
    counted: bool
    head_deadline: float


class HttpConnection(ServerConnection):
    """See the module docstring."""

    # Slots keep relayd's fields out of the instance dict, which then holds few enough keys (websockets' own)
    # to stay a small shared-key dict: about 1 KiB less per idle connection.
    __slots__ = ("context", "limits", "peer_ip", "client_ip", "trusted_peer", "counted", "refusal", "in_head",
                 "held", "head_deadline", "_requests", "_want_next")

    protocol: ServerProtocol

    def __init__(self, protocol: ServerProtocol, server: Server, *, context: ConnectionContext,
                 **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        # websockets wraps its logger per connection, in an adapter that names the connection through a weak
        # proxy (about a third of a KiB per connection); relayd's log format does not show it.
        protocol.logger = self.logger = _WEBSOCKETS_LOG
        # It also names each connection with a fresh UUID for those logs (about 110 bytes kept per connection);
        # relayd names sessions by their own number.
        protocol.id = self.id = _UNNAMED
        self.context = context
        self.limits: ConnectionLimits = context.connection_limits
        self.peer_ip = "unknown"
        self.client_ip = "unknown"
        self.trusted_peer = False
        self.counted = False
        self.refusal: RelayError | None = None
        self.in_head = True
        self.held = 0
        """Bytes this connection buffers, as last charged to its client's budget (the WebSocket side counts)."""
        self.head_deadline: float | None = None
        """When the first request head is due (loop time): set only on a connection adopted from its acceptor."""
        self._requests: list[ParsedRequest | BadRequest] = []
        self._want_next = False
        protocol.parser = self._parse_requests()
        next(protocol.parser)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.head_deadline is not None:  # adopted: admitted already
            return
        peer = transport.get_extra_info("peername")
        self.peer_ip = self.client_ip = peer[0] if peer else "unknown"
        self._admit(self.context.accepted(self))

    def _admit(self, refusal: RelayError | None) -> None:
        if refusal is None:
            self.counted = True
        elif self.context.may_linger(self):
            self.refusal = refusal  # answered at once by handshake(), then closed the lingering way
        else:
            self.transport.abort()

    def adopt(self, front: Adoptable, first: ParsedRequest | None, data: bytes, refusal: RelayError | None) -> None:
        """Take over the connection ``front`` accepted: its admission (or refusal), what is left of its head
        deadline, its first request when it framed one, and the bytes it read past it (or all it read)."""
        self.peer_ip, self.client_ip, self.trusted_peer = front.peer_ip, front.client_ip, front.trusted_peer
        self.in_head, self.head_deadline = front.in_head, front.head_deadline
        transport = front.transport
        transport.set_protocol(self)
        self.connection_made(transport)
        if front.counted:
            self.counted = True
            self.context.handed_over(front, self)
        else:
            self._admit(refusal)
        if first is not None:
            self.protocol.parser = self._parse_requests(first)
            next(self.protocol.parser)
            self._advance_parser()
        if data and not transport.is_closing():
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        release(self.transport)
        rcvd = self.request_rcvd
        if rcvd is not None and not rcvd.done():  # the handshake loop waits on this one future only
            rcvd.set_result(None)
        if self.counted:
            self.context.released(self)

    def frame_received(self, frame: Frame) -> None:
        """A WebSocket frame after the upgrade; the WebSocket side applies it."""

    def resume_writing(self) -> None:
        super().resume_writing()
        self._recharge()

    def _recharge(self) -> None:
        """Report the bytes this connection buffers to its client's budget."""
        held = self._buffered()
        if held != self.held:
            delta, self.held = held - self.held, held
            self.context.charge(self, delta)

    def _buffered(self) -> int:
        """Unread request bytes and answers the peer has not taken yet."""
        return len(self.protocol.reader.buffer) + self.transport.get_write_buffer_size()

    def cut(self, reason: str) -> None:
        """End the connection at once (no closing handshake): it broke a limit it cannot recover from."""
        if self.transport.is_closing():
            return
        log.debug("cutting a connection from %s: %s", self.client_ip, reason)
        self.transport.abort()

    # Reading: HTTP requests, then frames

    def _parse_requests(self, first: ParsedRequest | None = None) -> Generator[None, None, None]:
        """The protocol's parser: requests one at a time (``first`` framed already), until ``_to_frames``."""
        protocol = self.protocol
        while True:
            try:
                parsed = (first if first is not None
                          else (yield from read_request(protocol.reader, self.limits.max_body, self._continue)))
                first = None
            except EOFError:
                protocol.send_eof()
                protocol.parser = protocol.discard()
                next(protocol.parser)
                yield
                return
            except BadRequest as exc:
                # Until the upgrade the protocol's events are relayd's (requests as framed here), not websockets'
                # Request. events_received() swaps the list: look it up at each append.
                protocol.events.append(exc)  # type: ignore[arg-type]
                while True:  # until the answer replaces this parser by discard()
                    yield
            protocol.events.append(parsed)  # type: ignore[arg-type]
            del parsed  # this frame lives as long as the connection: it keeps no handshake request
            # Until the request is answered: only an accepted upgrade switches to frames (``_to_frames``),
            # whatever it carried.
            while not self._want_next:
                if len(protocol.reader.buffer) > self.limits.max_body + 65536:
                    self.transport.pause_reading()
                yield
            self._want_next = False

    def _continue(self) -> None:
        """``Expect: 100-continue``: tell the client to send its body."""
        self.protocol.writes.append(b"HTTP/1.1 100 Continue\r\n\r\n")

    def process_event(self, event: object) -> None:
        if isinstance(event, Frame):
            self.frame_received(event)
        elif isinstance(event, (ParsedRequest, BadRequest)):
            self._requests.append(event)
            if not self.request_rcvd.done():
                self.request_rcvd.set_result(None)

    # The handshake: REST requests until one upgrades

    async def handshake(  # type: ignore[override]  # the hook takes relayd's framed request, answers its value
        self,
        process_request: Callable[[Accepted, ParsedRequest], Awaitable[HttpResponse | None]] | None = None,
        process_response: Callable[[ServerConnection, Request, Response], Awaitable[Response | None] | Response
                                   | None] | None = None,
        server_header: str | None = None,
    ) -> None:
        """Answer requests in order until one opens a WebSocket or the connection ends.

        Kept-alive requests are answered by writing the response and parsing
        the next request; the last answer is sent the websockets way (with
        EOF, waiting for the client to close). The first head must arrive
        within ``head_timeout``, later ones within ``idle_timeout``.
        """
        if self.refusal is not None:  # answer its first request (clients read no answer before sending)
            try:
                if await self._next_request(min(1.0, self.limits.head_timeout)) is not None:
                    await self._answer_last(to_response(error_response(self.refusal), False))
            finally:
                self.context.lingered(self)
            return
        served = refused = 0
        timeout = (self.limits.head_timeout if self.head_deadline is None
                   else max(0.0, self.head_deadline - self.loop.time()))
        while not self.transport.is_closing():
            item = await self._next_request(timeout)
            if item is None:
                return
            if self.in_head:
                self.in_head = False
                self.context.head_done(self)
            if isinstance(item, BadRequest):
                await self._answer_last(to_response(error_response(RelayError(item.code, str(item))), False))
                return
            self.request = item.request
            answer = await process_request(self, item) if process_request is not None else None
            if answer is None:
                await self._accept_websocket(server_header)
                return
            head = item.request.method == "HEAD"
            served += 1
            refused = refused + 1 if answer.status == http.HTTPStatus.TOO_MANY_REQUESTS else 0
            if not item.keep_alive and not self._requests and not self.protocol.reader.buffer:
                await self._answer_and_close(to_response(answer, head))
                return
            if (not item.keep_alive or served >= self.limits.max_requests or not self.server.is_serving()
                    or self.transport.is_closing() or refused >= self.limits.refused_close_after):
                await self._answer_last(to_response(answer, head))
                return
            self._answer_kept_alive(render(answer, head, close=False))
            del answer, item  # while its bytes wait for the peer, nothing else of the answer stays referenced
            if self.paused:
                if not await self._drained():
                    return
            elif self._requests:
                await asyncio.sleep(0)  # pipelined requests take turns with every other connection's
            timeout = self.limits.idle_timeout

    def _answer_kept_alive(self, data: bytes) -> None:
        """Write an answer that keeps the connection open, charge its bytes, and frame the next request."""
        self.transport.write(data)
        self.request = None
        self._want_next = True
        self.transport.resume_reading()
        self._advance_parser()
        self._recharge()

    async def _drained(self) -> bool:
        """Until the peer took the answers down to the write limit; False once it is gone or was cut for taking
        none of them for ``stall_timeout``."""
        while self.paused and not self.transport.is_closing():
            left = self.transport.get_write_buffer_size()
            try:
                async with asyncio.timeout(self.limits.stall_timeout):
                    await self.drain()
            except TimeoutError:
                if self.transport.get_write_buffer_size() >= left:
                    self.cut(f"its peer took none of its answers for {self.limits.stall_timeout:g} s")
            self._recharge()
        return not self.transport.is_closing()

    def _to_frames(self) -> None:
        """Hand the reader to the frame parser, in place of the request parser, for the connection's life:
        relayd's flat one (``frame_parser``), or websockets' own where an extension was negotiated."""
        protocol = self.protocol
        requests = protocol.parser
        protocol.parser = WsProtocol.parse(protocol) if protocol.extensions else FrameParser(protocol)
        requests.close()

    def _advance_parser(self) -> None:
        """Let the parser go on with what was received meanwhile, and take the events it makes."""
        next(self.protocol.parser)
        for event in self.protocol.events_received():
            self.process_event(event)

    async def _next_request(self, timeout: float) -> ParsedRequest | BadRequest | None:
        if not self._requests:
            if self.connection_lost_waiter.done():
                return None
            self.request_rcvd = self.loop.create_future()  # set by the next request, or by connection_lost
            try:
                async with asyncio.timeout(timeout):
                    await self.request_rcvd
            except TimeoutError:
                self.transport.abort() if self.in_head else self.transport.close()
                return None
        return self._requests.pop(0) if self._requests else None

    async def _answer_and_close(self, response: Response) -> None:
        """The answer to a request that asked to close (the app's key lookups), when nothing follows it: written,
        then the socket closes once the answer is flushed. A plain close, not websockets' way below (a half-close,
        then a wait for the client's FIN): that costs a shutdown(), a wake-up, a read and the EOF's callbacks more
        per request, and the client sent all it will. Bytes it sends anyway would turn the FIN into a reset."""
        self.protocol.send_response(response)  # the protocol's state moves on as websockets' way does
        for data in self.protocol.data_to_send():
            if data:  # the empty one is its EOF: close() below sends the FIN
                self.transport.write(data)
        self.transport.close()
        try:
            async with asyncio.timeout(self.close_timeout):
                await asyncio.shield(self.connection_lost_waiter)
        except TimeoutError:  # the client does not read the answer
            self.transport.abort()

    async def _answer_last(self, response: Response) -> None:
        """The connection's last answer: sent with EOF, then the client is given time to close."""
        if self.protocol.state is State.CONNECTING:
            async with self.send_context(expected_state=State.CONNECTING):
                self.protocol.send_response(response)

    async def _accept_websocket(self, server_header: str | None) -> None:
        assert self.request is not None
        protocol = self.protocol
        upgrade = (switching_protocols(protocol, self.request, server_header)
                   if self.state is State.CONNECTING and self.server.is_serving() and not protocol.debug else None)
        if upgrade is not None:  # what ``send_response`` does with a 101 answer
            protocol.writes.append(upgrade)
            protocol.state = State.OPEN
            protocol.logger.info("connection open")
        else:  # a refusal (or a debug log of the answer): websockets' own way
            response = protocol.accept(self.request)
            if server_header is not None:
                response.headers["Server"] = server_header
            if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS and not self.server.is_serving():
                response = protocol.reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n")
            if self.state is State.CONNECTING:
                if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS:
                    protocol.send_response(response)
                else:
                    async with self.send_context(expected_state=State.CONNECTING):
                        protocol.send_response(response)
        if protocol.state is State.OPEN:
            # The upgrade leaves nothing to wait for: websockets' ``send_context`` would only write and drain
            # here, and its async context manager costs about a twentieth of a sign-in.
            self.send_data()
            if self.paused:
                await self.drain()
        if self.protocol.state is State.OPEN:  # frames that came with the request are parsed now
            self._to_frames()
            self._advance_parser()
            self.send_data()
        self.request = None  # an idle connection keeps neither the request nor the response,
        self.response = None
        self.request_rcvd = None  # type: ignore[assignment]  # nor a future for the next request


_date = (0, "")


def http_date() -> str:
    """The Date header's value, formatted once a second (formatdate costs about as much as a key lookup)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


def switching_protocols(protocol: ServerProtocol, request: Request, server_header: str | None) -> bytes | None:
    """The bytes of the 101 answer to a valid upgrade request, as ``protocol.accept(request)`` (with the
    ``Server`` header added) serializes them, or None when websockets' check (``process_request``) refuses the
    request: ``accept`` then builds the refusal. websockets' ``Headers`` and its Date formatting cost about a
    tenth of a sign-in; here the Date line is the one of this second."""
    protocol.accept_called = True
    try:
        accept, extensions, subprotocol = protocol.process_request(request)
    except Exception:  # noqa: BLE001  # whatever it raised, accept() raises it again and answers it
        return None
    head = [_UPGRADE_LINES, _date_line(), b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
            accept.encode("ascii"), b"\r\n"]
    for name, value in (("Sec-WebSocket-Extensions", extensions), ("Sec-WebSocket-Protocol", subprotocol),
                        ("Server", server_header)):
        if value is not None:
            head.append(f"{name}: {value}\r\n".encode())
    head.append(b"\r\n")
    return b"".join(head)


_UPGRADE_LINES = b"HTTP/1.1 101 Switching Protocols\r\n"
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("iso-8859-1") for s in http.HTTPStatus}
_dated = (0, b"")


def _date_line() -> bytes:
    """The Date header line, encoded once a second."""
    global _dated
    now = int(time.time())
    if _dated[0] != now:
        _dated = (now, b"Date: " + http_date().encode("ascii") + b"\r\n")
    return _dated[1]


def render(resp: HttpResponse, head: bool, close: bool) -> bytes:
    """A REST answer's bytes, as ``to_response(resp, head).serialize()`` writes them (without ``Connection:
    close`` when ``close`` is false), built straight from the value: the answer of every kept-alive or
    one-shot REST request, where websockets' ``Headers`` and ``Response`` cost as much as the lookup."""
    status = resp.status
    fields = []
    if close:
        fields.append("Connection: close\r\n")
    if resp.content_type:
        fields.append(f"Content-Type: {resp.content_type}\r\n")
    if status != 204 and status != 304:
        fields.append(f"Content-Length: {len(resp.body)}\r\n")
    for name, value in resp.headers:
        fields.append(f"{name}: {value}\r\n")
    fields.append("\r\n")
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
    return b"".join((line, _date_line(), "".join(fields).encode("iso-8859-1"), b"" if head else resp.body))


def to_response(resp: HttpResponse, head: bool) -> Response:
    """The websockets ``Response`` for a REST answer (no body for HEAD)."""
    headers = Headers([("Date", http_date()), ("Connection", "close")])
    if resp.content_type:
        headers["Content-Type"] = resp.content_type
    if resp.status not in (204, 304):
        headers["Content-Length"] = str(len(resp.body))
    for name, value in resp.headers:
        headers[name] = value
    status = http.HTTPStatus(resp.status)
    return Response(status.value, status.phrase, headers, b"" if head else resp.body)

"""One TCP connection on the shared port: HTTP requests (kept alive), then maybe a WebSocket.

``RelayConnection`` specialises websockets' ``ServerConnection`` at its
seams: it replaces the protocol's handshake parser by ``http_framing``'s
strict one (bodies, keep-alive, pipelining), runs the handshake loop that
answers REST requests through ``process_request`` until one upgrades, and
writes frames without awaiting (``Outbox``). It accounts every byte it
buffers (unread input, unsent output) to the client's budget, counts every
frame (control frames too) against the frame limiter, and can be cut off,
handing back the messages whose bytes never reached the peer.
``tests/test_websockets_compat.py`` fails loudly, naming the version, if a
websockets release moves these seams.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator

from websockets.asyncio.messages import Assembler
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import OPEN, Protocol, State

from ..errors import RelayError
from ..ratelimit import FrameLimiter, Verdict
from .http import HttpResponse, error_response
from .http_framing import BadRequest, ParsedRequest, read_request
from .outbox import COALESCE_BYTES, SentBytes, begin_batch, defer_flush, end_batch, text_frame

log = logging.getLogger("relayd.server")

@dataclass(slots=True)
class ConnectionLimits:
    """Per-connection limits, shared by every connection so that a reload reaches open ones too."""

    max_body: int
    max_outbound: int
    max_inbound: int
    head_timeout: float
    idle_timeout: float
    max_requests: int


class RelayConnection(ServerConnection):
    """See the module docstring. ``context`` is the gateway: admission, budgets, limits, time."""

    def __init__(self, protocol: Any, server: Server, *, context: Any, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        self.context = context
        self.limits: ConnectionLimits = context.connection_limits
        self.peer_ip = "unknown"
        self.client_ip = "unknown"
        self.trusted_peer = False
        self.counted = False
        self.refusal: RelayError | None = None
        self.in_head = True
        self.held = 0
        self.limiter: FrameLimiter | None = None
        self.on_refused: Callable[[Verdict], None] | None = None
        self.on_message: Callable[[str | bytes], Awaitable[None] | None] | None = None
        self.handling = False
        self._busy: asyncio.Future[None] | None = None
        self.on_undelivered: Callable[[list[Any]], None] | None = None
        self.request_body = b""
        self.last_heard = 0.0
        self.ping_sent_at: float | None = None
        self._requests: list[ParsedRequest | BadRequest] = []
        self._want_next = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False
        self.sent: SentBytes | None = None
        self._inbound = 0
        self._kept = 0
        self._inbound_sizes: list[tuple[int, Verdict]] = []
        self._verdict = Verdict.ALLOW
        self._message_size = 0
        self._frames_paused = False
        self._bytes_paused = False
        protocol.parser = self._parse_requests()
        next(protocol.parser)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sent = SentBytes(transport)
        self.recv_messages = Assembler(self.max_queue_high, self.max_queue_low,
                                       pause=self._pause_for_frames, resume=self._resume_for_frames)
        peer = transport.get_extra_info("peername")
        self.peer_ip = self.client_ip = peer[0] if peer else "unknown"
        self.last_heard = self.loop.time()
        refusal = self.context.accepted(self)
        if refusal is None:
            self.counted = True
        elif self.context.may_linger(self):
            self.refusal = refusal  # answered at once by handshake(), then closed the lingering way
        else:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.loop.time()
        opened = begin_batch()
        try:
            super().data_received(data)
        finally:
            if opened:
                end_batch()
        if self.protocol.state is OPEN and self.transport.get_write_buffer_size() > self.limits.max_outbound:
            self.cut("its peer sends without reading (control frames pile up)")
            return
        self._recharge()

    def connection_lost(self, exc: Exception | None) -> None:
        self._hand_back()
        self._pending.clear()
        super().connection_lost(exc)
        if self.counted:
            self.context.released(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._recharge()

    # Reading: HTTP requests, then frames

    def _parse_requests(self) -> Generator[None, None, None]:
        """The protocol's parser: requests one at a time, frames after an upgrade."""
        protocol = self.protocol
        while True:
            try:
                parsed = yield from read_request(protocol.reader, self.limits.max_body, self._continue)
            except EOFError:
                protocol.send_eof()
                protocol.parser = protocol.discard()
                next(protocol.parser)
                yield
                return
            except BadRequest as exc:
                protocol.events.append(exc)
                while True:  # until the answer replaces this parser by discard()
                    yield
            protocol.events.append(parsed)
            if parsed.upgrade:
                yield from Protocol.parse(protocol)
                return
            while not self._want_next:
                if len(protocol.reader.buffer) > self.limits.max_body + 65536:
                    self.transport.pause_reading()
                yield
            self._want_next = False

    def _continue(self) -> None:
        """``Expect: 100-continue``: tell the client to send its body."""
        self.protocol.writes.append(b"HTTP/1.1 100 Continue\r\n\r\n")

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame):
            self._frame(event)
        else:
            self._requests.append(event)
            if not self.request_rcvd.done():
                self.request_rcvd.set_result(None)

    def _frame(self, frame: Frame) -> None:
        """Count every frame against the limiter; apply a whole allowed message at once when nothing is
        ahead of it, else queue data frames with their verdict, in order, for the session loop."""
        verdict = Verdict.ALLOW if self.limiter is None else self.limiter.admit(self.loop.time())
        if frame.opcode in DATA_OPCODES:
            if (frame.fin and verdict is Verdict.ALLOW and frame.opcode is not Opcode.CONT and not self.handling
                    and self._busy is None and not self._inbound_sizes and self.on_message is not None):
                try:  # text must be UTF-8; websockets fails a connection that sends other (1007) on the queue path
                    data: str | bytes = frame.data.decode() if frame.opcode is Opcode.TEXT else frame.data
                except UnicodeDecodeError:
                    data = b""
                if data:
                    pending = self.on_message(data)
                    if pending is not None:
                        self._busy = asyncio.ensure_future(pending)
                        self._busy.add_done_callback(self._applied)
                    return
            if frame.opcode is not Opcode.CONT:
                self._verdict = verdict
            self._message_size += len(frame.data)
            self.recv_messages.put(frame)
            if frame.fin:
                self._inbound += self._message_size
                self._inbound_sizes.append((self._message_size, self._verdict))
                self._message_size = 0
                if self._inbound > self.limits.max_inbound and not self._bytes_paused:
                    self._bytes_paused = True
                    self._update_reading()
        elif verdict is Verdict.CLOSE and self.on_refused is not None:  # a flood of pings or pongs
            self.on_refused(verdict)

    def _applied(self, task: asyncio.Future[None]) -> None:
        self._busy = None

    async def wait_applied(self) -> None:
        """Until the message applied straight from ``data_received`` (if any) has been applied in full."""
        if self._busy is not None:
            await self._busy

    def consumed(self) -> Verdict:
        """The handler took one message out of the queue: the frame limiter's verdict on it."""
        verdict = Verdict.ALLOW
        if self._inbound_sizes:
            size, verdict = self._inbound_sizes.pop(0)
            self._inbound -= size
        if self._bytes_paused and self._inbound <= self.limits.max_inbound // 2:
            self._bytes_paused = False
            self._update_reading()
        self._recharge()
        return verdict

    def _pause_for_frames(self) -> None:
        self._frames_paused = True
        self._update_reading()

    def _resume_for_frames(self) -> None:
        self._frames_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport.is_closing():
            return
        if self._frames_paused or self._bytes_paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # The handshake: REST requests until one upgrades

    async def handshake(self, process_request: Any, process_response: Any = None,
                        server_header: str | None = None) -> None:
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
        served = 0
        timeout = self.limits.head_timeout
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
            self.request_body = item.body
            response = await process_request(self, item.request)
            self.request_body = b""
            if response is None:
                await self._accept_websocket(server_header)
                return
            served += 1
            if (not item.keep_alive or served >= self.limits.max_requests or not self.server.is_serving()
                    or self.transport.is_closing()):
                await self._answer_last(response)
                return
            del response.headers["Connection"]
            self.transport.write(response.serialize())
            self.request = None
            self._want_next = True
            self.transport.resume_reading()
            next(self.protocol.parser)
            for event in self.protocol.events_received():
                self.process_event(event)
            if self.paused:
                await self.drain()
            timeout = self.limits.idle_timeout

    async def _next_request(self, timeout: float) -> ParsedRequest | BadRequest | None:
        if not self._requests:
            self.request_rcvd = self.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.wait([self.request_rcvd, self.connection_lost_waiter],
                                       return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                self.transport.abort() if self.in_head else self.transport.close()
                return None
        return self._requests.pop(0) if self._requests else None

    async def _answer_last(self, response: Response) -> None:
        """The connection's last answer: sent with EOF, then the client is given time to close."""
        if self.protocol.state is State.CONNECTING:
            async with self.send_context(expected_state=State.CONNECTING):
                self.protocol.send_response(response)

    async def _accept_websocket(self, server_header: str | None) -> None:
        assert self.request is not None
        response = self.protocol.accept(self.request)
        if server_header is not None:
            response.headers["Server"] = server_header
        if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS and not self.server.is_serving():
            response = self.protocol.reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n")
        if self.state is State.CONNECTING:
            async with self.send_context(expected_state=State.CONNECTING):
                self.protocol.send_response(response)
        self.request = None  # an idle connection keeps neither the request nor the response
        self.response = None

    # Writing: the session's Outbox

    def push(self, data: str, parcel: Any = None) -> bool:
        """Queue one text frame; False when closed or when the peer stopped reading (then it is cut off).

        ``parcel`` (a message) is handed back through ``on_undelivered`` if
        the connection ends before the peer's TCP stack acknowledged the
        frame's bytes.
        """
        if self.protocol.state is not OPEN:
            return False
        frame = text_frame(data)
        size = len(frame)
        if self._pending_bytes + size + self.transport.get_write_buffer_size() > self.limits.max_outbound:
            self.cut("its peer stopped reading")
            return False
        self._pending.append(frame)
        self._pending_bytes += size
        if parcel is not None:
            self.sent.track(self.sent.written + self._pending_bytes, parcel)
        if self._pending_bytes >= COALESCE_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            if not defer_flush(self):
                self.loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Write every frame pushed so far in one write."""
        self._flush_scheduled = False
        pending = self._pending
        if not pending or self.transport.is_closing():
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.transport.write(data)
        self.sent.wrote(self._pending_bytes)
        self._pending_bytes = 0
        self._recharge()

    @property
    def closing(self) -> bool:
        return self.protocol.state is not OPEN

    def hold(self, delta: int) -> None:
        self._kept += delta
        self._recharge()

    def congested(self) -> Awaitable[None] | None:
        """While the transport is paused above the write limit, the awaitable that resumes."""
        return self.drain() if self.paused else None

    def close_soon(self, code: int, reason: str) -> None:
        self.flush()
        self.loop.create_task(self.close(code, reason))

    # Liveness, on the housekeeping timer

    def check_liveness(self, now: float, ping_interval: float, ping_timeout: float, stall_timeout: float) -> None:
        """Ping a quiet peer, cut one that did not answer or whose send buffer stayed full too long."""
        if self.protocol.state is not OPEN:
            return
        if self.sent.stalled(now) > stall_timeout:
            self.cut(f"its peer took none of its bytes for {stall_timeout:g} s")
            return
        if self.ping_sent_at is not None:
            if self.last_heard > self.ping_sent_at:
                self.ping_sent_at = None
            elif now - self.ping_sent_at > ping_timeout:
                self.ping_sent_at = None
                self.loop.create_task(self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout"))
                return
        if ping_interval and self.ping_sent_at is None and now - self.last_heard >= ping_interval:
            self.protocol.send_ping(b"")
            self.send_data()
            self.ping_sent_at = now
        self.sent.prune()

    async def _fail(self, code: int, reason: str) -> None:
        """Send a close frame and give the peer ``close_timeout`` to close, as websockets' keepalive does."""
        try:
            async with self.send_context():
                self.protocol.fail(code, reason)
        except ConnectionClosed:
            pass

    # Cutting off

    def _hand_back(self) -> None:
        """Give the messages the peer never acknowledged to ``on_undelivered``, once."""
        if self.sent is not None and self.sent.tracking:
            lost = self.sent.release()
            if lost and self.on_undelivered is not None:
                self.on_undelivered(lost)

    def cut(self, reason: str) -> None:
        """End the connection at once (no closing handshake): it broke a limit it cannot recover from."""
        if self.transport.is_closing():
            return
        log.debug("cutting a connection from %s: %s", self.client_ip, reason)
        self._hand_back()
        self.transport.abort()

    # Accounting

    def _recharge(self) -> None:
        """Report this connection's buffered bytes to its client's budget."""
        held = (len(self.protocol.reader.buffer) + self._inbound + self._pending_bytes + self._kept
                + self.transport.get_write_buffer_size())
        if held != self.held:
            delta, self.held = held - self.held, held
            self.context.charge(self, delta)


def to_response(resp: HttpResponse, head: bool) -> Response:
    """The websockets ``Response`` for a REST answer (no body for HEAD)."""
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close")])
    if resp.content_type:
        headers["Content-Type"] = resp.content_type
    if resp.status not in (204, 304):
        headers["Content-Length"] = str(len(resp.body))
    for name, value in resp.headers:
        headers[name] = value
    status = http.HTTPStatus(resp.status)
    return Response(status.value, status.phrase, headers, b"" if head else resp.body)

"""The WebSocket side of a connection on the shared port: frames in and out, liveness, budgets, cutting off.

``RelayConnection`` extends ``HttpConnection`` (REST and the handshake). A
whole frame with nothing queued ahead of it is applied as it arrives
(``SessionEvents.receive``); others queue for the session loop with the frame
limiter's verdict (the limiter reads the injected clock). Frames out are
written without awaiting (the session's ``Outbox``), coalesced per received
chunk. It accounts every byte it buffers (unread input, unsent output,
messages the protocol is storing for it) to the client's budget, counts every
frame (control frames too) against the frame limiter, and can be cut off,
handing back the messages whose bytes never reached the peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, Protocol, cast

from websockets.asyncio.messages import Assembler
from websockets.asyncio.server import Server
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, CloseCode, Frame, Opcode
from websockets.protocol import CONNECTING, OPEN
from websockets.server import ServerProtocol

from ..ratelimit import FrameLimiter, Verdict
from .http_connection import ConnectionContext, HttpConnection
from .outbox import COALESCE_BYTES, NEVER_WRITTEN, SentBytes, begin_batch, defer_flush, end_batch, text_frame


class SessionEvents(Protocol):
    """What a connection tells its session's owner (the gateway binds these to the router and the session)."""

    def receive(self, message: str | bytes) -> Awaitable[None] | None:
        """Apply a whole message; an awaitable when it is not applied in full yet (later ones wait for it)."""

    def throttled(self, verdict: Verdict) -> None:
        """The frame limiter refused a frame (``verdict`` says whether to warn or to close)."""

    def undelivered(self, parcels: list[object]) -> None:
        """Messages whose bytes never reached the peer, handed back once as the connection ends."""


class _Frames(list[Frame]):
    """The queue of frames waiting for the session loop, as a list: an idle connection's is empty, and an empty
    list costs a tenth of the deque websockets allocates for it. Holds at most ``max_queue`` frames."""

    __slots__ = ()

    def popleft(self) -> Frame:
        return self.pop(0)

    def extendleft(self, frames: Iterable[Frame]) -> None:
        self[:0] = list(frames)[::-1]


def _nothing() -> None:
    """Flow control for a connection that is gone: there is no reading left to pause or resume."""


def _retire_parser(protocol: ServerProtocol) -> None:
    """Let the frame parser go once the connection is lost. The parser (websockets' generator suspended inside
    its protocol, or relayd's ``FrameParser``) holds its protocol, and the error that ended a parse (a peer gone without a closing handshake) keeps the parse's
    frame in its traceback: either forms a reference cycle with the protocol that only the garbage collector
    would free. Nothing feeds the parser after ``connection_lost`` (websockets' own ``receive_eof`` there is its
    last step), and the error keeps its type and message."""
    parser = getattr(protocol, "parser", None)
    if isinstance(parser, Generator):  # websockets' generators, or relayd's FrameParser
        parser.close()
    error = getattr(protocol, "parser_exc", None)
    if isinstance(error, BaseException):
        error.__traceback__ = None


class RelayConnection(HttpConnection):
    """See the module docstring. ``context`` is the gateway: admission, budgets, limits, the clock."""

    __slots__ = ("limiter", "_monotonic", "events", "direct", "handling", "_busy", "last_heard", "ping_sent_at",
                 "_pending", "_pending_bytes", "_pending_parcels", "_flush_scheduled", "sent", "_inbound", "_kept", "_inbound_sizes",
                 "_verdict", "_message_size", "_frames_paused", "_bytes_paused", "_wake")

    sent: SentBytes
    """Set once the transport exists (``connection_made``)."""

    def __init__(self, protocol: ServerProtocol, server: Server, *, context: ConnectionContext,
                 **kwargs: Any) -> None:
        super().__init__(protocol, server, context=context, **kwargs)
        self.drain_waiters = []  # type: ignore[assignment]  # appended, removed and iterated only: a list will do
        self.limiter: FrameLimiter | None = None
        self._monotonic: Callable[[], float] = context.clock.monotonic
        """The frame limiter's time: the injected clock's, bound once (it is read for every frame)."""
        self.events: SessionEvents | None = None
        self.direct = False
        """Whole messages are applied from ``data_received`` (through ``events.receive``) while this is set."""
        self.handling = False
        self._busy: asyncio.Future[None] | None = None
        self.last_heard = 0.0
        self.ping_sent_at: float | None = None
        # ``_pending``, ``_pending_parcels`` and ``_inbound_sizes`` exist only while they hold something: an idle
        # connection keeps none (a fifth of a KiB and three objects for the collector to walk, per connection).
        self._pending: list[bytes] | None = None
        self._pending_parcels: list[tuple[int, object]] | None = None
        """Messages among the pending frames, with where their frame ends within them."""
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._inbound = 0
        self._kept = 0
        self._inbound_sizes: list[tuple[int, Verdict]] | None = None
        self._verdict = Verdict.ALLOW
        self._message_size = 0
        self._frames_paused = False
        self._bytes_paused = False
        self._wake: asyncio.Future[None] | None = None
        """What ``idle()`` handed out, resolved by the next whole message queued or by the connection's end."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sent = SentBytes(cast(asyncio.Transport, transport))  # a stream server's transport
        self.last_heard = asyncio.get_running_loop().time()
        super().connection_made(transport)
        self.recv_messages = Assembler(self.max_queue_high, self.max_queue_low,
                                       pause=self._pause_for_frames, resume=self._resume_for_frames)
        self.recv_messages.frames.queue = _Frames()  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_heard = self.loop.time()
        opened = begin_batch()
        try:
            super().data_received(data)
        finally:
            if opened:
                end_batch()
        if (self.protocol.state is not CONNECTING  # open or closing: pongs pile up until the peer reads
                and self.transport.get_write_buffer_size() > self.limits.max_outbound):
            self.cut("its peer sends without reading (control frames pile up)")
            return
        self._recharge()

    def connection_lost(self, exc: Exception | None) -> None:
        self._hand_back()
        super().connection_lost(exc)
        # Nothing reaches the session through ``events`` from now on: dropping them leaves the connection in no
        # reference cycle, so it is freed as its handler ends, not by a later pass of the garbage collector (a full
        # pass walks every open session: tens of milliseconds per thousand).
        self.events = None
        self.recv_messages.pause = self.recv_messages.resume = _nothing  # its flow control holds this connection
        _retire_parser(self.protocol)
        self._wake_session()

    def send_data(self) -> None:
        """Write what websockets has to send (the handshake answer, pongs, the close frame), counted with the
        frames pushed here: the kernel's count of unacknowledged bytes is set against everything written, so a
        close frame still on its way cannot make a message before it look unreceived."""
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
                self.sent.wrote(len(data))
            elif self.transport.can_write_eof():  # half-close after the closing handshake, as websockets does
                try:
                    self.transport.write_eof()
                except Exception:  # noqa: BLE001  # undocumented; uvloop raises RuntimeError
                    pass
            else:
                self.transport.close()

    def frame_received(self, frame: Frame) -> None:
        """Count every frame against the limiter; apply a whole allowed message at once when nothing is
        ahead of it, else queue data frames with their verdict, in order, for the session loop."""
        verdict = Verdict.ALLOW if self.limiter is None else self.limiter.admit(self._monotonic())
        if frame.opcode in DATA_OPCODES:
            if (frame.fin and verdict is Verdict.ALLOW and frame.opcode is not Opcode.CONT and not self.handling
                    and self._busy is None and not self._inbound_sizes and self.direct
                    and self.events is not None):
                try:  # text must be UTF-8; websockets fails a connection that sends other (1007) on the queue path
                    # websockets' parser makes ``bytes`` (``Frame.data`` is typed for any bytes-like); no conversion
                    # on the path of every frame
                    data: str | bytes = (frame.data.decode()  # type: ignore[union-attr]
                                         if frame.opcode is Opcode.TEXT else frame.data)  # type: ignore[assignment]
                except UnicodeDecodeError:
                    data = b""
                if data:
                    pending = self.events.receive(data)
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
                if self._inbound_sizes is None:
                    self._inbound_sizes = []
                self._inbound_sizes.append((self._message_size, self._verdict))
                self._wake_session()
                self._message_size = 0
                if self._inbound > self.limits.max_inbound and not self._bytes_paused:
                    self._bytes_paused = True
                    self._update_reading()
        elif verdict is Verdict.CLOSE and self.events is not None:  # a flood of pings or pongs
            self.events.throttled(verdict)

    def idle(self) -> asyncio.Future[None] | None:
        """For the session loop: a future that resolves once a whole message is queued or the connection is
        lost, or None when one is already (``recv()`` then returns it, or raises ``ConnectionClosed``)."""
        if self._inbound_sizes or self.recv_messages.closed:
            return None
        self._wake = wake = self.loop.create_future()
        return wake

    def _wake_session(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)

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
            if not self._inbound_sizes:
                self._inbound_sizes = None
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

    # Writing: the session's Outbox

    def push(self, data: str, parcel: object = None) -> bool:
        """Queue one text frame; False when closed or when the peer stopped reading (then it is cut off).

        ``parcel`` (a message) is handed back through ``events.undelivered`` if
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
        if self._pending is None:
            self._pending = [frame]
        else:
            self._pending.append(frame)
        self._pending_bytes += size
        if parcel is not None:
            if self._pending_parcels is None:
                self._pending_parcels = [(self._pending_bytes, parcel)]
            else:
                self._pending_parcels.append((self._pending_bytes, parcel))
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
        if not pending:
            return
        if self.transport.is_closing() or self.protocol.state is not OPEN:
            # The closing handshake began after these frames were pushed: no data frame may follow a close
            # frame (nor the EOF websockets writes after it). Their messages were never written, so they come
            # back through ``undelivered`` when the connection ends.
            self._abandon_pending()
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = None
        parcels = self._pending_parcels
        if parcels is not None:
            start = self.sent.written
            for end, parcel in parcels:
                self.sent.track(start + end, parcel)
            self._pending_parcels = None
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
        if (self.ping_sent_at is None and (now - self.last_heard < ping_interval or not ping_interval)
                and self.sent.settled):
            return  # the common case, every tick for every idle connection: heard from lately, nothing in flight
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

    def _abandon_pending(self) -> None:
        """Drop the frames not written yet; their messages are tracked as never sent."""
        for _, parcel in self._pending_parcels or ():
            self.sent.track(NEVER_WRITTEN, parcel)
        self._pending_parcels = self._pending = None
        self._pending_bytes = 0

    def _hand_back(self) -> None:
        """Give the messages the peer never acknowledged (or that were never written) to ``events.undelivered``,
        once."""
        self._abandon_pending()
        if self.sent.tracking:
            lost = self.sent.release()
            if lost and self.events is not None:
                self.events.undelivered(lost)

    def cut(self, reason: str) -> None:
        """End the connection at once, handing back the messages its peer never acknowledged."""
        if not self.transport.is_closing():
            self._hand_back()
        super().cut(reason)

    # Accounting

    def _buffered(self) -> int:
        """Besides unread input and unsent output: frames waiting to be applied, frames not written yet, and
        messages the protocol is storing for this connection."""
        return super()._buffered() + self._inbound + self._pending_bytes + self._kept

"""A new connection's first request, answered without websockets' machinery when it is a plain REST request.

The app looks a key up with one request per connection (``Connection:
close``). Such a connection never becomes a WebSocket, so ``PlainRequest``
is the asyncio protocol every accepted connection starts with: it is
admitted, counted and timed like any other (``ConnectionContext``), and it
frames its first request with ``http_framing``. When that request arrived
whole in the first read, asks for neither an upgrade nor keep-alive, and
nothing follows it, it is answered here and the connection closes: no
websockets ``ServerProtocol`` or ``ServerConnection``, no handler task, no
futures. Anything else (an upgrade, keep-alive, a head spread over reads, a
malformed request, a refusal at accept) is handed, with what was read, to
the full connection (``HttpConnection.adopt``), which serves it as if it had
accepted it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import Enum
from typing import cast

from websockets.streams import StreamReader

from ..errors import RelayError
from ..reads import read_from_heap
from .http_connection import ConnectionContext, HttpConnection, render
from .http_framing import BadRequest, ParsedRequest, read_request
from .transports import release

log = logging.getLogger("relayd.server")


class _Stage(Enum):
    READING = 1
    """Waiting for the first read."""
    ANSWERING = 2
    """The request is being answered; whatever else arrives is read and dropped."""
    CLOSING = 3
    """The answer is written; the socket is closing."""
    HANDED_OVER = 4


class PlainRequest(asyncio.Protocol):
    """See the module docstring. ``full`` makes the full connection when this one cannot serve it alone."""

    __slots__ = ("context", "full", "transport", "peer_ip", "client_ip", "trusted_peer", "counted", "in_head",
                 "held", "head_deadline", "_stage", "_timer", "_extra", "_eof")

    def __init__(self, context: ConnectionContext, full: Callable[[], HttpConnection]) -> None:
        self.context = context
        self.full = full
        self.peer_ip = "unknown"
        self.client_ip = "unknown"
        self.trusted_peer = False
        self.counted = False
        self.in_head = True
        self.held = 0
        """Never more than 0: nothing is buffered here (the budgets' ``Holder``)."""
        self.head_deadline = 0.0
        self._stage = _Stage.READING
        self._timer: asyncio.TimerHandle | None = None
        self._extra = False
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        read_from_heap(transport)
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = self.client_ip = peer[0] if peer else "unknown"
        refusal = self.context.accepted(self)
        if refusal is not None:  # the full connection answers or drops it, as it always did
            self._hand_over(None, b"", refusal)
            return
        self.counted = True
        loop = asyncio.get_running_loop()
        self.head_deadline = loop.time() + self.context.connection_limits.head_timeout
        self._timer = loop.call_at(self.head_deadline, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._stage is not _Stage.READING:
            self._extra = True  # read and dropped, so that closing sends a FIN rather than a reset
            return
        reader = StreamReader()
        reader.feed_data(data)
        framing = read_request(reader, self.context.connection_limits.max_body)
        try:
            next(framing)
        except StopIteration as done:
            parsed: ParsedRequest = done.value
            if parsed.keep_alive or parsed.upgrade or reader.buffer:
                self._hand_over(parsed, bytes(reader.buffer))
            else:
                self._answer(parsed)
            return
        except BadRequest:
            pass
        self._hand_over(None, data)  # the full connection frames it again, waits for the rest, or refuses it

    def eof_received(self) -> bool:
        """Keep the socket open for the answer when the request came before the client's FIN."""
        self._eof = True
        return self._stage is _Stage.ANSWERING

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stage is _Stage.HANDED_OVER:
            return
        self._stage = _Stage.CLOSING
        release(self.transport)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.counted:
            self.counted = False
            self.context.released(self)

    def cut(self, reason: str) -> None:
        """A budget's cut: nothing is held here, but the connection ends all the same."""
        log.debug("cutting a connection from %s: %s", self.client_ip, reason)
        self.transport.abort()

    def _hand_over(self, parsed: ParsedRequest | None, data: bytes, refusal: RelayError | None = None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stage = _Stage.HANDED_OVER
        self.full().adopt(self, parsed, data, refusal)

    def _answer(self, parsed: ParsedRequest) -> None:
        assert self._timer is not None
        self._timer.cancel()
        self._timer = None
        self._stage = _Stage.ANSWERING
        self.in_head = False
        self.context.head_done(self)
        self.context.answering(asyncio.get_running_loop().create_task(self._respond(parsed)))

    async def _respond(self, parsed: ParsedRequest) -> None:
        request = parsed.request
        transport = self.transport
        try:
            answer = await self.context.respond(self, parsed)
        except Exception:  # respond() answers refusals and errors itself: this is a bug, not a client's doing
            log.exception("internal error answering a %s request", request.method)
            transport.abort()
            return
        assert answer is not None  # only an upgrade has no answer, and an upgrade is handed over
        if transport.is_closing():  # the client left, or a budget cut it meanwhile
            return
        self._stage = _Stage.CLOSING
        transport.write(render(answer, request.method == "HEAD", close=True))
        close_timeout = self.context.connection_limits.close_timeout
        if self._extra and not self._eof and transport.can_write_eof():
            # It sent more after asking to close: half-close and read until it closes too, so the answer is
            # not lost to a reset (bytes still unread when a socket closes turn its FIN into one).
            transport.write_eof()
        else:
            transport.close()
            if not transport.get_write_buffer_size():
                return
        # The answer waits for a client that may never read it (or never close): bounded like the rest.
        self._timer = asyncio.get_running_loop().call_later(close_timeout, transport.abort)

"""One WebSocket to the relay: opening it, and sending and reading JSON frames within a deadline."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.frames import CloseCode

from ..reads import read_from_heap
from .decoding import parse_object
from .display import shown
from .endpoint import Endpoint
from .errors import (
    ClientTimeout,
    ConnectionLost,
    ProtocolViolation,
    RelayUnreachable,
    close_detail,
    unreachable,
)
from .values import Deadline, Frame, Limits

# Frames websockets buffers beyond those the client has read: with max_frame_bytes, what a relay can make it hold.
_MAX_QUEUE = 4
_REFUSALS = (CloseCode.MESSAGE_TOO_BIG, CloseCode.INVALID_DATA, CloseCode.PROTOCOL_ERROR)


def _refused_by_client(ws: ClientConnection) -> bool:
    """Whether the client closed ``ws`` because the relay sent a frame over the limit or broke the protocol."""
    protocol = ws.protocol
    sent, rcvd = protocol.close_sent, protocol.close_rcvd
    return sent is not None and sent.code in _REFUSALS and not (rcvd is not None and protocol.close_rcvd_then_sent)


class _DroppingConnection(ClientConnection):
    """A connection dropped as soon as the client refuses what the relay sent (reading from the heap, as
    ``relayd.reads`` says).

    websockets would otherwise wait up to its close timeout for the relay to
    finish the closing handshake, while a hostile relay keeps sending; the
    calls waiting on the connection learn why at once instead.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        read_from_heap(transport)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if _refused_by_client(self):
            self.transport.abort()


class FrameStream:
    """An open WebSocket carrying JSON objects; every failure is a ``ClientError`` that says what happened."""

    def __init__(self, ws: ClientConnection, limits: Limits) -> None:
        self.ws = ws
        self.limits = limits

    @classmethod
    async def open(cls, endpoint: Endpoint, limits: Limits, deadline: Deadline) -> "FrameStream":
        """Connect and upgrade; raises RelayUnreachable or ClientTimeout."""
        where = endpoint.where
        extra: dict[str, Any] = {}
        tls = endpoint.ssl_context()
        if tls is not None:
            extra["ssl"] = tls
        try:
            ws = await ws_connect(endpoint.url, compression=None, open_timeout=deadline.remaining(),
                                  close_timeout=limits.timeout, max_size=limits.max_frame_bytes,
                                  max_queue=_MAX_QUEUE, proxy=None, create_connection=_DroppingConnection, **extra)
        except InvalidStatus as exc:
            response = exc.response
            body = shown(response.body.strip()) if response.body else ""
            raise RelayUnreachable(f"{where} answered HTTP {response.status_code} {shown(response.reason_phrase, 50)} "
                                   f"instead of a WebSocket upgrade (not a relay?)"
                                   + (f": {body}" if body else ""), status=response.status_code) from None
        except (InvalidHandshake, InvalidURI) as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise RelayUnreachable(f"{where} did not answer like a WebSocket server (not a relay?): "
                                   f"{shown(f'{exc}{cause}')}") from None
        except TimeoutError:
            raise ClientTimeout(f"timeout opening a WebSocket to {where} after {deadline.seconds:g} s") from None
        except OSError as exc:
            raise unreachable(where, exc, f"cannot connect to {where}") from None
        return cls(ws, limits)

    @property
    def close_code(self) -> int | None:
        """The relay's close code (1006 when the connection dropped without a close frame)."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str:
        return shown(self.ws.close_reason or "", 123)

    def lost(self, doing: str) -> ConnectionLost | ProtocolViolation:
        """The error for a connection that closed (or is closing) while ``doing`` something.

        When the client itself ended it because a frame was over
        ``max_frame_bytes`` (1009) or broke the protocol (1007, 1002), that is
        the relay's fault and said so.
        """
        sent = self.ws.protocol.close_sent
        if sent is not None and _refused_by_client(self.ws):
            if sent.code == CloseCode.MESSAGE_TOO_BIG:
                return ProtocolViolation(f"the relay sent a frame larger than the client's limit of "
                                         f"{self.limits.max_frame_bytes} bytes (max_frame_bytes) while {doing}")
            if sent.code in (CloseCode.INVALID_DATA, CloseCode.PROTOCOL_ERROR):
                return ProtocolViolation(f"the relay broke the WebSocket protocol while {doing}: "
                                         f"{shown(sent.reason)}")
        code, reason = self.close_code, self.close_reason
        return ConnectionLost(f"connection closed while {doing}{close_detail(code, reason)}", code, reason)

    async def send(self, frame: Frame, deadline: Deadline) -> None:
        what = str(frame.get("type"))
        if _refused_by_client(self.ws):
            raise self.lost(f"sending {what}")
        try:
            async with asyncio.timeout_at(deadline.at):
                await self.ws.send(json.dumps(frame))
        except ConnectionClosed:
            raise self.lost(f"sending {what}") from None
        except TimeoutError:
            raise ClientTimeout(f"timeout sending {what} after {deadline.seconds:g} s (the relay does not read)") \
                from None

    async def read(self, deadline: Deadline, what: str) -> Frame:
        """The next frame, whole by the deadline; for the sign-in, before anything reads in the background."""
        try:
            async with asyncio.timeout_at(deadline.at):
                raw = await self.ws.recv()
        except TimeoutError:
            raise ClientTimeout(f"timeout waiting for {what} after {deadline.seconds:g} s") from None
        except ConnectionClosed:
            raise self.lost(f"waiting for {what}") from None
        return parse_object(raw)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "",
                    deadline: Deadline | None = None) -> None:
        """Close, bounded by ``deadline`` (default: the client's timeout), then drop the TCP connection."""
        limit = self.limits.timeout if deadline is None else deadline.remaining()
        try:
            async with asyncio.timeout(limit):
                await self.ws.close(code, reason)
        except (TimeoutError, OSError, ConnectionClosed):
            pass
        finally:
            self.ws.transport.abort()

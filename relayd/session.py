"""One WebSocket connection as the router sees it: who it is and how to reach it."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from .frames import encode


class Session:
    """Per-connection state, kept small: a relay may hold tens of thousands.

    ``push`` writes an encoded frame without waiting and returns False when
    the connection cannot take it (closed, or its peer stopped reading), so a
    slow recipient never stalls the sender that routes to it. ``congested``
    returns an awaitable while the peer is behind, so a bulk sender (the
    backlog flush) can wait for it instead of overrunning it.
    """

    __slots__ = ("id", "ip", "opened_at", "address", "ack", "verified", "ready", "closed",
                 "push", "_close", "congested", "extra", "bucket", "strikes",
                 "in_flight", "tail")

    def __init__(self, sid: int, ip: str, opened_at: float,
                 push: Callable[[str], bool], close: Callable[[int, str], None],
                 congested: Callable[[], Awaitable[None] | None] = lambda: None) -> None:
        self.id = sid
        self.ip = ip
        self.opened_at = opened_at
        self.address: str | None = None
        self.ack = False
        self.verified = False
        self.ready = False
        self.closed = False
        self.push = push
        self._close = close
        self.congested = congested
        self.extra: Any = None
        self.bucket: Any = None
        self.strikes = 0
        self.in_flight = 0
        self.tail: Any = None

    def send(self, frame: dict[str, Any]) -> bool:
        return self.push(encode(frame))

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._close(code, reason)

    def __repr__(self) -> str:
        return f"<Session {self.id} {'ready' if self.ready else 'pending'}>"

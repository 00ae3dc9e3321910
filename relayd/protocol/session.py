"""One WebSocket session as the protocol sees it: who it is, and the outbox that reaches it."""

from __future__ import annotations

from typing import Any, Awaitable, Protocol

from ..frames import encode


class Outbox(Protocol):
    """The connection under a session, as narrow as the protocol needs it.

    Implemented by ``net.connection.RelayConnection``; tests use a recorder.
    """

    def push(self, data: str, parcel: Any = None) -> bool:
        """Queue one encoded frame without waiting.

        Returns False when the connection cannot take it (closed, or its peer
        stopped reading and was cut off); the caller treats the frame as not
        delivered. A ``parcel`` (the message the frame carries) comes back
        through the router's ``undelivered`` if the connection ends before
        the frame's bytes reached the peer.
        """
        ...

    @property
    def closing(self) -> bool:
        """The connection is closing: it takes no more frames, but may still hand frames it received up."""
        ...

    def hold(self, delta: int) -> None:
        """Count ``delta`` bytes the protocol keeps for this connection (messages being stored) in its budget."""
        ...

    def close_soon(self, code: int, reason: str) -> None:
        """Start the closing handshake and return at once."""
        ...

    def congested(self) -> Awaitable[None] | None:
        """While the peer is behind, an awaitable that resolves when it catches up; else None."""
        ...


class Session:
    """Per-connection protocol state, kept small: a relay may hold tens of thousands.

    ``address`` is None until ``auth`` succeeds, then the lower-cased address;
    ``spelling`` is the address as the client wrote it (EIP-55 mixed case from
    the app), used wherever the session is named to others (``from``).
    ``ready`` turns True once the stored backlog has been sent; until then
    messages for this session are stored so they queue behind the backlog.
    """

    __slots__ = ("id", "ip", "opened_at", "outbox", "address", "spelling", "ack", "verified", "ready", "closed")

    def __init__(self, sid: int, ip: str, opened_at: float, outbox: Outbox) -> None:
        self.id = sid
        self.ip = ip
        self.opened_at = opened_at
        self.outbox = outbox
        self.address: str | None = None
        self.spelling = ""
        self.ack = False
        self.verified = False
        self.ready = False
        self.closed = False

    def push(self, data: str, parcel: Any = None) -> bool:
        return self.outbox.push(data, parcel)

    def send(self, frame: dict[str, Any]) -> bool:
        return self.outbox.push(encode(frame))

    def close(self, code: int, reason: str) -> None:
        """Close once; later calls are no-ops, so every path may close without checking."""
        if not self.closed:
            self.closed = True
            self.outbox.close_soon(code, reason)

    def __repr__(self) -> str:
        return f"<Session {self.id} {'ready' if self.ready else 'pending'}>"

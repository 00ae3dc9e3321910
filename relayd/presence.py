"""Who is online, and how frames reach them.

Two narrow interfaces: ``Presence`` answers "is this address online?" and
``Routes`` delivers an encoded frame to an address's ready sessions. The
in-process ``LocalPresence`` implements both; a cross-instance backend (for
example Redis pub/sub) implements the same two without touching the router.
"""

from __future__ import annotations

from typing import Protocol

from .session import Session


class Presence(Protocol):
    """Who is online, for REST status queries and metrics."""

    def is_online(self, address: str) -> bool: ...
    def online_addresses(self) -> list[str]: ...
    def online_count(self) -> int: ...


class Routes(Protocol):
    """The sessions of an address, for routing frames to them."""

    def attach(self, session: Session) -> None:
        """An authenticated session joins its address (``session.address`` is set)."""
        ...

    def detach(self, session: Session) -> bool:
        """The session leaves; True when it was its address's last session."""
        ...

    def ready_sessions(self, address: str) -> tuple[Session, ...]:
        """Sessions of ``address`` that have received their backlog and take live frames."""
        ...

    def sessions(self, address: str) -> tuple[Session, ...]:
        """Every session of ``address``, ready or not."""
        ...


class LocalPresence:
    """Address -> open sessions of this process. A device's session is online
    from ``attach`` until its own ``detach``: an old session closing never
    takes a newer one offline."""

    def __init__(self) -> None:
        self._by_address: dict[str, list[Session]] = {}

    def attach(self, session: Session) -> None:
        assert session.address is not None
        self._by_address.setdefault(session.address, []).append(session)

    def detach(self, session: Session) -> bool:
        """Forget one session; True when its address has no session left."""
        sessions = self._by_address.get(session.address) if session.address else None
        if not sessions or session not in sessions:
            return False
        sessions.remove(session)
        if sessions:
            return False
        del self._by_address[session.address]  # type: ignore[arg-type]
        return True

    def ready_sessions(self, address: str) -> tuple[Session, ...]:
        sessions = self._by_address.get(address)
        if not sessions:
            return ()
        return tuple(s for s in sessions if s.ready)

    def sessions(self, address: str) -> tuple[Session, ...]:
        return tuple(self._by_address.get(address, ()))

    def is_online(self, address: str) -> bool:
        return address in self._by_address

    def online_addresses(self) -> list[str]:
        return list(self._by_address)

    def online_count(self) -> int:
        return len(self._by_address)

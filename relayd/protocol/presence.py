"""Who is online on a single instance: each address's sessions in this process (``seams.Routes`` and
``seams.Presence``)."""

from __future__ import annotations

from .session import Session


class LocalPresence:
    """Address -> open sessions of this process. A device's session is online
    from ``attach`` until its own ``detach``: an old session closing never
    takes a newer one offline."""

    def __init__(self) -> None:
        self._by_address: dict[str, tuple[Session, ...]] = {}
        """Tuples, not lists: 40 bytes less per online address, and the one-device case hands its tuple out as it
        is rather than building one per routed message."""

    def attach(self, session: Session) -> None:
        assert session.address is not None
        self._by_address[session.address] = (*self._by_address.get(session.address, ()), session)

    def detach(self, session: Session) -> bool:
        """Forget one session; True when its address has no session left."""
        address = session.address
        sessions = self._by_address.get(address) if address is not None else None
        if address is None or not sessions or session not in sessions:
            return False
        left = tuple(s for s in sessions if s is not session)
        if left:
            self._by_address[address] = left
            return False
        del self._by_address[address]
        return True

    def ready_sessions(self, address: str) -> tuple[Session, ...]:
        sessions = self._by_address.get(address)
        if not sessions:
            return ()
        if len(sessions) == 1:  # one device: the common case, on the path of every routed message
            return sessions if sessions[0].ready else ()
        return tuple(s for s in sessions if s.ready)

    def sessions(self, address: str) -> tuple[Session, ...]:
        return self._by_address.get(address, ())

    def is_online(self, address: str) -> bool:
        return address in self._by_address

    def online_addresses(self) -> list[str]:
        return list(self._by_address)

    def online_count(self) -> int:
        return len(self._by_address)

    async def statuses(self, addresses: list[str]) -> dict[str, bool]:
        return {a: a in self._by_address for a in addresses}

    async def online_list(self) -> list[str]:
        return list(self._by_address)

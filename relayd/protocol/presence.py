"""Who is online, and how frames reach them.

Narrow interfaces: ``Presence`` answers "is this address online?",
``Routes`` delivers an encoded frame to an address's ready sessions on this
instance, and ``Elsewhere`` reaches its sessions on other relayd instances
sharing one Redis. The in-process ``LocalPresence`` implements the first two;
a single instance has no ``Elsewhere`` at all (the protocol then takes no
cluster path, at no cost). ``relayd.cluster`` implements all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .session import Session

if TYPE_CHECKING:
    from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits


class Presence(Protocol):
    """Who is online, for REST status queries and metrics."""

    async def statuses(self, addresses: list[str]) -> dict[str, bool]:
        """Whether each address has a session (on any instance). Raises StorageUnavailable (cluster)."""
        ...

    async def online_list(self) -> list[str]:
        """Every address with a session (on any instance). Raises StorageUnavailable (cluster)."""
        ...

    def online_count(self) -> int:
        """Addresses with a session on this instance (a gauge per instance)."""
        ...


class Routes(Protocol):
    """The sessions of an address on this instance, for routing frames to them."""

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


@dataclass(frozen=True, slots=True)
class Remote:
    """An address's sessions on other instances: the instances, and whether a session there acks."""

    instances: tuple[str, ...] = ()
    ack: bool = False


NOWHERE = Remote()


@dataclass(frozen=True, slots=True)
class Taken:
    """What other instances did with an offer: how many sessions took it, whether one of them acks, and the
    instances that did not answer in time (they took nothing, as far as the sender knows)."""

    count: int = 0
    ack: bool = False
    silent: tuple[str, ...] = ()


class Elsewhere(Protocol):
    """An address's sessions on the other relayd instances that share one Redis (``relayd.cluster``).

    Every coroutine is bounded in time: an instance that does not answer
    within ``[cluster] reply_timeout_ms`` counts as having taken nothing.
    Those that need Redis raise StorageUnavailable.
    """

    def cached(self, address: str) -> Remote | None:
        """Where ``address`` has sessions elsewhere, when known without asking Redis; None: call ``lookup``."""
        ...

    async def lookup(self, address: str) -> Remote:
        """Ask Redis, and keep the answer until the address's presence changes."""
        ...

    async def offer(self, remote: Remote, msg: QueuedMessage, *, stored: bool) -> Taken:
        """Offer a message to the recipient's ready sessions on ``remote``'s instances and wait for their answers.

        ``stored``: the message is committed (``msg.seq`` set), so an ack
        session may take it; otherwise an instance with an ack session
        takes nothing and says so (the sender must store it first).
        """
        ...

    def offer_soon(self, remote: Remote, msg: QueuedMessage, then: Callable[[Taken], None]) -> None:
        """``offer`` of an unstored message without a coroutine: ``then`` gets the outcome, from the event loop,
        within ``[cluster] reply_timeout_ms`` (the live path's cheap form)."""
        ...

    def push(self, remote: Remote, msg: QueuedMessage) -> None:
        """Send a message delivered here to the recipient's other devices too, without waiting."""
        ...

    async def relay_frame(self, remote: Remote, to: str, frame: dict[str, Any]) -> Taken:
        """Push a frame (a read receipt) to the ready sessions of ``to`` there; how many took it."""
        ...

    def forward(self, remote: Remote, to: str, frame: dict[str, Any]) -> None:
        """Push a frame that is never stored (typing) to the ready sessions of ``to`` there, without waiting."""
        ...

    async def enqueue(self, msg: QueuedMessage, limits: QueueLimits) -> tuple[EnqueueResult, Remote]:
        """Store a message, and read where its recipient has sessions elsewhere in the same atomic step."""
        ...

    async def restore(self, messages: list[QueuedMessage]) -> None:
        """Put back messages a connection never received, and have the recipients' other instances send them."""
        ...

    async def spend(self, key: str, recipient: str, budget: int) -> bool:
        """Record ``recipient`` in the cluster-wide hourly budget ``key``; False when the budget is spent."""
        ...

    async def drain(self, address: str) -> None:
        """Before reading a backlog: the other instances finish what the address's closing sessions there
        sent them (acks, kept messages)."""
        ...

    def evict_unverified(self, address: str) -> None:
        """The address proved ownership: its unsigned sessions on other instances must go."""
        ...

    def key_uploaded(self, address: str) -> None:
        """A key was published for the address: its waiting sessions elsewhere get their backlog."""
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

    async def statuses(self, addresses: list[str]) -> dict[str, bool]:
        return {a: a in self._by_address for a in addresses}

    async def online_list(self) -> list[str]:
        return list(self._by_address)

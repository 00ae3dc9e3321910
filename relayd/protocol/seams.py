"""The typed interfaces between the protocol and what the composition root hands it.

``Routes`` reaches the sessions of an address on this instance, ``Presence``
answers who is online (REST), ``SignInService`` accepts ``auth`` frames,
``MessagePath`` carries messages, receipts and typing to recipients,
``Peers`` is what the protocol tells the other relayd instances, if any, and
``PushRegistry`` keeps push subscriptions (``relayd.push``, or ``NO_PUSH``). One
instance gets ``protocol.presence.LocalPresence``, ``protocol.delivery.Delivery``
and ``NO_PEERS``; several instances get ``relayd.cluster``'s implementations
from ``server.py``. The protocol depends on these and never on the cluster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..config import Config
from ..errors import ErrorCode, RelayError
from ..identity.auth import SignIn
from ..storage.store import QueuedMessage, QueueLimits
from .session import Session


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


class Presence(Protocol):
    """Who is online, for REST status queries and metrics."""

    async def statuses(self, addresses: list[str]) -> dict[str, bool]:
        """Whether each address has a session (on any instance). Raises StorageUnavailable (several instances)."""
        ...

    async def online_list(self) -> list[str]:
        """Every address with a session (on any instance). Raises StorageUnavailable (several instances)."""
        ...

    def online_count(self) -> int:
        """Addresses with a session on this instance (a gauge per instance)."""
        ...


class SignInService(Protocol):
    """What the protocol needs from sign-in; ``identity.auth.Authenticator`` in production."""

    def challenge(self, session_id: int) -> dict[str, Any] | None:
        """The frame to send when a connection opens, or None."""
        ...

    async def sign_in(self, session_id: int, ip: str, address: str, frame: dict[str, Any]) -> SignIn:
        """Accept an ``auth`` frame or raise the refusal as a ``RelayError``."""
        ...

    def forget(self, session_id: int) -> None:
        """The session closed."""
        ...


class MessagePath(Protocol):
    """How ``message``, ``read_receipt`` and ``typing`` frames reach their recipients, and what becomes of
    messages a connection never received. Handlers raise ``RelayError`` for frames they refuse."""

    limits: QueueLimits
    """The per-recipient caps and the storage budget in force."""
    storage_budget: int
    """The store-wide byte budget ``[storage] max_bytes = -1`` stands for, as the server measured it."""
    on_stored: Callable[[str], None]
    """Told the recipient of each message stored because none of its sessions was ready."""

    def configure(self, config: Config) -> None: ...

    def message(self, session: Session, frame: dict[str, Any]) -> Awaitable[None] | None:
        """Route one ``message`` frame (see ``delivery.Delivery.message``)."""
        ...

    def read_receipt(self, session: Session, frame: dict[str, Any]) -> None: ...

    def typing(self, frame: dict[str, Any], to: str) -> None:
        """Push a frame that is never stored to every ready session of ``to``."""
        ...

    def undelivered(self, session: Session, messages: list[QueuedMessage]) -> None:
        """A plain session's connection ended before these messages' bytes reached its peer."""
        ...

    def closed(self, session: Session) -> None: ...

    def in_flight(self, session: Session) -> int:
        """How many of ``session``'s messages are being stored (or wait for its stores) and not yet answered."""
        ...

    async def settle(self) -> None:
        """Wait for every message and receipt still being stored (tests, shutdown)."""
        ...


class Peers(Protocol):
    """What the protocol tells its peers, the other relayd instances sharing its storage (nothing on one instance)."""

    async def drain(self, address: str) -> None:
        """Before reading a backlog: the instances holding the address's closing sessions finish what those
        sessions sent them (acks, kept messages). Bounded in time."""
        ...

    def evict_unverified(self, address: str) -> None:
        """The address proved ownership: its unsigned sessions on peers must go."""
        ...

    def key_uploaded(self, address: str) -> None:
        """A key was published for the address: its waiting sessions on peers get their backlog."""
        ...


class _NoPeers:
    """``Peers`` of a single instance: there is nobody to tell."""

    async def drain(self, address: str) -> None:
        return None

    def evict_unverified(self, address: str) -> None:
        return None

    def key_uploaded(self, address: str) -> None:
        return None


NO_PEERS: Peers = _NoPeers()


class PushRegistry(Protocol):
    """Push subscriptions of addresses: ``relayd.push.service.PushService`` when ``[push] enabled``."""

    async def subscribe(self, address: str, ip: str, frame: dict[str, Any]) -> str:
        """Register the subscription a ``push_subscribe`` frame from ``ip`` describes; returns its id. Raises
        RelayError."""
        ...

    async def unsubscribe(self, address: str, sub_id: str) -> bool:
        """Remove one subscription of ``address``; False when it has none with that id."""
        ...

    def signed_in(self, address: str) -> None:
        """A session of ``address`` signed in (its subscriptions stay alive). Never waits."""
        ...


class _NoPush:
    """``PushRegistry`` of a relay without push notifications."""

    async def subscribe(self, address: str, ip: str, frame: dict[str, Any]) -> str:
        raise RelayError(ErrorCode.PUSH_DISABLED)

    async def unsubscribe(self, address: str, sub_id: str) -> bool:
        raise RelayError(ErrorCode.PUSH_DISABLED)

    def signed_in(self, address: str) -> None:
        return None


NO_PUSH: PushRegistry = _NoPush()

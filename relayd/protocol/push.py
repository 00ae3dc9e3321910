"""The ``push_subscribe`` and ``push_unsubscribe`` frames: who may subscribe an address, and the answers.

By default (``[push] require_verified``) only a session that proved its address may: a session that merely
claims an address must not learn when its owner receives messages, nor silence the owner's devices.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import ErrorCode, RelayError
from .seams import PushRegistry
from .session import Session

MAX_ID_CHARS = 64


class PushFrames:
    def __init__(self, config: Config, registry: PushRegistry) -> None:
        self.registry = registry
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.require_verified = config.push.require_verified

    def _address(self, session: Session) -> str:
        assert session.address is not None
        if self.require_verified and not session.verified:
            raise RelayError(ErrorCode.PUSH_VERIFIED_ONLY)
        return session.address

    async def subscribe(self, session: Session, frame: dict[str, Any]) -> None:
        sub_id = await self.registry.subscribe(self._address(session), session.ip, frame)
        session.send({"type": "push_subscribed", "id": sub_id})

    async def unsubscribe(self, session: Session, frame: dict[str, Any]) -> None:
        sub_id = frame.get("id")
        if sub_id is None:
            raise RelayError(ErrorCode.MISSING_FIELD, "Missing field: id")
        if not isinstance(sub_id, str) or not 0 < len(sub_id) <= MAX_ID_CHARS:
            raise RelayError(ErrorCode.INVALID_FIELD, "id must be a subscription id (a string)")
        if not await self.registry.unsubscribe(self._address(session), sub_id):
            raise RelayError(ErrorCode.SUBSCRIPTION_NOT_FOUND)
        session.send({"type": "push_unsubscribed", "id": sub_id})

"""The protocol calls of the client: send with its matched answer, ping, ack, typing, read receipts."""

from __future__ import annotations

import asyncio
import time
import uuid

from .errors import ClientError
from .values import MAX_ACK_IDS, Frame


def _now_ms() -> int:
    return int(time.time() * 1000)


class MessagingCalls:
    """Frame helpers of ``RelayClient``; need ``send_frame``, ``_wait`` and the ``_pending``/``_pongs`` waiters
    that its reader resolves."""

    async def send(self, to: str, content: str, *, message_id: str | None = None,
                   timestamp: int | None = None, timeout: float | None = None) -> Frame:
        """Send a message and return the relay's answer: ``delivered``, ``queued`` or ``error``.

        Resending the same ``message_id`` after a lost answer is safe: the relay
        answers again and delivers once. Raises ClientTimeout or ConnectionLost.
        """
        mid = message_id or str(uuid.uuid4())
        if mid in self._pending:
            raise ClientError(f"message {mid} is already awaiting its answer")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[mid] = future
        try:
            await self.send_frame({"type": "message", "to": to, "content": content, "messageId": mid,
                                   "timestamp": _now_ms() if timestamp is None else timestamp})
            return await self._wait(future, f"the answer to message {mid}", timeout)
        finally:
            self._pending.pop(mid, None)

    async def ping(self, timeout: float | None = None) -> Frame:
        """Application-level ping; returns the ``pong`` frame."""
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        try:
            await self.send_frame({"type": "ping"})
            return await self._wait(future, "pong", timeout)
        finally:
            if future in self._pongs:
                self._pongs.remove(future)

    async def ack(self, message_ids: list[str]) -> None:
        """Acknowledge received messages (ack mode), in frames of at most 1000 ids."""
        for start in range(0, len(message_ids), MAX_ACK_IDS):
            await self.send_frame({"type": "ack", "messageIds": list(message_ids[start:start + MAX_ACK_IDS])})

    async def typing(self, to: str, is_typing: bool = True) -> None:
        await self.send_frame({"type": "typing", "to": to, "isTyping": is_typing})

    async def read_receipt(self, to: str, message_id: str) -> None:
        """Tell ``to`` (the sender) that its message ``message_id`` was read."""
        await self.send_frame({"type": "read_receipt", "to": to, "messageId": message_id})

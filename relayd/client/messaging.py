"""The protocol calls of the client: send with its matched answer, ping, ack, typing, read receipts."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Awaitable, Callable

from .errors import ClientError, ClientTimeout
from .values import MAX_ACK_IDS, Deadline, Frame

SendFrame = Callable[[Frame, Deadline], Awaitable[None]]


def _now_ms() -> int:
    return int(time.time() * 1000)


PUSH_ANSWERS = ("push_subscribed", "push_unsubscribed")
PUSH_REFUSALS = frozenset({"push_disabled", "push_provider_unavailable", "push_verified_only", "invalid_subscription",
                           "endpoint_not_allowed", "subscription_not_found", "missing_field", "invalid_field",
                           "storage_unavailable", "internal_error"})
"""Error codes that answer a push frame (the relay answers push frames in order, without a messageId)."""


class AnswerWaiters:
    """Calls awaiting their answer frame: a ``send`` by its messageId, a ``ping`` or a push frame in order.

    The connection's reader offers every frame to ``resolve``; when the
    connection ends, ``fail_all`` gives each waiter the reason.
    """

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._pongs: collections.deque[asyncio.Future[Frame]] = collections.deque()
        self._push: collections.deque[asyncio.Future[Frame]] = collections.deque()

    def expect_push(self) -> asyncio.Future[Frame]:
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._push.append(future)
        return future

    def forget_push(self, future: asyncio.Future[Frame]) -> None:
        if future in self._push:
            self._push.remove(future)

    def expect_answer(self, message_id: str) -> asyncio.Future[Frame]:
        if message_id in self._pending:
            raise ClientError(f"message {message_id} is already awaiting its answer")
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        return future

    def forget_answer(self, message_id: str) -> None:
        self._pending.pop(message_id, None)

    def expect_pong(self) -> asyncio.Future[Frame]:
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        return future

    def forget_pong(self, future: asyncio.Future[Frame]) -> None:
        if future in self._pongs:
            self._pongs.remove(future)

    def resolve(self, frame: Frame) -> bool:
        """Hand ``frame`` to the call awaiting it; False when it is nobody's answer."""
        ftype = frame.get("type")
        mid = frame.get("messageId")
        if ftype in ("delivered", "queued", "error") and isinstance(mid, str) and mid in self._pending:
            future = self._pending.pop(mid)
        elif ftype == "pong" and self._pongs:
            future = self._pongs.popleft()
        elif self._push and (ftype in PUSH_ANSWERS or (ftype == "error" and mid is None
                                                        and frame.get("code") in PUSH_REFUSALS)):
            future = self._push.popleft()
        else:
            return False
        if not future.done():
            future.set_result(frame)
        return True

    def fail_all(self, error: ClientError) -> None:
        for future in [*self._pending.values(), *self._pongs, *self._push]:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._pongs.clear()
        self._push.clear()


class Messaging:
    """Frames the client sends, each call bounded as a whole by ``timeout`` (or the call's own).

    ``send_frame`` writes one frame on the live connection by a deadline;
    ``waiters`` is where the connection's reader delivers the answers.
    """

    def __init__(self, send_frame: SendFrame, waiters: AnswerWaiters, timeout: float) -> None:
        self._send_frame = send_frame
        self.waiters = waiters
        self.timeout = timeout

    def deadline(self, timeout: float | None = None) -> Deadline:
        return Deadline(self.timeout if timeout is None else timeout)

    async def _answer(self, future: asyncio.Future[Frame], what: str, deadline: Deadline) -> Frame:
        try:
            async with asyncio.timeout_at(deadline.at):
                return await asyncio.shield(future)
        except TimeoutError:
            raise ClientTimeout(f"timeout waiting for {what} after {deadline.seconds:g} s") from None

    async def send(self, to: str, content: str, *, message_id: str | None = None,
                   timestamp: int | None = None, timeout: float | None = None) -> Frame:
        """Send a message and return the relay's answer: ``delivered``, ``queued`` or ``error``.

        Resending the same ``message_id`` after a lost answer is safe: the relay
        answers again and delivers once. Raises ClientTimeout or ConnectionLost.
        """
        deadline = self.deadline(timeout)
        mid = message_id or str(uuid.uuid4())
        future = self.waiters.expect_answer(mid)
        try:
            await self._send_frame({"type": "message", "to": to, "content": content, "messageId": mid,
                                    "timestamp": _now_ms() if timestamp is None else timestamp}, deadline)
            return await self._answer(future, f"the answer to message {mid}", deadline)
        finally:
            self.waiters.forget_answer(mid)

    async def ping(self, timeout: float | None = None) -> Frame:
        """Application-level ping; returns the ``pong`` frame."""
        deadline = self.deadline(timeout)
        future = self.waiters.expect_pong()
        try:
            await self._send_frame({"type": "ping"}, deadline)
            return await self._answer(future, "pong", deadline)
        finally:
            self.waiters.forget_pong(future)

    async def ack(self, message_ids: list[str]) -> None:
        """Acknowledge received messages (ack mode), in frames of at most 1000 ids."""
        deadline = self.deadline()
        for start in range(0, len(message_ids), MAX_ACK_IDS):
            await self._send_frame({"type": "ack", "messageIds": list(message_ids[start:start + MAX_ACK_IDS])},
                                   deadline)

    async def typing(self, to: str, is_typing: bool = True) -> None:
        await self._send_frame({"type": "typing", "to": to, "isTyping": is_typing}, self.deadline())

    async def read_receipt(self, to: str, message_id: str) -> None:
        """Tell ``to`` (the sender) that its message ``message_id`` was read."""
        await self._send_frame({"type": "read_receipt", "to": to, "messageId": message_id}, self.deadline())

    async def push(self, frame: Frame, timeout: float | None = None) -> Frame:
        """Send a ``push_subscribe``/``push_unsubscribe`` frame; returns its answer or the error frame."""
        deadline = self.deadline(timeout)
        future = self.waiters.expect_push()
        try:
            await self._send_frame(frame, deadline)
            return await self._answer(future, f"the answer to {frame.get('type')}", deadline)
        finally:
            self.waiters.forget_push(future)

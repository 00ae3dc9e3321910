"""Frames received and not yet read by the application, bounded in count and bytes."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from .errors import ClientError, ClientTimeout, ConnectionLost
from .values import Deadline, Frame


class Inbox:
    """The unread frames of one connection, then the reason it ended.

    ``put`` waits while ``max_frames`` frames or ``max_bytes`` bytes are
    unread, so a slow application pushes back on the relay (the reader stops
    reading the socket) instead of filling memory.
    """

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: asyncio.Queue[tuple[Frame, int]] = asyncio.Queue()
        self._bytes = 0
        self._room = asyncio.Event()
        self._arrived = asyncio.Event()
        self._end: ClientError | None = None

    @property
    def ended(self) -> bool:
        """Whether every frame was read and the connection is over."""
        return self._end is not None and self._frames.empty()

    async def put(self, frame: Frame, size: int) -> None:
        while self._frames.qsize() >= self.max_frames or (self._bytes + size > self.max_bytes
                                                          and not self._frames.empty()):
            self._room.clear()
            await self._room.wait()
        self._frames.put_nowait((frame, size))
        self._bytes += size
        self._arrived.set()

    def end(self, reason: ClientError) -> None:
        """No more frames will come; once the unread ones are read, reads raise ``reason``."""
        if self._end is None:
            self._end = reason
        self._arrived.set()

    def _take(self) -> Frame | None:
        if self._frames.empty():
            return None
        frame, size = self._frames.get_nowait()
        self._bytes -= size
        self._room.set()
        return frame

    async def get(self, deadline: Deadline | None, what: str = "a frame") -> Frame:
        """The next frame; raises the end reason after the last one, ClientTimeout at ``deadline``."""
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if self._end is not None:
                raise self._end
            self._arrived.clear()
            if deadline is None:
                await self._arrived.wait()
                continue
            try:
                async with asyncio.timeout_at(deadline.at):
                    await self._arrived.wait()
            except TimeoutError:
                raise ClientTimeout(f"timeout waiting for {what} after {deadline.seconds:g} s") from None

    async def get_matching(self, match: Callable[[Frame], bool], what: str, deadline: Deadline) -> Frame:
        """The first frame ``match`` accepts, discarding others, by one deadline overall."""
        while True:
            frame = await self.get(deadline, what)
            if match(frame):
                return frame

    async def frames(self) -> AsyncIterator[Frame]:
        """Every frame until the connection ended (normally or not)."""
        while True:
            try:
                yield await self.get(None)
            except ConnectionLost:
                return


def closed_inbox(reason: ClientError) -> Inbox:
    """An inbox with nothing in it and nothing to come: what a client has before it connects."""
    inbox = Inbox(1, 1)
    inbox.end(reason)
    return inbox

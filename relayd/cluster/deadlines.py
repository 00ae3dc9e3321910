"""Time limits of one fixed length for many awaits at once, under one timer.

``asyncio.timeout`` puts a timer in the event loop's heap for every await it
guards; each push and pop there compares timer handles in Python, so with
thousands of messages being stored at once a timer per message cost about a
twentieth of a queued message's CPU. Limits that all have the same length
expire in the order they were set: a deque and one timer for the oldest one
do the same work. Same semantics as ``asyncio.timeout``: the task is
cancelled when its limit expires, and the ``CancelledError`` becomes
``TimeoutError`` when it leaves the block. Entering and leaving wait for
nothing, so a limit is a plain ``with`` block, not two more coroutines for
every stored message.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType

_ACTIVE, _LEFT, _EXPIRED = 0, 1, 2
EARLY_S = 0.001
"""The loop runs a timer up to its clock's resolution early; limits due that soon expire in the same run."""


class Limit:
    """One ``with`` block under ``Deadlines``."""

    __slots__ = ("when", "task", "cancelling", "state")

    def __init__(self, when: float, task: asyncio.Task[object]) -> None:
        self.when = when
        self.task = task
        self.cancelling = task.cancelling()
        self.state = _ACTIVE

    def __enter__(self) -> Limit:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.state == _EXPIRED:
            if self.task.uncancel() <= self.cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        self.state = _LEFT


class Deadlines:
    """``limit()`` guards a block for ``within_s`` seconds; every limit shares one timer."""

    def __init__(self, within_s: float) -> None:
        self.within_s = within_s
        self._limits: collections.deque[Limit] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._limits)

    def limit(self) -> Limit:
        """A limit for the current task (``with deadlines.limit():``), ending ``within_s`` from now."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadlines.limit() must be used inside a task")
        loop = asyncio.get_running_loop()
        limits = self._limits
        while limits and limits[0].state == _LEFT:  # most blocks end in the order they began
            limits.popleft()
        limit = Limit(loop.time() + self.within_s, task)
        limits.append(limit)
        if self._timer is None:
            self._timer = loop.call_at(limit.when, self._expire)
        return limit

    def _expire(self) -> None:
        self._timer = None
        limits = self._limits
        loop = asyncio.get_running_loop()
        now = loop.time() + EARLY_S
        while limits and (limits[0].when <= now or limits[0].state == _LEFT):
            limit = limits.popleft()
            if limit.state == _ACTIVE and not limit.task.done():
                limit.state = _EXPIRED
                limit.task.cancel()
        if limits:
            self._timer = loop.call_at(limits[0].when, self._expire)

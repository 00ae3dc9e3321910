"""This instance's view of what the database holds (messages, budget bytes), kept without double counting.

Writes report their changes after they commit; a fresh read of the totals
from the database is taken only when no write was in flight while it ran,
since such a write may be in the read and then be added again.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Totals:
    """Messages and budget bytes (content, receipts, keys), with the writes in flight that may change them."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self._in_flight = 0
        self._epoch = 0
        self.stale = False

    def begin(self) -> None:
        """A write that changes the totals is about to run."""
        self._in_flight += 1
        self._epoch += 1

    def end(self, messages: int = 0, nbytes: int = 0) -> None:
        """That write is over (``messages``/``nbytes``: what it changed, 0 when it failed)."""
        self._in_flight -= 1
        self._epoch += 1
        self.messages += messages
        self.bytes += nbytes

    def mark(self) -> int | None:
        """Before reading the totals: a token for ``refresh``, or None when a write is in flight."""
        return None if self._in_flight else self._epoch

    def refresh(self, mark: int | None, messages: int, nbytes: int) -> bool:
        """Take totals read since ``mark`` unless a write ran meanwhile; whether they were taken."""
        if mark is None or self._in_flight or self._epoch != mark:
            return False
        self.messages, self.bytes, self.stale = messages, nbytes, False
        return True

    async def sized(self, run: Awaitable[tuple[T, int]]) -> T:
        """Await a write returning (value, change of the budget bytes) and count the change once."""
        self.begin()
        delta = 0
        try:
            value, delta = await run
            return value
        finally:
            self.end(0, delta)

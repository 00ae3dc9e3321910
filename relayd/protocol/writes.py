"""Store writes still on their way per address, so a backlog read can wait for them first."""

from __future__ import annotations

import asyncio
from typing import Any


class AddressWrites:
    """The newest pending write that changes each address's stored data (acks, receipts, restores).

    The stores apply one address's writes in the order they were submitted,
    so awaiting the newest one means every earlier one has landed too.
    """

    def __init__(self) -> None:
        self._newest: dict[str, asyncio.Future[Any]] = {}

    def note(self, address: str, write: asyncio.Future[Any]) -> None:
        self._newest[address] = write
        write.add_done_callback(lambda done: self._forget(address, done))

    def _forget(self, address: str, done: asyncio.Future[Any]) -> None:
        if self._newest.get(address) is done:
            del self._newest[address]

    def pending(self, address: str) -> bool:
        """Whether a write noted for ``address`` is still on its way."""
        return address in self._newest

    async def landed(self, address: str) -> None:
        """Return once every write noted for ``address`` so far has finished (failed ones too)."""
        write = self._newest.get(address)
        if write is not None:
            await asyncio.wait([write])

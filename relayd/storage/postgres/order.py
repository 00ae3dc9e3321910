"""One recipient's enqueues applied in the order they were submitted, although the pool runs writes side by side.

The protocol relies on it (``relayd.protocol.writes``): a sender's pipelined
messages to one recipient are stored by successive batches, each its own
task; on a pool, a later batch could otherwise take a connection first and
commit its seqs before the earlier one. Enqueues for disjoint recipients
still run in parallel. (Only enqueues are ordered so: deletes and receipts
keep running side by side, as before.)

A write that waited for earlier ones past its deadline (the link's
``bounded``) fails without being sent, once they have ended: the answers of
one recipient's writes keep their order too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class AddressOrder:
    """Each write waits for the writes submitted before it that touch one of its addresses."""

    def __init__(self) -> None:
        self._last: dict[str, asyncio.Future[None]] = {}

    async def run(self, addresses: Iterable[str], job: Callable[[], Awaitable[T]]) -> T:
        """Await ``job()`` once every earlier write of ``addresses`` is over (failed or cancelled ones too).

        Its place is taken when this coroutine starts, before it first waits."""
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        touched = set(addresses)
        earlier = [prev for a in touched if (prev := self._last.get(a)) is not None]
        for address in touched:
            self._last[address] = mine
        try:
            if earlier:
                await asyncio.wait(earlier)
            return await job()
        finally:
            mine.set_result(None)
            for address in touched:
                if self._last.get(address) is mine:
                    del self._last[address]

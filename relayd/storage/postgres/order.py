"""One recipient's enqueues applied in the order they were submitted, although the pool runs writes side by side.

The protocol relies on it (``relayd.protocol.writes``): a sender's pipelined
messages to one recipient are stored by successive batches, each its own
task; on a pool, a later batch could otherwise take a connection first and
commit its seqs before the earlier one. Enqueues for disjoint recipients
still run in parallel. (Only enqueues are ordered so: deletes and receipts
keep running side by side, as before.)

A write waits for the earlier ones only until its deadline (the link's
``bounded``): past it, it fails without being sent (``late()``), and the
writes after it still wait for those earlier ones to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class AddressOrder:
    """Each write waits for the writes submitted before it that touch one of its addresses; ``late()`` is the
    error of one that waited past its deadline."""

    def __init__(self, late: Callable[[], Exception]) -> None:
        self._last: dict[str, asyncio.Future[None]] = {}
        self._late = late

    async def run(self, addresses: Iterable[str], job: Callable[[], Awaitable[T]], until: float | None = None) -> T:
        """Await ``job()`` once every earlier write of ``addresses`` is over (failed or cancelled ones too); raise
        ``late()`` instead when they are not over by ``until`` (the loop's clock).

        Its place is taken when this coroutine starts, before it first waits."""
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        touched = set(addresses)
        earlier = [prev for a in touched if (prev := self._last.get(a)) is not None]
        for address in touched:
            self._last[address] = mine
        pending: set[asyncio.Future[None]] = set()
        try:
            if earlier:
                _, pending = await asyncio.wait(earlier, timeout=None if until is None else until - loop.time())
                if pending:
                    raise self._late()
            return await job()
        finally:
            if pending:  # the writes after this one still start after the earlier ones
                asyncio.gather(*pending).add_done_callback(lambda _: self._over(mine, touched))
            else:
                self._over(mine, touched)

    def _over(self, mine: asyncio.Future[None], touched: set[str]) -> None:
        mine.set_result(None)
        for address in touched:
            if self._last.get(address) is mine:
                del self._last[address]

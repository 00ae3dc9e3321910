"""The hourly new-queue budgets (``protocol.budgets``) for the whole cluster, counted in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..protocol.budgets import NewQueueBudget, spent
from ..storage.store import StorageUnavailable

Spend = Callable[[str, str, int], Awaitable[bool]]
"""``spend(key, recipient, budget)``: record ``recipient`` in a cluster-wide budget; False when it is spent."""


class ClusterBudget:
    """Recipients already counted this hour on this instance need no round trip; others are counted in Redis."""

    def __init__(self, config: Config, clock: Clock, spend: Spend) -> None:
        self.local = NewQueueBudget(config, clock.monotonic())
        self.clock = clock
        self._spend = spend

    def configure(self, config: Config) -> None:
        self.local.configure(config)

    async def spend(self, sender: str, ip: str, to: str, message_id: str) -> None:
        """Count a message for offline ``to``; raises ``RATE_LIMITED``, or ``STORAGE_UNAVAILABLE`` when Redis
        cannot say."""
        spends = [(key, budget) for key, budget in self.local.budgets(sender, ip, self.clock.monotonic())
                  if not self.local.counted(key, to)]
        if not spends:
            return
        try:  # together: one round trip
            allowed = await asyncio.gather(*(self._spend(key, to, budget) for key, budget in spends))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=message_id) from None
        if not all(allowed):
            raise spent(message_id)
        self.local.record([key for key, _ in spends], to)

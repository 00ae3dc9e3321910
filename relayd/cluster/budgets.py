"""The hourly budgets for offline recipients and bytes (``protocol.budgets``) for the whole cluster, counted in
Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..ops.metrics import RelayMetrics
from ..protocol.budgets import NewQueueBudget, OfflineBytes, bytes_spent, spent
from ..storage.store import StorageUnavailable

Spend = Callable[[str, str, int], Awaitable[bool]]
"""``spend(key, recipient, budget)``: record ``recipient`` in a cluster-wide budget; False when it is spent."""
SpendBytes = Callable[[str, int, int], Awaitable[bool]]
"""``spend_bytes(key, size, budget)``: add bytes to a cluster-wide budget; False (nothing added) when spent."""


class ClusterBudget:
    """Recipients already counted this hour on this instance need no round trip; others are counted in Redis."""

    def __init__(self, config: Config, clock: Clock, metrics: RelayMetrics, spend: Spend,
                 spend_bytes: SpendBytes) -> None:
        self.metrics = metrics
        self.local = NewQueueBudget(config, clock.monotonic())
        self.bytes = OfflineBytes(config, clock.monotonic())
        self.clock = clock
        self._spend = spend
        self._spend_bytes = spend_bytes

    def configure(self, config: Config) -> None:
        self.local.configure(config)
        self.bytes.configure(config)

    async def spend(self, sender: str, ip: str, to: str, size: int, message_id: str) -> None:
        """Count a message of ``size`` bytes for offline ``to``; raises ``RATE_LIMITED`` (its message says which
        budget), or ``STORAGE_UNAVAILABLE`` when Redis cannot say. The byte budgets are counted for every
        message, the recipients only when not yet counted here this hour."""
        now = self.clock.monotonic()
        spends = [(key, budget) for key, budget in self.local.budgets(sender, ip, now)
                  if not self.local.counted(key, to)]
        byte_spends = self.bytes.budgets(sender, ip, now)
        if not spends and not byte_spends:
            return
        try:  # together: one round trip
            allowed = await asyncio.gather(
                *(self._spend_bytes(key, size, budget) for key, budget in byte_spends),
                *(self._spend(key, to, budget) for key, budget in spends))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=message_id) from None
        if not all(allowed[:len(byte_spends)]):
            self.metrics.rate_limited.labels(limit="offline_bytes").inc()
            raise bytes_spent(message_id)
        if not all(allowed[len(byte_spends):]):
            self.metrics.rate_limited.labels(limit="new_queues").inc()
            raise spent(message_id)
        self.local.record([key for key, _ in spends], to)

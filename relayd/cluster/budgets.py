"""The hourly budgets for offline recipients (``protocol.budgets``) for the whole cluster, counted on the backplane
(Redis or PostgreSQL); the byte budgets count per instance, like the other per-IP limits (a round trip per stored
message would cost more than the bound is worth)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..clock import Clock
from ..config import Config
from ..errors import RelayError
from ..ops.metrics import RelayMetrics
from ..protocol.budgets import NewQueueBudget, OfflineBytes, spent

Spend = Callable[[str, str, int], Awaitable[bool]]
"""``spend(key, recipient, budget)``: record ``recipient`` in a cluster-wide budget; False when it is spent."""


class ClusterBudget:
    """Recipients already counted this hour on this instance need no round trip; others are counted on the backplane."""

    def __init__(self, config: Config, clock: Clock, metrics: RelayMetrics, spend: Spend,
                 offline_bytes: OfflineBytes) -> None:
        self.metrics = metrics
        self.local = NewQueueBudget(config, clock.monotonic())
        self.bytes = offline_bytes
        """The instance's byte budgets, shared with the receipts it stores."""
        self.clock = clock
        self._spend = spend

    def configure(self, config: Config) -> None:
        self.local.configure(config)
        self.bytes.configure(config)

    def spend(self, sender: str, ip: str, to: str, size: int, message_id: str,
              room: int | None = None) -> Awaitable[None] | None:
        """Count a message of ``size`` bytes for offline ``to``; raises ``RATE_LIMITED`` (its message says which
        budget). None when counted here: recipients already counted this hour (and budgets that are off) need
        no round trip, and no coroutine; else the round trip to await, which raises ``RATE_LIMITED``, or
        ``StorageUnavailable`` when the backplane cannot say. ``room``: see ``protocol.budgets.low_room``."""
        now = self.clock.monotonic()
        try:
            byte_keys = self.bytes.check(sender, ip, size, now, message_id, room)
        except RelayError:
            self.metrics.rate_limited.labels(limit="offline_bytes").inc()
            raise
        spends = [(key, budget) for key, budget in self.local.budgets(sender, ip, now)
                  if not self.local.counted(key, to)]
        if not spends:
            self.bytes.add(byte_keys, size)
            return None
        return self._spend_on_backplane(spends, to, message_id, byte_keys, size)

    async def _spend_on_backplane(self, spends: list[tuple[str, int]], to: str, message_id: str,
                                  byte_keys: list[str], size: int) -> None:
        allowed = await asyncio.gather(*(self._spend(key, to, budget) for key, budget in spends))  # one trip
        if not all(allowed):
            self.metrics.rate_limited.labels(limit="new_queues").inc()
            raise spent(message_id)
        self.local.record([key for key, _ in spends], to)
        self.bytes.add(byte_keys, size)

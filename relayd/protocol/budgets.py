"""How many distinct offline recipients one sender, and one client IP, may start queues for per hour.

Storing for an offline recipient costs disk; without a bound, random ``to``
addresses (or random sender addresses from one IP) would fill it.
``NewQueueBudget`` counts on one instance and is Sans-I/O (the caller passes
the time); ``SharedNewQueueBudget`` counts for several instances in Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..config import Config
from ..ratelimit import limit_key
from ..errors import ErrorCode, RelayError
from ..storage.store import StorageUnavailable

WINDOW_S = 3600.0


class NewQueueBudget:
    """Counts, per sender address and per client IP, the distinct recipients queued for in the current hour."""

    def __init__(self, config: Config, now: float) -> None:
        self._recipients: dict[str, set[str]] = {}
        self._since = now
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.per_sender = config.limits.new_queues_per_sender_per_hour
        self.per_ip = config.limits.new_queues_per_ip_per_hour

    def spend(self, sender: str, ip: str, to: str, now: float, message_id: str) -> None:
        """Count a message for offline ``to``; raise ``RATE_LIMITED`` when it would start one queue too many."""
        budgets = self._budgets(sender, ip, now)
        for key, budget in budgets:
            recipients = self._recipients.get(key)
            if recipients is not None and to not in recipients and len(recipients) >= budget:
                raise _spent(message_id)
        for key, _ in budgets:
            self._recipients.setdefault(key, set()).add(to)

    def _budgets(self, sender: str, ip: str, now: float) -> list[tuple[str, int]]:
        """The budgets that apply, as (key, recipients per hour); the count starts again each hour."""
        if now - self._since >= WINDOW_S:
            self._recipients.clear()
            self._since = now
        return [(key, budget) for key, budget in ((sender, self.per_sender), ("ip " + limit_key(ip), self.per_ip))
                if budget]


class SharedNewQueueBudget(NewQueueBudget):
    """The same budgets for the whole cluster, counted in Redis: ``spend_far(key, recipient, budget)`` records a
    recipient in a budget (False when it is spent). Recipients already counted this hour here need no call."""

    def __init__(self, config: Config, now: float, spend_far: Callable[[str, str, int], Awaitable[bool]]) -> None:
        super().__init__(config, now)
        self.spend_far = spend_far

    async def spend_shared(self, sender: str, ip: str, to: str, now: float, message_id: str) -> None:
        """``spend`` for the cluster; also raises ``STORAGE_UNAVAILABLE`` when Redis cannot say."""
        spends = [(key, budget) for key, budget in self._budgets(sender, ip, now)
                  if to not in self._recipients.get(key, ())]
        if not spends:
            return
        try:  # together: one round trip
            allowed = await asyncio.gather(*(self.spend_far(key, to, budget) for key, budget in spends))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=message_id) from None
        if not all(allowed):
            raise _spent(message_id)
        for key, _ in spends:
            self._recipients.setdefault(key, set()).add(to)


def _spent(message_id: str) -> RelayError:
    return RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour", message_id=message_id)

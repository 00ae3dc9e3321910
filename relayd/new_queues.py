"""How many distinct offline recipients one sender, and one client IP, may start queues for per hour.

Storing for an offline recipient costs disk; without a bound, random ``to``
addresses (or random sender addresses from one IP) would fill it.
``NewQueueBudget`` counts on one instance and is Sans-I/O (the caller passes
the time); ``SharedNewQueueBudget`` counts for several instances in Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .config import Config
from .errors import ErrorCode, RelayError
from .net.clientip import limit_key
from .storage.store import StorageUnavailable

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
        if not (self.per_sender or self.per_ip):
            return
        if now - self._since >= WINDOW_S:
            self._recipients.clear()
            self._since = now
        budgets = ((sender, self.per_sender), ("ip " + limit_key(ip), self.per_ip))
        for key, budget in budgets:
            recipients = self._recipients.get(key)
            if budget and recipients is not None and to not in recipients and len(recipients) >= budget:
                raise RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour",
                                 message_id=message_id)
        for key, budget in budgets:
            if budget:
                self._recipients.setdefault(key, set()).add(to)


class SharedNewQueueBudget:
    """The same budgets for the whole cluster: ``spend_far(key, recipient, budget)`` records a recipient in
    a budget kept in Redis (False when it is spent); recipients already counted this hour here need no call."""

    def __init__(self, budget: NewQueueBudget, spend_far: Callable[[str, str, int], Awaitable[bool]],
                 now: float) -> None:
        self.budget = budget
        self.spend_far = spend_far
        self._seen: dict[str, set[str]] = {}
        self._since = now

    async def spend(self, sender: str, ip: str, to: str, now: float, message_id: str) -> None:
        """Count a message for offline ``to``; raise ``RATE_LIMITED`` when it would start one queue too many,
        ``STORAGE_UNAVAILABLE`` when Redis cannot say."""
        per_sender, per_ip = self.budget.per_sender, self.budget.per_ip
        if not (per_sender or per_ip):
            return
        if now - self._since >= WINDOW_S:
            self._seen.clear()
            self._since = now
        spends = [(key, budget) for key, budget in ((sender, per_sender), ("ip " + limit_key(ip), per_ip))
                  if budget and to not in self._seen.get(key, ())]
        if not spends:
            return
        try:  # together: one round trip
            allowed = await asyncio.gather(*(self.spend_far(key, to, budget) for key, budget in spends))
        except StorageUnavailable:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, message_id=message_id) from None
        if not all(allowed):
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour",
                             message_id=message_id)
        for key, _ in spends:
            self._seen.setdefault(key, set()).add(to)

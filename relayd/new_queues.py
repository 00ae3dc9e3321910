"""How many distinct offline recipients one sender, and one client IP, may start queues for per hour.

Storing for an offline recipient costs disk; without a bound, random ``to``
addresses (or random sender addresses from one IP) would fill it. Sans-I/O:
the caller passes the time.
"""

from __future__ import annotations

from .config import Config
from .errors import ErrorCode, RelayError
from .net.clientip import limit_key

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

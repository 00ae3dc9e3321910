"""What one sender, and one client IP, may queue for offline recipients per hour: distinct recipients, and bytes.

Storing for an offline recipient costs disk (or Redis memory); without a
bound, random ``to`` addresses (or random sender addresses from one IP) would
fill it, and one sender of large messages would fill the storage budget that
every user's offline messages share. ``NewQueueBudget`` counts recipients and
``OfflineBytes`` bytes on one instance, Sans-I/O (the caller passes the
time); ``relayd.cluster.budgets`` counts the same budgets for several
instances.

When the storage budget runs low (less than 1/LOW_ROOM of it free), a sender
or IP may have queued at most 1/SHARE_OF_ROOM of what is left this hour:
whoever is filling the store is refused first, and everyone else's offline
messages keep being queued in the room that stays.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ErrorCode, RelayError
from ..ratelimit import limit_key

WINDOW_S = 3600.0
LOW_ROOM = 4
SHARE_OF_ROOM = 8


def low_room(budget: int, stored: int) -> int | None:
    """The bytes left in the storage budget when less than 1/LOW_ROOM of it is, else None (also without a
    budget)."""
    if not budget or stored < budget - budget // LOW_ROOM:
        return None
    return max(budget - stored, 0)


class NewQueueBudget:
    """Counts, per sender address and per client IP, the distinct recipients queued for in the current hour."""

    def __init__(self, config: Config, now: float) -> None:
        self._recipients: dict[str, set[str]] = {}
        self._since = now
        self.per_sender = 0
        self.per_ip = 0
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.per_sender = config.limits.new_queues_per_sender_per_hour
        self.per_ip = config.limits.new_queues_per_ip_per_hour

    def spend(self, sender: str, ip: str, to: str, now: float, message_id: str) -> None:
        """Count a message for offline ``to``; raise ``RATE_LIMITED`` when it would start one queue too many."""
        budgets = self.budgets(sender, ip, now)
        for key, budget in budgets:
            recipients = self._recipients.get(key)
            if recipients is not None and to not in recipients and len(recipients) >= budget:
                raise spent(message_id)
        self.record([key for key, _ in budgets], to)

    def budgets(self, sender: str, ip: str, now: float) -> list[tuple[str, int]]:
        """The budgets that apply, as (key, recipients per hour); the count starts again each hour."""
        if now - self._since >= WINDOW_S:
            self._recipients.clear()
            self._since = now
        return [(key, budget) for key, budget in ((sender, self.per_sender), ("ip " + limit_key(ip), self.per_ip))
                if budget]

    def counted(self, key: str, to: str) -> bool:
        """Whether ``to`` is already counted in budget ``key`` this hour."""
        return to in self._recipients.get(key, ())

    def record(self, keys: list[str], to: str) -> None:
        """Count ``to`` in these budgets."""
        for key in keys:
            self._recipients.setdefault(key, set()).add(to)


class OfflineBytes:
    """Counts, per sender address and per client IP, the content bytes queued for offline recipients this hour."""

    def __init__(self, config: Config, now: float) -> None:
        self._used: dict[str, int] = {}
        self._since = now
        self.per_sender = 0
        self.per_ip = 0
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.per_sender = config.limits.offline_bytes_per_sender_per_hour
        self.per_ip = config.limits.offline_bytes_per_ip_per_hour

    def budgets(self, sender: str, ip: str, now: float) -> list[tuple[str, int]]:
        """The budgets that apply, as (key, bytes per hour); the count starts again each hour."""
        if now - self._since >= WINDOW_S:
            self._used.clear()
            self._since = now
        return [("b " + sender, self.per_sender), ("b ip " + limit_key(ip), self.per_ip)]

    def check(self, sender: str, ip: str, size: int, now: float, message_id: str,
              room: int | None = None) -> list[str]:
        """Raise ``RATE_LIMITED`` when ``size`` more bytes would pass a budget (0: none), or, with ``room`` (see
        ``low_room``) that ``size`` fits in, 1/SHARE_OF_ROOM of the room; else the keys to ``add`` to. (What does
        not fit at all is the storage budget's refusal, ``storage_unavailable``, for everyone alike.)"""
        share = room // SHARE_OF_ROOM if room is not None and size <= room else None
        budgets = self.budgets(sender, ip, now)
        for key, budget in budgets:
            used = self._used.get(key, 0) + size
            if (budget and used > budget) or (share is not None and used > share):
                raise bytes_spent(message_id)
        return [key for key, _ in budgets]

    def add(self, keys: list[str], size: int) -> None:
        for key in keys:
            self._used[key] = self._used.get(key, 0) + size


def bytes_spent(message_id: str) -> RelayError:
    """The refusal of a message that would pass its sender's (or its IP's) hourly offline byte budget, or its
    share of the storage budget's last room."""
    return RelayError(ErrorCode.RATE_LIMITED, "Too many bytes queued for offline recipients this hour",
                      message_id=message_id)


def spent(message_id: str) -> RelayError:
    """The refusal of a message that would start one offline queue too many this hour."""
    return RelayError(ErrorCode.RATE_LIMITED, "Too many distinct offline recipients this hour", message_id=message_id)

"""The last hour of activity, a sample per minute, for the status page's charts: connections, messages and
refusals (counts only, never an address or an IP).

A ring of 60 completed minutes plus the minute in progress, so a chart moves
as soon as traffic does. Fed by the housekeeping tick; reading it costs a
copy of 60 small tuples.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from .metrics import RelayMetrics

MINUTES = 60
SERIES = ("connections", "messages", "refusals")


@dataclass(slots=True)
class Minute:
    connections: int = 0
    """The most connections open at once during the minute."""
    messages: float = 0.0
    """Messages accepted (delivered live or stored) during the minute."""
    refusals: float = 0.0
    """Messages refused, limit hits and deny-list refusals during the minute."""


class ActivityHistory:
    """Per-minute samples of the last hour; ``tick`` with the monotonic clock, ``series`` to read them."""

    def __init__(self, metrics: RelayMetrics, connections: Callable[[], int], now: float) -> None:
        self.metrics = metrics
        self.connections = connections
        self.done: deque[Minute] = deque(maxlen=MINUTES - 1)
        self.minute = int(now // 60)
        self.current = Minute()
        self.base_messages, self.base_refusals = self._totals()

    def _totals(self) -> tuple[float, float]:
        m = self.metrics
        messages = m.routed_live.value + m.queued.value
        refusals = (sum(m.refused.by_label().values()) + sum(m.rate_limited.by_label().values())
                    + sum(m.access_denied.by_label().values()))
        return messages, refusals

    def tick(self, now: float) -> None:
        """Bring the current minute up to date; close it (and any minutes skipped) when the clock moved on."""
        minute = int(now // 60)
        self._update()
        while self.minute < minute:
            self.done.append(self.current)
            self.base_messages += self.current.messages
            self.base_refusals += self.current.refusals
            self.current = Minute(self.connections())
            self.minute += 1
            if minute - self.minute > MINUTES:  # a long stall: the minutes in between were empty
                self.done.extend(Minute() for _ in range(MINUTES - 1))
                self.minute = minute

    def _update(self) -> None:
        messages, refusals = self._totals()
        cur = self.current
        cur.connections = max(cur.connections, self.connections())
        cur.messages = messages - self.base_messages
        cur.refusals = refusals - self.base_refusals

    def series(self, now: float) -> dict[str, list[float]]:
        """Oldest first, the minute in progress last; missing minutes (a young process) are zeros."""
        self.tick(now)
        minutes = [Minute()] * (MINUTES - 1 - len(self.done)) + list(self.done) + [self.current]
        return {name: [getattr(m, name) for m in minutes] for name in SERIES}

"""Who may open a WebSocket: per client IP, a cap on open connections and a rate of new ones."""

from __future__ import annotations

import logging

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..ops.metrics import RelayMetrics
from ..ratelimit import TokenBucket
from .clientip import limit_key

log = logging.getLogger("relayd.server")


class Admission:
    """Counts open WebSockets per client (an IP, or an IPv6 /64) and refuses past the limits.

    ``admit`` is asked before the upgrade; an admitted connection is counted
    from ``opened`` until ``closed``.
    """

    def __init__(self, config: Config, metrics: RelayMetrics, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self._open: dict[str, int] = {}
        self._arrivals: dict[str, TokenBucket] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.max_open = config.limits.max_connections_per_ip
        self.rate = config.limits.connections_per_ip_per_s

    def admit(self, ip: str) -> RelayError | None:
        """None when ``ip`` may open one more connection, else the refusal (HTTP 429 with Retry-After)."""
        key = limit_key(ip)
        if self.max_open and self._open.get(key, 0) >= self.max_open:
            self.metrics.rate_limited.labels(limit="connections").inc()
            log.debug("connection cap reached for %s", ip)
            return RelayError(ErrorCode.RATE_LIMITED, "Too many open connections from this address",
                              headers=(("Retry-After", "5"),))
        if self.rate:
            now = self.clock.monotonic()
            bucket = self._arrivals.get(key)
            if bucket is None:
                bucket = self._arrivals[key] = TokenBucket(self.rate, self.rate * 2, now)
            if not bucket.take(now):
                self.metrics.rate_limited.labels(limit="connection_rate").inc()
                log.debug("connection rate limit hit by %s", ip)
                return RelayError(ErrorCode.RATE_LIMITED, "Too many new connections from this address",
                                  headers=(("Retry-After", "1"),))
        return None

    def opened(self, ip: str) -> None:
        key = limit_key(ip)
        self._open[key] = self._open.get(key, 0) + 1

    def closed(self, ip: str) -> None:
        key = limit_key(ip)
        left = self._open[key] - 1
        if left:
            self._open[key] = left
        else:
            del self._open[key]

    def sweep(self) -> None:
        """Forget arrival buckets that have refilled, so idle clients cost no memory."""
        now = self.clock.monotonic()
        full = [k for k, b in self._arrivals.items() if now - b.stamp > 2 * b.burst / max(b.rate, 1e-9)]
        for key in full:
            del self._arrivals[key]

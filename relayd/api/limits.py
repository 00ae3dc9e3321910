"""REST budgets per client IP: one for cheap idempotent reads, a tighter one for everything else, one for probes.

Many phones share one public IP behind carrier NAT, and the Idena P2P app
looks up the sender's key once per incoming message per listener, so reads
need a budget a few hundred app users cannot exhaust. Writes (key uploads,
deletions, queue drains), listings and unknown paths stay on the tight one.
Health checks and metrics, which the app never calls, spend a budget of their
own: load balancers and Prometheus are never refused because app users read
a lot, and one IP pipelining ``/metrics`` cannot take the CPU everyone shares.
"""

from __future__ import annotations

import enum
import logging

from ..config import LimitsSection
from ..errors import ErrorCode, RelayError
from ..ops.metrics import RelayMetrics
from ..ratelimit import FixedWindow, retry_after_header
from ..ratelimit import limit_key

log = logging.getLogger("relayd.http")

KEY_BYTES_WINDOW_S = 3600.0


class Budget(enum.Enum):
    """Which per-IP budget a request spends; the value is the metric label of its refusals."""

    READ = "http_reads"
    WRITE = "http"
    PROBE = "http_probes"
    EXEMPT = "exempt"


class RestLimits:
    """The fixed-window budgets of ``[limits]``; ``charge`` raises ``RATE_LIMITED`` with ``Retry-After``."""

    def __init__(self, limits: LimitsSection, metrics: RelayMetrics) -> None:
        self.metrics = metrics
        window = limits.rate_limit_window_ms / 1000
        self._windows = {budget: FixedWindow(limit, window) for budget, limit in self._limits(limits)}
        self.key_bytes = FixedWindow(limits.key_bytes_per_ip_per_hour, KEY_BYTES_WINDOW_S)
        """Bytes of keys uploaded per IP per hour, as the storage budget counts them: uploads of random
        addresses' keys cannot fill the store."""
        self.configure(limits)

    @staticmethod
    def _limits(limits: LimitsSection) -> tuple[tuple[Budget, int], ...]:
        return ((Budget.READ, limits.rate_limit_max_reads), (Budget.WRITE, limits.rate_limit_max_requests),
                (Budget.PROBE, limits.rate_limit_max_probes))

    def configure(self, limits: LimitsSection) -> None:
        """Apply reloaded limits; windows already counting are kept unless their length changed."""
        window = limits.rate_limit_window_ms / 1000
        for budget, limit in self._limits(limits):
            if self._windows[budget].window_s != window:
                self._windows[budget] = FixedWindow(limit, window)
            self._windows[budget].limit = limit
        self.key_bytes.limit = limits.key_bytes_per_ip_per_hour

    def charge(self, budget: Budget, client_ip: str, now: float, cost: int = 1) -> None:
        """Spend ``cost`` of ``client_ip``'s ``budget``, or raise ``RelayError(RATE_LIMITED)``."""
        if budget is Budget.EXEMPT:
            return
        wait = self._windows[budget].hit(limit_key(client_ip), now, cost)
        if wait:
            self.metrics.rate_limited.labels(limit=budget.value).inc()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("REST %s limit hit by %s", budget.name.lower(), client_ip)
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many requests; retry later",
                             headers=(("Retry-After", retry_after_header(wait)),))

    def sweep(self, now: float) -> None:
        """Forget finished windows, so idle clients cost no memory."""
        for window in (*self._windows.values(), self.key_bytes):
            window.sweep(now)

    def charge_key_bytes(self, client_ip: str, now: float, size: int) -> None:
        """Count an uploaded key's bytes for ``client_ip`` this hour, or raise ``RelayError(RATE_LIMITED)``."""
        wait = self.key_bytes.hit(limit_key(client_ip), now, size)
        if wait:
            self.metrics.rate_limited.labels(limit="key_bytes").inc()
            raise RelayError(ErrorCode.RATE_LIMITED, "Too many bytes of keys uploaded from this address this hour; "
                             "retry later", headers=(("Retry-After", retry_after_header(wait)),))

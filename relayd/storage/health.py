"""Whether a store's server (Redis, PostgreSQL) takes writes right now: the last failure, and writes that wait
longer than they should.

Health is what /health/ready reports. A failure (a refusal, a timeout, a lost
connection) makes it unhealthy with a reason until a write succeeds. A hang is
noticed before any timeout fires: a write (the periodic probe's or a client's)
in flight longer than ``overdue_s`` makes it unhealthy at once, so readiness
turns 503 within about a second of Redis (or PostgreSQL) freezing rather than
after ``socket_timeout_s`` (``command_timeout_s``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .store import StorageOutcomeUnknown, StorageUnavailable

log = logging.getLogger("relayd.storage")


class Health:
    """The link's health; ``oldest_write`` tells when the oldest unanswered write was submitted (monotonic)."""

    def __init__(self, overdue_s: float, *, server: str = "Redis", waiting: str = "write") -> None:
        self.overdue_s = overdue_s
        self.server = server
        self.waiting = waiting
        """What ``oldest_write`` tracks, for the reason given."""
        self._problem: str | None = None
        self.on_failure: Callable[[], None] | None = None
        """Called after every failure (the Redis store forgets what it assumed Redis holds)."""
        self.on_recovery: Callable[[], None] | None = None
        """Called when a write succeeds after a failure (``relayd.cluster`` reads its open queues again: notices
        may have been lost meanwhile; the PostgreSQL store reads its totals again)."""
        self.oldest_write: Callable[[], float | None] = lambda: None
        """When the oldest unanswered write was submitted (Redis's ordered write queue says; None: unknown). It
        never moves back: writes are submitted at the time they are, and answering one leaves only later ones."""
        self._answered_before = 0.0
        """Every write submitted before this (monotonic) was answered when ``problem`` last asked: until
        ``overdue_s`` after it, no write can be overdue, and ``problem`` (asked before each stored message) does
        not walk the writes again."""

    @property
    def healthy(self) -> bool:
        return self.problem is None

    @property
    def failure(self) -> str | None:
        """The last failure's reason until a write succeeds; unlike ``problem``, not a write that is merely slow
        (a link that answers slowly still carries what else is sent on it)."""
        return self._problem

    @property
    def problem(self) -> str | None:
        if self._problem is not None:
            return self._problem
        now = time.monotonic()
        if now - self._answered_before <= self.overdue_s:
            return None
        since = self.oldest_write()
        self._answered_before = now if since is None else since
        if since is not None and now - since > self.overdue_s:
            return f"a {self.server} {self.waiting} has waited {now - since:.1f} s for an answer ({self.server} hangs?)"
        return None

    def fail(self, reason: str, *, unknown: bool = False) -> StorageUnavailable:
        """Mark the link unhealthy; returns the error to raise: ``StorageOutcomeUnknown`` when the write was sent
        (it may have been applied), else ``StorageUnavailable``."""
        if reason != self._problem:
            log.error("storage unavailable: %s", reason)
        self._problem = reason
        if self.on_failure is not None:
            self.on_failure()
        return StorageOutcomeUnknown(reason) if unknown else StorageUnavailable(reason)

    def succeeded(self) -> None:
        if self._problem is None:
            return
        log.warning("storage recovered (was: %s)", self._problem)
        self._problem = None
        if self.on_recovery is not None:
            self.on_recovery()

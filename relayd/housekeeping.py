"""The relay's one timer: session timers, clock steps, retention expiry, limit sweeps, queue stats, the activity
summary, watchdog ticks.

One task wakes every ``tick`` seconds instead of a timer per connection or
per job, so ten thousand idle connections cost no timers at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .clock import Clock, wall_ms
from .config import Config
from .ops.allocator import release_free_memory
from .ops.metrics import RelayMetrics
from .ops.summary import ActivitySummary
from .storage.store import HistoryStore, Store

log = logging.getLogger("relayd.server")

STATS_INTERVAL_S = 15.0
CLOCK_STEP_S = 60.0
"""A wall clock that moves this much more or less than the monotonic clock between two ticks has stepped
(NTP's first sync on a Raspberry Pi without a hardware clock, an operator's date command); slewing is slower."""
SWEEP_INTERVAL_S = 60.0
MIN_TICK_S = 0.02


class Housekeeping:
    """Runs periodic jobs on the event loop; see the module docstring.

    ``tick_callbacks`` run on every tick with the loop's time, so a stalled
    loop stops them (the systemd watchdog relies on that).
    """

    def __init__(self, config: Config, store: Store, metrics: RelayMetrics, clock: Clock, *,
                 sweepers: list[Callable[[], None]]) -> None:
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.sweepers = sweepers
        self.summary = ActivitySummary(metrics)
        self.tick_callbacks: list[Callable[[float], None]] = []
        self.max_tick = 1.0
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._wall_offset = clock.wall() - clock.monotonic()
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.auth_timeout = config.server.auth_timeout_s
        self.retention_ms = int(config.queue.message_retention_hours * 3_600_000)
        self.unsigned_key_ttl_ms = int(config.storage.unsigned_key_ttl_days * 86_400_000)
        self.expiry_interval = config.queue.expiry_interval_s
        self.sweep_interval = min(SWEEP_INTERVAL_S, config.limits.rate_limit_window_ms / 1000)
        self.summary_interval = config.log.summary_interval_s

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop(self) -> None:
        """Cancel the jobs, and end the loop at its next tick should a job swallow the cancellation (a library
        that catches it, or ``asyncio.timeout`` on Python 3.11 when its deadline and the cancel coincide): the
        loop then ran on, and ``asyncio.run`` waited for it forever at exit."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_expiry = next_sweep = next_stats = 0.0
        last_summary = loop.time()
        while True:
            tick = max(MIN_TICK_S, min(self.max_tick, self.auth_timeout / 4))
            planned = loop.time() + tick
            await asyncio.sleep(tick)
            if self._stopped:
                return
            now = loop.time()
            self.metrics.loop_lag.observe(max(0.0, now - planned))
            await self._follow_clock_steps()
            for callback in self.tick_callbacks:
                callback(now)
            if now >= next_sweep:
                next_sweep = now + self.sweep_interval
                for sweep in self.sweepers:
                    sweep()
            if now >= next_expiry:
                next_expiry = now + self.expiry_interval
                await self._expire_messages()
                await self._expire_history()
            if now >= next_stats:
                next_stats = now + STATS_INTERVAL_S
                await self._refresh_queue_stats()
                release_free_memory()
            if self.summary_interval and now - last_summary >= self.summary_interval:
                log.info("%s", self.summary.line(now - last_summary))
                last_summary = now

    async def _follow_clock_steps(self) -> None:
        """Keep what is stored as old as it really is when the wall clock steps.

        Retention compares stored times with the wall clock, so a clock that
        jumps 30 days forward would expire everything at once. The step is
        measured against the monotonic clock, and the times stored before it
        move forward by as much. A step back is not undone: what was stored
        before it is kept longer than its retention, by at most the step.
        """
        offset = self.clock.wall() - self.clock.monotonic()
        step = offset - self._wall_offset
        if abs(step) < CLOCK_STEP_S:
            self._wall_offset = offset  # slewing and drift: follow along
            return
        if step < 0:
            log.warning("the wall clock stepped back by %.0f s; what was stored before is kept that much longer",
                        -step)
            self._wall_offset = offset
            return
        now = wall_ms(self.clock)
        log.warning("the wall clock stepped forward by %.0f s; stored messages keep their age", step)
        try:
            moved = await self.store.shift_times(now - int(step * 1000) + 1, int(step * 1000))
        except Exception as exc:
            log.error("cannot move stored times after a clock step: %s", exc)
            return
        self._wall_offset = offset
        log.info("moved the stored times of %d messages and receipts by %+.0f s", moved, step)

    async def _refresh_queue_stats(self) -> None:
        """Byte and recipient totals take a table scan, so metrics read a recent copy."""
        try:
            stats = await self.store.stats()
        except Exception as exc:
            log.debug("queue statistics unavailable: %s", exc)
            return
        self.metrics.queue_bytes.set(stats["bytes"])
        self.metrics.queue_recipients.set(stats["recipients"])
        self.metrics.queue_receipts.set(stats["receipts"])

    async def _expire_history(self) -> None:
        """Forget kept messages past ``[history] days`` (also after history was turned off: they still go)."""
        if not isinstance(self.store, HistoryStore):
            return
        try:
            removed = await self.store.expire_history(wall_ms(self.clock))
        except Exception as exc:
            log.error("history expiry failed: %s", exc)
            return
        if removed:
            log.info("forgot %d kept messages past [history] days", removed)

    async def _expire_messages(self) -> None:
        cutoff = wall_ms(self.clock) - self.retention_ms
        try:
            removed = await self.store.expire(cutoff)
        except Exception as exc:
            log.error("retention expiry failed: %s", exc)
            return
        if removed:
            self.metrics.expired.inc(removed)
            log.info("expired %d queued messages past retention", removed)
        if self.unsigned_key_ttl_ms:
            await self._expire_keys()

    async def _expire_keys(self) -> None:
        now = wall_ms(self.clock)
        try:
            removed = await self.store.expire_keys(now - self.unsigned_key_ttl_ms, now)
        except Exception as exc:
            log.error("expiry of unused unsigned keys failed: %s", exc)
            return
        if removed:
            log.info("expired %d unsigned keys nobody uploaded or looked up for %g days", removed,
                     self.unsigned_key_ttl_ms / 86_400_000)

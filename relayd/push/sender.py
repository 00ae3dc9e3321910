"""Sending pushes: a bounded queue in memory, a few workers, collapse, retries and removal of dead subscriptions.

The message path only calls ``notify(address)``, which never waits: the address joins a bounded queue (past
``[push] queue_size`` the oldest waiting entry is dropped and counted), and a worker later reads the
address's subscriptions and queue size and sends each subscription one wake-up. A subscription pushed less
than ``min_interval_s`` ago, or told by its service to wait (``Retry-After``), is skipped: a burst of messages
is one notification. Answers: 2xx sent; an answer its provider documents as "this target is gone for good"
(``Provider.gone``: Web Push 404/410, FCM ``UNREGISTERED`` or an invalid token, APNs 410) deletes the
subscription; 429/503 retried after ``Retry-After``; other 5xx, timeouts and network errors retried with
exponential backoff, at most ``max_attempts`` attempts, never waiting more than ``max_backoff_s``; any other
4xx failed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from ..clock import Clock, wall_ms
from ..config.schema import PushSection
from ..errors import RelayError
from ..ops.metrics import RelayMetrics
from ..storage.store import PushSubscription, StorageUnavailable, Store
from .http import Response

log = logging.getLogger("relayd.push")

COLLAPSE_KEY = "wake"
"""Web Push ``Topic``, FCM ``collapse_key``, APNs ``apns-collapse-id``: a newer wake-up replaces an older one."""
FIRST_BACKOFF_S = 1.0


class Provider(Protocol):
    name: str

    async def send(self, sub: PushSubscription, payload: dict[str, Any], collapse: str) -> Response:
        """Send one push; raises OSError/TimeoutError when no answer came, RelayError when the target is refused."""
        ...

    def gone(self, answer: Response) -> bool:
        """Whether ``answer`` says the subscription will never receive a push again (it is then deleted)."""
        ...

    async def close(self) -> None:
        """Close what it keeps open between pushes."""
        ...


@dataclass(slots=True)
class _Retry:
    sub: PushSubscription
    attempt: int


def retry_after(headers: dict[str, str], now_wall: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now_wall)
    except (TypeError, ValueError):
        return None


class PushSender:
    """See the module docstring."""

    def __init__(self, config: PushSection, store: Store, providers: dict[str, Provider], metrics: RelayMetrics,
                 clock: Clock) -> None:
        self.store = store
        self.providers = providers
        self.metrics = metrics
        self.clock = clock
        self._queue: collections.deque[str | _Retry] = collections.deque()
        self._waiting: set[str] = set()
        """Addresses in the queue (a second notice for one of them is the same push)."""
        self._not_before: dict[str, float] = {}
        """Subscription id -> monotonic time before which it gets no new push (min interval, Retry-After)."""
        self._ready = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self._busy = 0
        """Workers sending right now."""
        self.configure(config)

    def configure(self, config: PushSection) -> None:
        self.config = config

    # The message path

    def notify(self, address: str) -> None:
        """A message was stored for ``address`` and no session of it was ready anywhere: wake its devices."""
        if address in self._waiting:
            return
        self._waiting.add(address)
        self._put(address)

    def _put(self, item: str | _Retry) -> None:
        self._queue.append(item)
        while len(self._queue) > self.config.queue_size:
            dropped = self._queue.popleft()
            if isinstance(dropped, str):
                self._waiting.discard(dropped)
            self.metrics.push_dropped.inc()
        self._ready.set()

    # Workers

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"push-{i}") for i in range(self.config.concurrency)]

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    def idle(self) -> bool:
        """Nothing queued or waiting for a retry (tests)."""
        return not self._queue and not self._timers and not self._busy

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            item = self._queue.popleft()
            self._busy += 1
            try:
                if isinstance(item, str):
                    self._waiting.discard(item)
                    await self._wake(item)
                else:
                    await self._attempt(item.sub, await self._payload(item.sub.address), item.attempt)
            except StorageUnavailable as exc:
                log.warning("push skipped: storage is unavailable (%s)", exc)
            except Exception:
                log.exception("internal error sending a push")
            finally:
                self._busy -= 1

    async def _payload(self, address: str) -> dict[str, Any]:
        """What a push says: a wake-up and how many messages wait. Never who wrote, what, or a messageId."""
        return {"type": "wake", "queued": await self.store.size(address)}

    async def _wake(self, address: str) -> None:
        subs = await self.store.push_subscriptions(address, wall_ms(self.clock))
        if not subs:
            return
        payload = await self._payload(address)
        now = self.clock.monotonic()
        for sub in subs:
            if now < self._not_before.get(sub.id, 0.0):
                self.metrics.pushes.labels(provider=sub.provider, outcome="collapsed").inc()
                continue
            self._not_before[sub.id] = now + self.config.min_interval_s
            await self._attempt(sub, payload, 1)

    async def _attempt(self, sub: PushSubscription, payload: dict[str, Any], attempt: int) -> None:
        provider = self.providers.get(sub.provider)
        if provider is None:  # configured off since it subscribed
            self.metrics.pushes.labels(provider=sub.provider, outcome="failed").inc()
            return
        wait: float | None = None
        try:
            answer = await provider.send(sub, payload, COLLAPSE_KEY)
        except RelayError as err:  # the endpoint now resolves to an address it must not reach
            log.warning("push to a %s endpoint refused: %s", sub.provider, err.message)
            self.metrics.pushes.labels(provider=sub.provider, outcome="refused").inc()
            return
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("push to a %s endpoint failed (attempt %d): %s", sub.provider, attempt, exc or type(exc).__name__)
            outcome = "retry"
        else:
            outcome = "gone" if provider.gone(answer) else self._outcome(answer.status)
            if outcome == "retry":
                wait = retry_after(answer.headers, self.clock.wall())
                if answer.status in (429, 503) and wait is not None:
                    until = self.clock.monotonic() + min(wait, self.config.max_backoff_s)
                    self._not_before[sub.id] = max(until, self._not_before.get(sub.id, 0.0))
            elif outcome == "failed":
                log.warning("push to a %s endpoint refused with %d: %s", sub.provider, answer.status,
                            answer.body[:200].decode("utf-8", "replace"))
        if outcome == "gone":
            await self.store.delete_push_subscription(sub.address, sub.id)
            self._not_before.pop(sub.id, None)
        if outcome == "retry" and attempt >= self.config.max_attempts:
            outcome = "failed"
        self.metrics.pushes.labels(provider=sub.provider, outcome=outcome).inc()
        if outcome == "retry":
            self._retry_later(sub, attempt, wait)

    @staticmethod
    def _outcome(status: int) -> str:
        if 200 <= status < 300:
            return "sent"
        if status == 429 or status >= 500:
            return "retry"
        return "failed"

    def _retry_later(self, sub: PushSubscription, attempt: int, wait: float | None) -> None:
        if wait is None:
            wait = FIRST_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
        wait = min(wait, self.config.max_backoff_s)

        def due() -> None:
            self._timers.discard(timer)
            self._put(_Retry(sub, attempt + 1))
        timer = asyncio.get_running_loop().call_later(wait, due)
        self._timers.add(timer)

    def sweep(self) -> None:
        """Forget intervals that have passed, so the table holds only recently pushed subscriptions."""
        now = self.clock.monotonic()
        for sub_id in [s for s, until in self._not_before.items() if until <= now]:
            del self._not_before[sub_id]

"""One Redis client (a single server or a Cluster) and its health.

Every operation runs under a deadline (socket and connect timeouts, plus an
overall one), so a hung Redis never hangs relayd. Every failure becomes
``StorageUnavailable`` with a reason an operator can act on, and marks the
link unhealthy; the next write that Redis acknowledges (a client's, or the
periodic probe's) marks it healthy again. redis-py reconnects by itself.
Writes go through the ordered queue of ``write_queue``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ... import tasks
from ..store import StorageUnavailable
from .reasons import describe
from .write_queue import OrderedWrites, Write

log = logging.getLogger("relayd.storage")

T = TypeVar("T")
MAX_CONNECTIONS = 64


class RedisLink(OrderedWrites):
    """The client and its health; writes go through ``OrderedWrites`` (batched, in order, then WAIT if
    configured)."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout_s: float = 2.0,
                 min_replicas: int = 0, wait_timeout_ms: int = 500) -> None:
        self.url = url
        self.cluster = cluster
        self.socket_timeout_s = socket_timeout_s
        self.min_replicas = min_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.deadline_s = 3 * socket_timeout_s + (wait_timeout_ms / 1000 if min_replicas else 0)
        self.queue_deadline_s = 2 * self.deadline_s
        """Longest a write waits for its turn in the queue (then it is refused, unsent)."""
        self.client: Any = None
        self._writer: Any = None
        self._healthy = True
        self._problem: str | None = None
        self._queue: collections.deque[Write] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        self._refresh_nodes = False
        self.batches = 0
        """Write batches sent (each one pipeline per node): for tests and benchmarks."""
        self.reads = 0
        """Reads run (each a command or a pipeline): for tests and benchmarks."""
        self.on_failure: Callable[[], None] | None = None
        """Called after every failure (the store forgets what it assumed Redis holds)."""

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def problem(self) -> str | None:
        return self._problem

    def connect(self) -> None:
        """Build the clients; they connect lazily, so this never waits on the network."""
        wait_s = self.wait_timeout_ms / 1000 if self.min_replicas else 0.0
        common: dict[str, Any] = {"socket_timeout": self.socket_timeout_s + wait_s,  # WAIT blocks that long
                                  "socket_connect_timeout": self.socket_timeout_s,
                                  "decode_responses": True}
        if self.cluster:
            self.client = RedisCluster.from_url(self.url, max_connections=MAX_CONNECTIONS, **common)
            return
        pool = BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=self.socket_timeout_s,
            retry=Retry(NoBackoff(), 1, (rx.ConnectionError,)), **common)
        self.client = Redis(connection_pool=pool)
        self._writer = self.connection(socket_timeout=None)

    def connection(self, url: str | None = None, **options: Any) -> Any:
        """A connection of its own to the server (or to ``url``, e.g. one Cluster node), outside every pool:
        redis-py connects it lazily and again after a failure; ``options`` override the link's settings (e.g.
        ``protocol=2`` for a subscriber)."""
        wait_s = self.wait_timeout_ms / 1000 if self.min_replicas else 0.0
        settings: dict[str, Any] = {"socket_timeout": self.socket_timeout_s + wait_s,
                                    "socket_connect_timeout": self.socket_timeout_s, "decode_responses": True,
                                    "retry": Retry(NoBackoff(), 0), **options}
        return ConnectionPool.from_url(url or self.url, **settings).make_connection()

    async def close(self) -> None:
        """Let queued writes finish (bounded), then close every connection."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.wait([flusher], timeout=self.queue_deadline_s)
            await tasks.stop(flusher, self.deadline_s)
        self._fail_queued(StorageUnavailable("store is closed"))
        writer, client, self._writer, self.client = self._writer, self.client, None, None
        try:
            async with asyncio.timeout(self.deadline_s):
                if writer is not None:
                    await writer.disconnect()
                if client is not None:
                    await (client.aclose() if self.cluster else client.aclose(close_connection_pool=True))
        except (rx.RedisError, OSError, TimeoutError) as exc:
            log.debug("closing a Redis client: %s", describe(exc))

    # Health

    def fail(self, reason: str) -> StorageUnavailable:
        if reason != self._problem:
            log.error("storage unavailable: %s", reason)
        self._healthy, self._problem = False, reason
        if self.on_failure is not None:
            self.on_failure()
        return StorageUnavailable(reason)

    def succeeded(self) -> None:
        if not self._healthy:
            log.warning("storage recovered (was: %s)", self._problem)
        self._healthy, self._problem = True, None

    async def _guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        if self.client is None:
            raise StorageUnavailable("store is not open")
        try:
            async with asyncio.timeout(self.deadline_s):
                if self.cluster:
                    await self.client.initialize()
                return await work()
        except StorageUnavailable as exc:
            raise self.fail(str(exc)) from None
        except (rx.RedisError, OSError, TimeoutError) as exc:
            raise self.fail(describe(exc)) from None

    # Operations

    async def read(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run reads on the client; a failure makes the link unhealthy, success leaves it as it is."""
        self.reads += 1
        return await self._guarded(lambda: work(self.client))

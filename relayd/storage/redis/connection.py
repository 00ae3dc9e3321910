"""One Redis client (a single server or a Cluster), its health, and the ordered writes that go through it.

Every operation runs under a deadline (socket and connect timeouts, plus an
overall one), so a hung Redis never hangs relayd. Every failure becomes
``StorageUnavailable`` (``StorageOutcomeUnknown`` for a write that was sent but
not answered) with a reason an operator can act on, and marks the link
unhealthy (``health``); the next write that Redis acknowledges (a client's, or
the periodic probe's) marks it healthy again. redis-py reconnects by itself.
Writes go through the ordered queue of ``write_queue``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar, cast

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ...reads import read_from_heap
from ..store import StorageUnavailable
from ..health import Health
from .layout import ScriptKeys
from .reasons import describe
from .scripts import Script
from .write_queue import Acks, Client, WriteQueue

log = logging.getLogger("relayd.storage")

T = TypeVar("T")
MAX_CONNECTIONS = 64
OVERDUE_S = 1.0
"""A write unanswered for longer (plus the WAIT/WAITAOF budget) makes the link unhealthy at once."""


class _HeapReads:
    """A redis-py connection whose transport reads from the heap (``relayd.reads``)."""

    _writer: asyncio.StreamWriter | None

    async def _connect(self) -> None:
        await super()._connect()  # type: ignore[misc]
        if self._writer is not None:
            read_from_heap(self._writer.transport)


class HeapConnection(_HeapReads, Connection):
    pass


class HeapUnixConnection(_HeapReads, UnixDomainSocketConnection):
    pass


_HEAP_CLASSES: dict[type[Any], type[Any]] = {Connection: HeapConnection, UnixDomainSocketConnection: HeapUnixConnection}


def _reading_from_heap(pool: T) -> T:
    """``pool`` making its TCP and Unix connections read from the heap (``from_url`` picks the class by the URL's
    scheme; a TLS connection reads through its own protocol and is left as it is)."""
    cls = getattr(pool, "connection_class", None)
    if cls in _HEAP_CLASSES:
        setattr(pool, "connection_class", _HEAP_CLASSES[cls])
    return pool


Commands: TypeAlias = "Redis[str]"
"""The commands reads use: a single server's client, or a Cluster's (see ``commands``)."""


def commands(client: Client) -> Commands:
    """The client as the commands it runs: redis-py's Cluster client has the same ones, routed by key (the
    types-redis stubs just do not list them)."""
    return cast("Redis[str]", client)


async def read_script(client: Commands, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """Run a read-only script on a single server (EVALSHA, or EVAL when Redis does not know it yet)."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
    except rx.NoScriptError:
        return await client.eval(script.source, len(keys), *keys, *args)  # type: ignore[no-untyped-call]


class RedisLink:
    """The client, its ``health`` and its ordered ``writes`` (batched, in order, then WAIT/WAITAOF if
    configured)."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout_s: float = 2.0,
                 min_replicas: int = 0, wait_timeout_ms: int = 500) -> None:
        self.url = url
        self.cluster = cluster
        self.socket_timeout_s = socket_timeout_s
        self.min_replicas = min_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.deadline_s = 3 * socket_timeout_s + (wait_timeout_ms / 1000 if min_replicas else 0)
        """Longest a read (or opening, closing) may take."""
        self.client: Client | None = None
        self.health = Health(min(OVERDUE_S, socket_timeout_s))
        acks = Acks(replicas=min_replicas, timeout_ms=wait_timeout_ms if min_replicas else 0)
        self.writes = WriteQueue(self.health, cluster=cluster, socket_timeout_s=socket_timeout_s, acks=acks)
        self.reads = 0
        """Reads run (each a command or a pipeline): for tests and benchmarks."""

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    @property
    def problem(self) -> str | None:
        return self.health.problem

    @property
    def batches(self) -> int:
        """Write batches sent: for tests and benchmarks."""
        return self.writes.batches

    def use_waitaof(self, everysec: bool) -> None:
        """Acknowledge the store's writes with WAITAOF (the local AOF fsync, and ``min_replicas`` replicas'); with
        ``appendfsync everysec`` the fsync may take up to a second longer than ``wait_timeout_ms``."""
        acks = self.writes.acks
        acks.aof = True
        acks.timeout_ms = self.wait_timeout_ms + (1000 if everysec else 0)
        self.health.overdue_s = min(OVERDUE_S, self.socket_timeout_s) + acks.wait_s

    def _settings(self, **options: Any) -> dict[str, Any]:
        wait_s = self.writes.acks.wait_s  # WAIT/WAITAOF blocks that long
        return {"socket_timeout": self.socket_timeout_s + wait_s, "socket_connect_timeout": self.socket_timeout_s,
                "decode_responses": True, **options}

    def connect(self) -> None:
        """Build the clients; they connect lazily, so this never waits on the network."""
        if self.cluster:  # its node pipelines carry the writes: room for WAIT, or WAITAOF on everysec
            self.client = self.writes.client = RedisCluster.from_url(
                self.url, max_connections=MAX_CONNECTIONS, **self._settings(
                    socket_timeout=self.socket_timeout_s + self.wait_timeout_ms / 1000 + 1.0))
            return
        pool: BlockingConnectionPool[Any] = _reading_from_heap(BlockingConnectionPool.from_url(
            self.url, max_connections=MAX_CONNECTIONS, timeout=self.socket_timeout_s,
            retry=Retry(NoBackoff(), 1, (rx.ConnectionError,)), **self._settings()))
        self.client = self.writes.client = Redis(connection_pool=pool, decode_responses=True)
        self.writes.writer = _reading_from_heap(ConnectionPool.from_url(
            self.url, **self._settings(socket_timeout=None, retry=Retry(NoBackoff(), 0)))).make_connection()

    def subscriber(self, url: str | None = None) -> Redis[str]:
        """A client of its own for Pub/Sub to the server (or to ``url``, e.g. one Cluster node), outside every
        pool, never retrying by itself; RESP2, without a read timeout (the subscriber polls)."""
        pool: ConnectionPool[Any] = _reading_from_heap(ConnectionPool.from_url(url or self.url, **self._settings(
            socket_timeout=None, protocol=2, retry=Retry(NoBackoff(), 0), max_connections=2)))
        return Redis(connection_pool=pool, decode_responses=True)

    async def close(self) -> None:
        """Let queued writes finish (bounded), then close every connection."""
        await self.writes.drain(self.writes.answer_s, self.deadline_s)
        writer, client = self.writes.writer, self.client
        self.writes.writer = self.writes.client = self.client = None
        try:
            async with asyncio.timeout(self.deadline_s):
                if writer is not None:
                    await writer.disconnect()
                # aclose: redis-py >= 5 (the types-redis 4.6 stubs predate it)
                if isinstance(client, RedisCluster):
                    await client.aclose()  # type: ignore[attr-defined]
                elif client is not None:
                    await client.aclose(close_connection_pool=True)  # type: ignore[attr-defined]
        except (rx.RedisError, OSError, TimeoutError) as exc:
            log.debug("closing a Redis client: %s", describe(exc))

    # Health

    def fail(self, reason: str) -> StorageUnavailable:
        return self.health.fail(reason)

    async def _guarded(self, work: Callable[[Commands], Awaitable[T]]) -> T:
        client = self.client
        if client is None:
            raise StorageUnavailable("store is not open")
        try:
            async with asyncio.timeout(self.deadline_s):
                if isinstance(client, RedisCluster):
                    await client.initialize()
                return await work(commands(client))
        except StorageUnavailable as exc:
            raise self.fail(str(exc)) from None
        except (rx.RedisError, OSError, TimeoutError) as exc:
            raise self.fail(describe(exc)) from None

    # Operations

    async def read(self, work: Callable[[Commands], Awaitable[T]]) -> T:
        """Run reads on the client; a failure makes the link unhealthy, success leaves it as it is."""
        self.reads += 1
        return await self._guarded(work)

    def write(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """``WriteQueue.write``: one write script, in order, answered within ``socket_timeout_s``."""
        return self.writes.write(script, keys, args)

    async def write_many(self, calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """``WriteQueue.write_many``: several write scripts in one round trip."""
        return await self.writes.write_many(calls)

    def merge(self, script: Script, keys: ScriptKeys, common: tuple[Any, ...], own: tuple[Any, ...], *,
              early: bool = False) -> asyncio.Future[Any]:
        """``WriteQueue.merge``: one call of a script that takes many, merged with the queued ones when it can."""
        return self.writes.merge(script, keys, common, own, early=early)

    def command(self, *args: Any, key: str) -> asyncio.Future[Any]:
        """``WriteQueue.command``: one write command, in the same order as scripts."""
        return self.writes.command(*args, key=key)

    def post(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """``WriteQueue.post``: a write script queued without waiting."""
        return self.writes.post(script, keys, args)

    def post_command(self, *args: Any, key: str) -> asyncio.Future[Any]:
        """``WriteQueue.post_command``: a write command queued without waiting."""
        return self.writes.post_command(*args, key=key)

"""One Redis client (a single server or a Cluster), its health, and durable writes.

Every operation runs under a deadline (socket and connect timeouts, plus an
overall one), so a hung Redis never hangs relayd. Every failure becomes
``StorageUnavailable`` with a reason an operator can act on, and marks the
link unhealthy; the next write that Redis acknowledges (a client's, or the
periodic probe's) marks it healthy again. redis-py reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..store import StorageUnavailable
from .scripts import Script

log = logging.getLogger("relayd.storage")

T = TypeVar("T")
MAX_CONNECTIONS = 64

_REFUSALS = {
    "READONLY": "Redis refuses writes: it is a read-only replica (READONLY)",
    "OOM": "Redis refuses writes: it is out of memory (maxmemory reached with noeviction, OOM)",
    "MISCONF": "Redis refuses writes: it cannot save its snapshot to disk (MISCONF)",
    "NOREPLICAS": "Redis refuses writes: not enough replicas are connected (NOREPLICAS)",
    "LOADING": "Redis is loading its dataset into memory (LOADING)",
    "BUSY": "Redis is busy running a script (BUSY)",
    "MASTERDOWN": "Redis replica lost its primary (MASTERDOWN)",
    "CLUSTERDOWN": "the Redis Cluster is down (CLUSTERDOWN)",
    "TRYAGAIN": "the Redis Cluster is moving a slot (TRYAGAIN)",
    "WRONGPASS": "Redis refused the credentials in [redis] url (WRONGPASS)",
    "NOAUTH": "Redis needs a password: put it in [redis] url (NOAUTH)",
    "NOPERM": "the Redis user lacks a permission relayd needs (NOPERM)",
}


def describe(exc: BaseException) -> str:
    """A human reason for an operator; never contains message data or the password."""
    text = " ".join(str(exc).split())
    code = text.split(" ", 1)[0].upper() if text else ""
    if code in _REFUSALS:
        return _REFUSALS[code]
    if isinstance(exc, rx.OutOfMemoryError):
        return _REFUSALS["OOM"]
    if isinstance(exc, rx.ReadOnlyError):
        return _REFUSALS["READONLY"]
    if isinstance(exc, rx.AuthenticationError):
        return "Redis refused the credentials in [redis] url"
    if isinstance(exc, rx.BusyLoadingError):
        return _REFUSALS["LOADING"]
    if isinstance(exc, (rx.TimeoutError, TimeoutError)):
        return "Redis did not answer within [redis] socket_timeout_s"
    if isinstance(exc, (rx.ConnectionError, OSError)):
        return f"Redis is unreachable: {text or type(exc).__name__}"
    return f"Redis error: {type(exc).__name__}: {text[:300]}"


def _node_pipeline_command() -> Any:
    from redis.asyncio.cluster import PipelineCommand
    return PipelineCommand


class RedisLink:
    """The client, its health, and the one way relayd writes: a script, then WAIT if configured."""

    def __init__(self, url: str, *, cluster: bool = False, socket_timeout_s: float = 2.0,
                 min_replicas: int = 0, wait_timeout_ms: int = 500) -> None:
        self.url = url
        self.cluster = cluster
        self.socket_timeout_s = socket_timeout_s
        self.min_replicas = min_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.deadline_s = 3 * socket_timeout_s + (wait_timeout_ms / 1000 if min_replicas else 0)
        self.client: Any = None
        self._healthy = True
        self._problem: str | None = None
        self.on_failure: Callable[[], None] | None = None
        """Called after every failure (the store forgets what it assumed Redis holds)."""

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def problem(self) -> str | None:
        return self._problem

    def connect(self) -> None:
        """Build the client; it connects lazily, so this never waits on the network."""
        wait_s = self.wait_timeout_ms / 1000 if self.min_replicas else 0.0
        common: dict[str, Any] = {"socket_timeout": self.socket_timeout_s + wait_s,  # WAIT blocks that long
                                  "socket_connect_timeout": self.socket_timeout_s,
                                  "decode_responses": True}
        if self.cluster:
            self.client = RedisCluster.from_url(self.url, max_connections=MAX_CONNECTIONS, **common)
        else:
            pool = BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=self.socket_timeout_s,
                retry=Retry(NoBackoff(), 1, (rx.ConnectionError,)), **common)
            self.client = Redis(connection_pool=pool)

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

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
        return await self._guarded(lambda: work(self.client))

    async def write(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one write script; returns once Redis (and ``min_replicas`` replicas) acknowledged it."""
        result = await self._guarded(lambda: self._run(script, keys, args))
        self.succeeded()
        return result

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if not self.min_replicas:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except rx.NoScriptError:
                return await self.client.eval(script.source, len(keys), *keys, *args)
        result, acks = await self._run_and_wait(("EVALSHA", script.sha, len(keys), *keys, *args), keys[0])
        if isinstance(result, rx.NoScriptError):
            result, acks = await self._run_and_wait(("EVAL", script.source, len(keys), *keys, *args), keys[0])
        for value in (result, acks):
            if isinstance(value, BaseException):
                raise value
        if acks < self.min_replicas:
            raise StorageUnavailable(
                f"only {acks} of [redis] min_replicas = {self.min_replicas} replicas acknowledged a write "
                f"within {self.wait_timeout_ms} ms")
        return result

    async def _run_and_wait(self, command: tuple[Any, ...], key: str) -> tuple[Any, Any]:
        """The command and WAIT on one connection, so WAIT covers exactly that write."""
        wait = ("WAIT", self.min_replicas, self.wait_timeout_ms)
        if not self.cluster:
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command(*command)
            pipe.execute_command(*wait)
            result, acks = await pipe.execute(raise_on_error=False)
            return result, acks
        command_class = _node_pipeline_command()
        for attempt in (1, 2):
            node = self.client.get_node_from_key(key)
            commands = [command_class(0, *command), command_class(1, *wait)]
            await node.execute_pipeline(commands)
            result, acks = commands[0].result, commands[1].result
            if attempt == 1 and isinstance(result, (rx.MovedError, rx.AskError)):
                await self.client.nodes_manager.initialize()
                continue
            return result, acks
        raise AssertionError("unreachable")

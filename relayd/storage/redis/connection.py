"""One Redis client (a single server or a Cluster), its health, and durable writes.

Every operation runs under a deadline (socket and connect timeouts, plus an
overall one), so a hung Redis never hangs relayd. Every failure becomes
``StorageUnavailable`` with a reason an operator can act on, and marks the
link unhealthy; the next write that Redis acknowledges (a client's, or the
periodic probe's) marks it healthy again. redis-py reconnects by itself.

Writes (scripts and single commands) go through one queue: everything
submitted while a batch is on its way is sent as the next batch, one pipeline
per Redis node, and only one batch is in flight at a time. Redis runs a
connection's pipeline in order, so writes keep the order they were submitted
in (for one address, and so for one connection's messages) while many share a
round trip. A write waits at most ``queue_deadline_s`` for its turn: past that
it leaves the queue unsent (``StorageUnavailable``), so nothing waits without
bound. Write batches are never retried by the client library: a batch whose
connection broke may have been applied, and resending it would apply it twice.
On a single server they go over one connection of their own, sent and read
without per-command timers (the batch's deadline covers it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..store import StorageUnavailable
from .scripts import Script

log = logging.getLogger("relayd.storage")

T = TypeVar("T")
MAX_CONNECTIONS = 64
MAX_BATCH = 256
"""Writes sent in one pipeline at most; what came later waits for the next one."""

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


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """Commands in RESP, as one buffer (redis-py's general packer costs more per argument than the scripts'
    many short arguments are worth). Arguments are bytes, str or numbers."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Write:
    """One queued write: the command, the key that routes it, and who waits for its result."""

    __slots__ = ("args", "key", "script", "future", "sent")

    def __init__(self, args: tuple[Any, ...], key: str, script: Script | None,
                 future: asyncio.Future[Any]) -> None:
        self.args = args
        self.key = key
        self.script = script
        self.future = future
        self.sent = False

    def eval_args(self) -> tuple[Any, ...]:
        """The same script call as EVAL with its source (after NOSCRIPT)."""
        assert self.script is not None
        return ("EVAL", self.script.source, *self.args[2:])


class RedisLink:
    """The client, its health, and the one way relayd writes: batched, in order, then WAIT if configured."""

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
        self._queue: collections.deque[_Write] = collections.deque()
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
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
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

    async def write(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one write script; returns once Redis (and ``min_replicas`` replicas) acknowledged it.

        Raises StorageUnavailable (Redis refused, failed, or the write did not get its turn in time).
        """
        return await self._submit(("EVALSHA", script.sha, len(keys), *keys, *args), keys[0], script)

    async def command(self, *args: Any, key: str) -> Any:
        """Run one write command (routed by ``key`` on a Cluster) in the same ordered queue as scripts."""
        return await self._submit(args, key, None)

    def post(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue a write script without waiting: it goes out in order with the writes queued after it, often
        in the same round trip. The future holds its result or ``StorageUnavailable``; raises
        StorageUnavailable at once when the store is not open."""
        return self._enqueue(("EVALSHA", script.sha, len(keys), *keys, *args), keys[0], script).future

    def post_command(self, *args: Any, key: str) -> asyncio.Future[Any]:
        """``post`` for a single write command."""
        return self._enqueue(args, key, None).future

    def _enqueue(self, args: tuple[Any, ...], key: str, script: Script | None) -> _Write:
        if self.client is None:
            raise StorageUnavailable("store is not open")
        write = _Write(args, key, script, asyncio.get_running_loop().create_future())
        write.future.add_done_callback(_retrieved)  # a posted write nobody awaits must not warn when it fails
        self._queue.append(write)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return write

    async def _submit(self, args: tuple[Any, ...], key: str, script: Script | None) -> Any:
        write = self._enqueue(args, key, script)
        try:
            async with asyncio.timeout(self.queue_deadline_s):
                return await asyncio.shield(write.future)
        except TimeoutError:
            if not write.sent:
                try:
                    self._queue.remove(write)
                except ValueError:
                    pass
                write.future.cancel()
                raise self.fail("Redis writes are backed up: a write waited longer than 2 x the Redis "
                                "deadline for its turn") from None
            async with asyncio.timeout(self.deadline_s):  # on its way: its batch has a deadline of its own
                return await asyncio.shield(write.future)

    async def _flush(self) -> None:
        """Send queued writes, a batch at a time, until the queue is empty."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            for write in batch:
                write.sent = True
            try:
                async with asyncio.timeout(self.deadline_s):
                    await (self._send_cluster(batch) if self.cluster else self._send(batch))
            except asyncio.CancelledError:
                self._settle(batch, StorageUnavailable("store is closed"))
                raise
            except (rx.RedisError, OSError, TimeoutError) as exc:
                self._settle(batch, self.fail(describe(exc)))
            except StorageUnavailable as exc:
                self._settle(batch, self.fail(str(exc)))
            except Exception as exc:  # a bug must not leave writers waiting
                log.exception("Redis write batch failed unexpectedly")
                self._settle(batch, StorageUnavailable(f"Redis error: {type(exc).__name__}"))
            self.batches += 1

    def _settle(self, batch: Sequence[_Write], outcome: BaseException) -> None:
        for write in batch:
            if not write.future.done():
                write.future.set_exception(outcome)

    def _fail_queued(self, outcome: BaseException) -> None:
        queued, self._queue = list(self._queue), collections.deque()
        self._settle(queued, outcome)

    def _deliver(self, batch: Sequence[_Write], results: Sequence[Any]) -> None:
        """Hand each write its result; a refusal fails that write and marks the link unhealthy."""
        failed = False
        for write, result in zip(batch, results):
            if write.future.done():
                continue
            if isinstance(result, BaseException):
                failed = True
                reason = str(result) if isinstance(result, StorageUnavailable) else describe(result)
                write.future.set_exception(self.fail(reason))
            else:
                write.future.set_result(result)
        if not failed:
            self.succeeded()

    def _waited(self, acks: Any) -> None:
        if isinstance(acks, BaseException):
            raise acks
        if int(acks) < self.min_replicas:
            raise StorageUnavailable(
                f"only {acks} of [redis] min_replicas = {self.min_replicas} replicas acknowledged a write "
                f"within {self.wait_timeout_ms} ms")

    async def _send(self, batch: list[_Write]) -> None:
        """One pipeline on a single Redis (then the NOSCRIPT ones again as EVAL)."""
        results = await self._pipeline([w.args for w in batch])
        again = [i for i, r in enumerate(results) if isinstance(r, rx.NoScriptError)]
        if again:
            retried = await self._pipeline([batch[i].eval_args() for i in again])
            for i, result in zip(again, retried):
                results[i] = result
        self._deliver(batch, results)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands (and WAIT) in one write on the writes' connection, then read every reply; a
        refusal is that command's result. Raises what breaks the connection (redis-py then closes it)."""
        conn = self._writer
        if self.min_replicas:
            commands = [*commands, ("WAIT", self.min_replicas, self.wait_timeout_ms)]
        await conn.send_packed_command(pack(commands), check_health=False)
        results: list[Any] = []
        for _ in commands:
            try:
                results.append(await conn.read_response(timeout=math.inf))
            except rx.ResponseError as exc:
                results.append(exc)
        if self.min_replicas:
            self._waited(results.pop())
        return results

    async def _send_cluster(self, batch: list[_Write]) -> None:
        """One pipeline per master node, concurrently; writes a slot move redirected go once more."""
        await self.client.initialize()
        if self._refresh_nodes:
            self._refresh_nodes = False
            await self.client.nodes_manager.initialize()
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in (1, 2):
            await self._node_pipelines(batch, todo, results, eval_source=False)
            noscript = [i for i in todo if isinstance(results[i], rx.NoScriptError)]
            if noscript:
                await self._node_pipelines(batch, noscript, results, eval_source=True)
            moved = [i for i in todo if isinstance(results[i], (rx.MovedError, rx.AskError, rx.TryAgainError))]
            if not moved or attempt == 2:
                break
            await self.client.nodes_manager.initialize()
            todo = moved
        self._deliver(batch, results)

    async def _node_pipelines(self, batch: list[_Write], indexes: list[int], results: list[Any], *,
                              eval_source: bool) -> None:
        from redis.asyncio.cluster import PipelineCommand
        by_node: dict[Any, list[int]] = {}
        for i in indexes:
            by_node.setdefault(self.client.get_node_from_key(batch[i].key), []).append(i)

        async def run(node: Any, part: list[int]) -> None:
            commands = [PipelineCommand(n, *(batch[i].eval_args() if eval_source else batch[i].args))
                        for n, i in enumerate(part)]
            if self.min_replicas:
                commands.append(PipelineCommand(len(part), "WAIT", self.min_replicas, self.wait_timeout_ms))
            try:
                await node.execute_pipeline(commands)
                if self.min_replicas:
                    self._waited(commands.pop().result)
            except (rx.RedisError, OSError, StorageUnavailable) as exc:
                self._refresh_nodes = isinstance(exc, (rx.ConnectionError, OSError))
                for i in part:
                    results[i] = exc
                return
            for i, command in zip(part, commands):
                results[i] = command.result
        await asyncio.gather(*(run(node, part) for node, part in by_node.items()))

"""The ordered write queue every Redis write goes through: batched, in order, then WAIT if configured.

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
from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as rx

from ..store import StorageUnavailable
from .reasons import describe
from .scripts import Script

log = logging.getLogger("relayd.storage")

MAX_BATCH = 256
"""Writes sent in one pipeline at most; what came later waits for the next one."""


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


class Write:
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


class OrderedWrites:
    """The write half of ``RedisLink``: what it needs from the link is declared here, set up by the link."""

    client: Any
    cluster: bool
    min_replicas: int
    wait_timeout_ms: int
    deadline_s: float
    queue_deadline_s: float
    _writer: Any
    _queue: collections.deque[Write]
    _flusher: asyncio.Task[None] | None
    _refresh_nodes: bool
    batches: int
    fail: Callable[[str], StorageUnavailable]
    succeeded: Callable[[], None]

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

    def _enqueue(self, args: tuple[Any, ...], key: str, script: Script | None) -> Write:
        if self.client is None:
            raise StorageUnavailable("store is not open")
        write = Write(args, key, script, asyncio.get_running_loop().create_future())
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

    def _settle(self, batch: Sequence[Write], outcome: BaseException) -> None:
        for write in batch:
            if not write.future.done():
                write.future.set_exception(outcome)

    def _fail_queued(self, outcome: BaseException) -> None:
        queued, self._queue = list(self._queue), collections.deque()
        self._settle(queued, outcome)

    def _deliver(self, batch: Sequence[Write], results: Sequence[Any]) -> None:
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

    async def _send(self, batch: list[Write]) -> None:
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

    async def _send_cluster(self, batch: list[Write]) -> None:
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

    async def _node_pipelines(self, batch: list[Write], indexes: list[int], results: list[Any], *,
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

"""The ordered write queue every Redis write goes through: batched, in order, then WAIT/WAITAOF if configured.

Writes (scripts and single commands) go through one queue: what was
submitted by the time the sender runs (about one event-loop turn's writes)
goes out as one batch. On a single server batches are pipelined on the
writes' own connection (``MAX_IN_FLIGHT`` and ``MAX_BATCH`` bound what is unanswered; a batch goes while
another is in flight only with ``MIN_PIPELINED`` writes), and one reader
takes their replies in order: Redis works on one batch while relayd reads the
frames of the next, rather than each waiting for the other (one batch at a
time made the queued path a relay race of relayd, Redis and the clients). On
a Cluster one batch is in flight at a time, one pipeline per node. Redis runs
a connection's commands in order, so writes keep the order they were
submitted in (for one address, and so for one connection's messages) while
many share a round trip. A script Redis does not know (NOSCRIPT, after a
restart or SCRIPT FLUSH) is sent again as EVAL; until those are answered no
new batch is sent, so they keep their place before later writes. Calls of a
script that takes many at once (``merge``: the enqueues, the slot notes) join
the one still queued, on a single server: one EVALSHA and one reply for many
callers.

Every write is answered within ``answer_s`` (``socket_timeout_s``, plus the
WAIT/WAITAOF budget when configured) of being submitted, however Redis
behaves: one that was never sent is refused (``StorageUnavailable``), one that
was sent but not answered in time (a timeout, a connection lost mid-reply) is
``StorageOutcomeUnknown``, since Redis may have applied it. One timer for
the whole queue, set for the oldest unanswered write, does that (a timer per
write cost more than a tenth of a queued message's CPU). Write batches are
never retried by the client library for the same reason. On a single server
they go over one connection of their own, packed by ``pack`` and read without
per-command timers (the batch's deadline covers it).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, Union

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import Connection, Encoder

from ... import tasks
from ..store import StorageOutcomeUnknown, StorageUnavailable
from ..health import Health
from .layout import ScriptKeys
from .reasons import describe
from .scripts import Script

log = logging.getLogger("relayd.storage")

MAX_BATCH = 256
"""Writes sent and not yet answered at most (in one batch, or on a single server in all those in flight; a
merged write counts its calls): what came later waits. A Redis that stops answering leaves no more than these
with an unknown outcome."""
MAX_IN_FLIGHT = 8
"""Batches sent and not yet answered at most, on a single server."""
MIN_PIPELINED = 16
"""Writes that go out while another batch is in flight, at least (fewer wait for its answer): a send to Redis
cost a quarter of a receiving instance's CPU when each loop turn's one or two publishes went alone."""
MAX_MERGED = 64
"""Calls merged into one script call at most (``WriteQueue.merge``): Redis runs them as one script, so this
bounds how long one blocks its other clients (about 1.5 ms of enqueues)."""

Client: TypeAlias = Union["Redis[str]", "RedisCluster[str]"]
"""The redis-py client of a single server or of a Cluster (decoding replies to str)."""


def pack(commands: Sequence[Sequence[Any]], encoder: Encoder) -> bytes:
    """Commands in RESP, as one buffer, exactly as redis-py's ``pack_commands`` packs them.

    A ``ScriptKeys`` argument stands for its keys, whose RESP form it holds.
    str, bytes, int and float (all the store sends) are packed here; anything
    else goes to redis-py's own ``encoder``, which refuses what Redis would
    misread (a bool, None, other objects) with ``DataError``. Kept because
    bench/redis_pack_bench.py measured redis-py's packer at 20 us of CPU per
    enqueue command (27 arguments) against 8 us here: 68 against 60 us of
    client CPU per queued message in batches of 256 (125 against 99 us one
    at a time).
    """
    out: list[bytes] = []
    for args in commands:
        header = len(out)
        out.append(b"")
        count = len(args)
        for arg in args:
            kind = type(arg)
            if kind is ScriptKeys:
                out.append(arg.resp)
                count += len(arg) - 1
                continue
            if kind is str:
                data = arg.encode()
            elif kind is bytes:
                data = arg
            elif kind is int or kind is float:
                data = repr(arg).encode()
            else:
                data = bytes(encoder.encode(arg))
            out += (b"$%d\r\n" % len(data), data, b"\r\n")
        out[header] = b"*%d\r\n" % count
    return b"".join(out)


def flat(args: Sequence[Any]) -> tuple[Any, ...]:
    """The arguments with a ``ScriptKeys`` spelled out (for redis-py's own packing on a Cluster)."""
    out: list[Any] = []
    for arg in args:
        if type(arg) is ScriptKeys:
            out += arg
        else:
            out.append(arg)
    return tuple(out)


def _script_call(script: Script, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
    if type(keys) is ScriptKeys:
        return ("EVALSHA", script.sha, len(keys), keys, *args)
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


class Write:
    """One queued write: the command, the key that routes it, and who waits for its result."""

    __slots__ = ("args", "key", "script", "future", "sent", "submitted", "calls")

    def __init__(self, args: tuple[Any, ...], key: str, script: Script | None,
                 future: asyncio.Future[Any]) -> None:
        self.args = args
        self.key = key
        self.script = script
        self.future = future
        self.sent = False
        self.submitted = time.monotonic()
        self.calls = 1
        """Callers answered by this write (several for a ``Merged`` one): what ``MAX_BATCH`` counts."""

    def eval_args(self) -> tuple[Any, ...]:
        """The same script call as EVAL with its source (after NOSCRIPT)."""
        assert self.script is not None
        return ("EVAL", self.script.source, *self.args[2:])

    def fail(self, outcome: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(outcome)


class Merged(Write):
    """Calls of one script merged into one script call while queued (``WriteQueue.merge``): each call's keys and
    own arguments appended, the shared arguments once. Its reply, a JSON array with an entry per call (an object
    ``{"err": message}`` for a call Redis refused), is split among the callers' futures."""

    __slots__ = ("common", "keys", "own", "futures")

    def __init__(self, script: Script, keys: ScriptKeys, common: tuple[Any, ...], own: tuple[Any, ...],
                 future: asyncio.Future[Any]) -> None:
        super().__init__((), keys[0], script, future.get_loop().create_future())
        self.common = common
        self.keys = [keys]
        self.own = list(own)
        self.futures = [future]

    def add(self, keys: ScriptKeys, own: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.keys.append(keys)
        self.own += own
        self.futures.append(future)
        self.calls += 1

    def seal(self) -> None:
        """Build the script call (once it left the queue: nothing is added after that)."""
        assert self.script is not None
        count = sum(len(keys) for keys in self.keys)
        self.args = ("EVALSHA", self.script.sha, count, *self.keys, *self.common, *self.own)

    def fail(self, outcome: BaseException) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(outcome)
        if not self.future.done():
            self.future.set_result(None)

    def split(self, reply: Any, refusal: Callable[[BaseException], BaseException]) -> bool:
        """Answer each call from the reply (``refusal`` makes a call's error); whether any failed."""
        try:
            entries = json.loads(reply)
            if type(entries) is not list or len(entries) != len(self.futures):
                raise ValueError("not one entry per call")
        except (TypeError, ValueError) as exc:
            self.fail(refusal(StorageOutcomeUnknown(f"unexpected reply to a merged script call: {exc}")))
            return True
        failed = False
        for future, entry in zip(self.futures, entries):
            if future.done():
                continue
            if type(entry) is dict:
                failed = True
                future.set_exception(refusal(rx.ResponseError(str(entry.get("err")))))
            else:
                future.set_result(entry)
        self.future.set_result(None)
        return failed


class Sent:
    """A batch sent on the writes' connection whose replies are not all read yet (an acknowledgement follows
    the writes when ``acks``); read by ``deadline`` (loop time) or the connection is given up."""

    __slots__ = ("writes", "acks", "deadline", "calls")

    def __init__(self, writes: list[Write], calls: int, acks: bool, deadline: float) -> None:
        self.writes = writes
        self.calls = calls
        self.acks = acks
        self.deadline = deadline


@dataclass(slots=True)
class Acks:
    """What a batch with scripts (the store's writes) waits for after them: ``replicas`` replicas (WAIT), or with
    ``aof`` the local AOF fsync and ``replicas`` replicas' (WAITAOF 1 replicas), for at most ``timeout_ms``.
    Plain commands (the cluster's publishes) are not made to wait: with ``appendfsync everysec`` WAITAOF may
    take up to a second."""

    replicas: int = 0
    timeout_ms: int = 0
    aof: bool = False

    @property
    def command(self) -> tuple[Any, ...] | None:
        if self.aof:
            return ("WAITAOF", 1, self.replicas, self.timeout_ms)
        if self.replicas:
            return ("WAIT", self.replicas, self.timeout_ms)
        return None

    @property
    def wait_s(self) -> float:
        """How long the acknowledgement may legitimately block."""
        return self.timeout_ms / 1000 if self.command is not None else 0.0

    def shortfall(self, reply: Any) -> BaseException | None:
        """Why the acknowledgement ``reply`` falls short, or None."""
        if isinstance(reply, BaseException):
            return reply
        local, replicas = (int(reply[0]), int(reply[1])) if self.aof else (1, int(reply))
        if local < 1:
            return StorageOutcomeUnknown(f"Redis did not fsync its AOF within {self.timeout_ms} ms (WAITAOF)")
        if replicas < self.replicas:
            return StorageOutcomeUnknown(
                f"only {replicas} of [redis] min_replicas = {self.replicas} replicas acknowledged a write "
                f"within {self.timeout_ms} ms")
        return None

    def apply(self, reply: Any, results: list[Any]) -> list[Any]:
        """The writes' results given the acknowledgement ``reply``: on a shortfall every write that Redis applied
        gets ``StorageOutcomeUnknown`` (applied, not made durable as configured; a resend with the same
        messageId is idempotent)."""
        short = self.shortfall(reply)
        if short is None:
            return results
        if not isinstance(short, StorageOutcomeUnknown):
            short = StorageOutcomeUnknown(describe(short))
        return [r if isinstance(r, BaseException) else short for r in results]


class WriteQueue:
    """Writes in submission order, in batches, each answered within ``answer_s`` (see the module docstring)."""

    def __init__(self, health: Health, *, cluster: bool, socket_timeout_s: float, acks: Acks) -> None:
        self.health = health
        self.cluster = cluster
        self.socket_timeout_s = socket_timeout_s
        self.acks = acks
        self.client: Client | None = None
        self.writer: Connection | None = None
        """The writes' own connection to a single server (None on a Cluster: one pipeline per node)."""
        self._queue: collections.deque[Write] = collections.deque()
        self._queued_calls = 0
        """Calls the writes in ``_queue`` answer."""
        self._sent_calls = 0
        """Calls the batches in ``_in_flight`` answer."""
        self._batch: list[Write] = []
        """The batch being sent on a Cluster (on a single server: the batch until it is in ``_in_flight``)."""
        self._in_flight: collections.deque[Sent] = collections.deque()
        """Batches sent on a single server's writes' connection, oldest first, whose replies ``_read`` takes."""
        self._held: list[tuple[Sent, list[Any]]] = []
        """Answered batches held back, in order, while NOSCRIPT ones are sent again (no batch is sent meanwhile)."""
        self._room: asyncio.Future[None] | None = None
        """What the sender waits on while it may not send (``_may_send``)."""
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        """The one timer that answers overdue writes (``_expire``), set while any write is unanswered."""
        self._refresh_nodes = False
        self.batches = 0
        """Write batches sent (each one pipeline per node): for tests and benchmarks."""
        health.oldest_write = self.oldest_write

    @property
    def answer_s(self) -> float:
        """Longest a caller waits for a write's answer."""
        return self.socket_timeout_s + self.acks.wait_s

    def _taken(self) -> Iterator[list[Write]]:
        """The writes taken off the queue and not all answered, a batch at a time, oldest first."""
        for sent, _ in self._held:
            yield sent.writes
        for sent in self._in_flight:
            yield sent.writes
        yield self._batch

    def _unanswered(self) -> Iterator[Write]:
        """Every write taken off the queue and not yet answered, oldest first."""
        for writes in self._taken():
            for write in writes:
                if not write.future.done():
                    yield write

    def oldest_write(self) -> float | None:
        """When the oldest write not yet answered was submitted (monotonic), or None."""
        for write in self._unanswered():
            return write.submitted
        return self._queue[0].submitted if self._queue else None

    # Submitting

    def write(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Run one write script: the future is done once Redis (and what ``acks`` asks for) acknowledged it. A
        future rather than a coroutine: no frame per write to resume.

        Its error: StorageUnavailable (Redis refused, failed, or the write could not be sent in time) or
        StorageOutcomeUnknown (sent, but not answered in time); StorageUnavailable at once when the store is
        not open.
        """
        return self._enqueue(_script_call(script, keys, args), keys[0], script).future

    async def write_many(self, calls: Sequence[tuple[Script, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run several write scripts, queued at once so they share a round trip; their results in order.
        Raises the first failure (as ``write`` does) once all were answered."""
        writes = [self._enqueue(_script_call(script, keys, args), keys[0], script) for script, keys, args in calls]
        outcomes = await asyncio.gather(*(w.future for w in writes), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    def command(self, *args: Any, key: str) -> asyncio.Future[Any]:
        """Run one write command (routed by ``key`` on a Cluster) in the same ordered queue as scripts."""
        return self._enqueue(args, key, None).future

    def post(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue a write script without waiting: it goes out in order with the writes queued after it, often
        in the same round trip. The future holds its result or the error; raises StorageUnavailable at once
        when the store is not open."""
        return self._enqueue(_script_call(script, keys, args), keys[0], script).future

    def post_command(self, *args: Any, key: str) -> asyncio.Future[Any]:
        """``post`` for a single write command."""
        return self._enqueue(args, key, None).future

    def merge(self, script: Script, keys: ScriptKeys, common: tuple[Any, ...], own: tuple[Any, ...], *,
              early: bool = False) -> asyncio.Future[Any]:
        """``write`` a call of a script that takes any number of calls at once: KEYS are each call's ``keys`` in
        turn, ARGV the ``common`` arguments then each call's ``own``, and it returns a JSON array with an entry
        per call (``{"err": message}`` for one that failed). On a single server a call joins the last queued
        write when that is an unsent call of the same script with the same ``common`` arguments (up to
        ``MAX_MERGED``): one EVALSHA and one reply for many callers, in their order. On a Cluster each call
        goes alone (keys of several addresses need not share a slot). The future holds the call's entry.

        ``early``: a call that only has to go before the writes submitted after it (idempotent, independent of
        those queued before it; a slot noted before each first write to it, ``StoreCore.note_slot``), posted
        without waiting: it may join the write before the last, and otherwise goes before a merged write still
        being filled rather than split it."""
        if self.client is None:
            raise StorageUnavailable("store is not open")
        future = asyncio.get_running_loop().create_future()
        if early:
            future.add_done_callback(tasks.retrieved)
        target = self._merge_target(script, common, 2 if early else 1)
        if target is not None:
            target.add(keys, own, future)
            self._queued_calls += 1
            if self._queued_calls == MIN_PIPELINED:
                self._make_room()
        else:
            self._add(Merged(script, keys, common, own, future), early=early)
        return future

    def _merge_target(self, script: Script, common: tuple[Any, ...], depth: int) -> Merged | None:
        """The queued write among the last ``depth`` that a call of ``script`` may join, or None."""
        if self.cluster:
            return None
        for write in itertools.islice(reversed(self._queue), depth):
            if type(write) is Merged and write.script is script and write.calls < MAX_MERGED and write.common == common:
                return write
        return None

    def _enqueue(self, args: tuple[Any, ...], key: str, script: Script | None) -> Write:
        if self.client is None:
            raise StorageUnavailable("store is not open")
        write = Write(args, key, script, asyncio.get_running_loop().create_future())
        write.future.add_done_callback(tasks.retrieved)  # a posted write nobody awaits must not warn when it fails
        self._add(write)
        return write

    def _add(self, write: Write, *, early: bool = False) -> None:
        loop = write.future.get_loop()
        queue = self._queue
        if early and queue and type(queue[-1]) is Merged:
            write.submitted = queue[-1].submitted  # its deadline, so the queue stays oldest first
            queue.insert(len(queue) - 1, write)
        else:
            queue.append(write)
        self._queued_calls += 1
        if self._queued_calls == MIN_PIPELINED:
            self._make_room()
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        if self._deadline is None:
            self._deadline = loop.call_later(self.answer_s, self._expire)

    def _take(self) -> Write:
        """The first queued write, off the queue (a merged one complete now)."""
        write = self._queue.popleft()
        self._queued_calls -= write.calls
        if type(write) is Merged:
            write.seal()
        return write

    # Deadlines

    def _expire(self) -> None:
        """Answer every write that waited ``answer_s``: unsent, refused (and taken off the queue); sent, its
        outcome unknown. Then wait for the oldest one left: one timer for the whole queue, not one per write."""
        self._deadline = None
        now = time.monotonic()
        self._refuse_stale(now)
        overdue = [w for w in self._unanswered() if now - w.submitted >= self.answer_s]
        unsent = [w for w in overdue if not w.sent]
        if unsent:
            self._settle(unsent, self.health.fail("Redis writes are backed up: a write could not be sent within "
                                                  "[redis] socket_timeout_s"))
        if len(unsent) < len(overdue):
            self._settle([w for w in overdue if w.sent], self.health.fail(
                "Redis did not answer a write within [redis] socket_timeout_s (it may have been applied)",
                unknown=True))
        oldest = self.oldest_write()
        if oldest is not None:
            self._deadline = asyncio.get_running_loop().call_later(
                max(0.0, oldest + self.answer_s - time.monotonic()), self._expire)

    # Sending

    async def _flush(self) -> None:
        """Send queued writes, a batch at a time, until the queue is empty."""
        while self._queue:
            if not self._may_send():
                self._room = asyncio.get_running_loop().create_future()
                await self._room
                continue
            self._refuse_stale(time.monotonic())
            room, calls = MAX_BATCH - self._sent_calls, 0
            batch = self._batch = []
            while self._queue and calls + self._queue[0].calls <= room:
                write = self._take()
                calls += write.calls
                batch.append(write)
            if not batch:
                break
            try:
                async with asyncio.timeout(self.answer_s):
                    await (self._send_cluster(batch) if self.cluster else self._send(batch, calls))
            except asyncio.CancelledError:
                self._settle(batch, StorageUnavailable("store is closed"))
                raise
            except (rx.RedisError, OSError, TimeoutError) as exc:
                await self._lost(batch, describe(exc))
            except StorageUnavailable as exc:
                await self._lost(batch, str(exc), unknown=isinstance(exc, StorageOutcomeUnknown))
            except Exception as exc:  # a bug must not leave writers waiting
                log.exception("Redis write batch failed unexpectedly")
                self._settle(batch, StorageOutcomeUnknown(f"Redis error: {type(exc).__name__}"))
            finally:
                self._batch = []
            self.batches += 1

    def _may_send(self) -> bool:
        """Whether the next batch may go: on a single server, nothing in flight or ``MIN_PIPELINED`` writes
        waiting, room in flight (``MAX_IN_FLIGHT`` batches, ``MAX_BATCH`` calls), no NOSCRIPT ones being sent
        again, and a connection that carries what is in flight (a lost one is reconnected once that was
        settled)."""
        if self.cluster:
            return True
        if self._in_flight and self._queued_calls < MIN_PIPELINED:
            return False
        if self._held or len(self._in_flight) >= MAX_IN_FLIGHT or (
                self._queue and self._sent_calls + self._queue[0].calls > MAX_BATCH):
            return False
        return not self._in_flight or (self.writer is not None and self.writer.is_connected)

    def _make_room(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def _refuse_stale(self, now: float) -> None:
        """Refuse, unsent, the queued writes that waited ``answer_s`` for their turn."""
        stale: list[Write] = []
        while self._queue and now - self._queue[0].submitted >= self.answer_s:
            stale.append(self._take())
        stale = [w for w in stale if not w.future.done()]
        if stale:
            self._settle(stale, self.health.fail("Redis writes are backed up: a write could not be sent within "
                                                 "[redis] socket_timeout_s"))

    async def _lost(self, batch: Sequence[Write], reason: str, *, unknown: bool = False) -> None:
        """The batch failed as a whole: its sent writes' outcome is unknown; the writes' connection (whose
        replies may be out of step) is dropped."""
        sent = [w for w in batch if w.sent]
        unsent = [w for w in batch if not w.sent]
        if sent or unknown:
            self._settle(sent or batch, self.health.fail(reason, unknown=True))
        if unsent and not unknown:
            self._settle(unsent, self.health.fail(reason))
        if sent and self.writer is not None:
            try:
                await self.writer.disconnect(nowait=True)
            except (rx.RedisError, OSError):
                pass

    def _settle(self, batch: Sequence[Write], outcome: BaseException) -> None:
        for write in batch:
            write.fail(outcome)

    async def drain(self, wait_s: float, stop_s: float) -> None:
        """Let queued writes finish (for at most ``wait_s``), then refuse what is left unsent."""
        running = [t for t in (self._flusher, self._reader) if t is not None and not t.done()]
        if running:
            await asyncio.wait(running, timeout=wait_s)
            for task in running:
                await tasks.stop(task, stop_s)
        queued, self._queue, self._queued_calls = list(self._queue), collections.deque(), 0
        self._settle(queued, StorageUnavailable("store is closed"))
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deliver(self, batch: Sequence[Write], results: Sequence[Any]) -> None:
        """Hand each write its result; a refusal fails that write and marks the link unhealthy."""
        failed = False
        for write, result in zip(batch, results):
            if write.future.done():
                continue
            if isinstance(result, BaseException):
                failed = True
                write.fail(self._refusal(result))
            elif type(write) is Merged:
                failed = write.split(result, self._refusal) or failed
            else:
                write.future.set_result(result)
        if not failed:
            self.health.succeeded()

    def _refusal(self, result: BaseException) -> BaseException:
        """What a write Redis refused or failed is answered with (the link is marked unhealthy)."""
        unknown = isinstance(result, StorageOutcomeUnknown)
        reason = str(result) if isinstance(result, StorageUnavailable) else describe(result)
        return self.health.fail(reason, unknown=unknown)

    async def _send(self, batch: list[Write], calls: int) -> None:
        """Pipeline a batch on a single Redis: it is in flight (``_read`` takes its replies) once this returns."""
        conn = self.writer
        if conn is None:
            raise StorageUnavailable("store is not open")
        if not self._in_flight:
            if conn.is_connected:  # an idle connection the server closed meanwhile would take the batch, then fail
                await asyncio.sleep(0)  # let the loop take in an end of stream that already arrived
                try:
                    if await conn.can_read():  # type: ignore[attr-defined]  # redis-py 8; not in types-redis
                        raise rx.ConnectionError("unexpected data on the writes' connection")
                except (rx.ConnectionError, OSError):
                    await conn.disconnect(nowait=True)
            await conn.connect()  # a failure here: nothing was sent
            # A write refused meanwhile (unsent past its deadline, ``_expire``) must stay unsent: it was answered
            # storage_unavailable, which says it was not stored. None was unless the oldest is past its deadline.
            if time.monotonic() - batch[0].submitted >= self.answer_s:
                batch = [w for w in batch if not w.future.done()]
                calls = sum(w.calls for w in batch)
                if not batch:
                    return
        acks = self.acks.command if any(w.script is not None for w in batch) else None
        commands = [w.args for w in batch]
        if acks is not None:
            commands.append(acks)
        packed = pack(commands, conn.encoder)
        for write in batch:
            write.sent = True
        loop = asyncio.get_running_loop()
        self._in_flight.append(Sent(batch, calls, acks is not None, loop.time() + self.answer_s))
        self._sent_calls += calls
        self._batch = []
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read(conn))
        await conn.send_packed_command(packed, check_health=False)

    async def _read(self, conn: Connection) -> None:
        """Take the replies of the batches in flight, in order, and answer their writes; a batch not answered by
        its deadline, or a broken connection, loses every batch in flight (their outcome is unknown)."""
        while self._in_flight:
            sent = self._in_flight[0]
            try:
                async with asyncio.timeout_at(sent.deadline):
                    results = await self._replies(conn, sent.writes, sent.acks)
            except asyncio.CancelledError:
                self._give_up(StorageUnavailable("store is closed"))
                raise
            except (rx.RedisError, OSError, TimeoutError) as exc:
                await self._lose_in_flight(conn, describe(exc))
                continue
            except Exception as exc:  # a bug must not leave writers waiting
                log.exception("reading Redis write replies failed unexpectedly")
                await self._lose_in_flight(conn, f"Redis error: {type(exc).__name__}")
                continue
            self._sent_calls -= self._in_flight.popleft().calls
            if self._held or any(isinstance(r, rx.NoScriptError) for r in results):
                self._held.append((sent, results))
                if not self._in_flight:
                    await self._send_again(conn)
            else:
                self._deliver(sent.writes, results)
            self._make_room()
        self._make_room()

    async def _replies(self, conn: Connection, writes: list[Write], acks: bool) -> list[Any]:
        """Read a batch's replies (and its acknowledgement's); a refusal is that write's result. A plain command's
        result is handed over as soon as it is read: only scripts wait for the acknowledgement."""
        results: list[Any] = []
        for write in writes:
            reply: Any
            try:
                reply = await conn.read_response(timeout=math.inf)
            except rx.ResponseError as exc:
                reply = exc
            results.append(reply)
            if acks and write.script is None and not isinstance(reply, BaseException) and not write.future.done():
                write.future.set_result(reply)
        if acks:
            try:
                ack: Any = await conn.read_response(timeout=math.inf)
            except rx.ResponseError as exc:
                ack = exc
            results = self.acks.apply(ack, results)
        return results

    async def _send_again(self, conn: Connection) -> None:
        """Nothing in flight, no batch sent meanwhile: send the held batches' NOSCRIPT writes again as EVAL (which
        loads their scripts), in order, then answer the held batches in order."""
        again = [(results, i, sent.writes[i]) for sent, results in self._held
                 for i, r in enumerate(results) if isinstance(r, rx.NoScriptError)]
        writes = [write for _, _, write in again]
        acks = self.acks.command if writes else None
        commands = [write.eval_args() for write in writes]
        replies: list[Any]
        try:
            async with asyncio.timeout(self.answer_s):
                await conn.send_packed_command(pack([*commands, acks] if acks else commands, conn.encoder),
                                               check_health=False)
                replies = await self._replies(conn, writes, acks is not None)
        except asyncio.CancelledError:
            self._give_up(StorageUnavailable("store is closed"))
            raise
        except (rx.RedisError, OSError, TimeoutError) as exc:
            replies = [StorageOutcomeUnknown(describe(exc))] * len(writes)
            await _disconnect(conn)
        for (results, i, _), reply in zip(again, replies):
            results[i] = reply
        held, self._held = self._held, []
        for sent, results in held:
            self._deliver(sent.writes, results)

    def _give_up(self, outcome: BaseException) -> None:
        """Answer every write in flight with ``outcome``; the held batches' with what Redis answered, those that
        were to go again as EVAL with ``outcome`` too."""
        held, self._held = self._held, []
        for sent, results in held:
            self._deliver(sent.writes, [outcome if isinstance(r, rx.NoScriptError) else r for r in results])
        in_flight = [w for sent in self._in_flight for w in sent.writes]
        self._in_flight.clear()
        self._sent_calls = 0
        self._settle(in_flight, outcome)
        self._make_room()

    async def _lose_in_flight(self, conn: Connection, reason: str) -> None:
        """The connection broke or stalled: what is in flight or held may have been applied (unknown); the
        connection, whose replies are out of step now, is dropped."""
        self._give_up(self.health.fail(reason, unknown=True))
        await _disconnect(conn)

    async def _send_cluster(self, batch: list[Write]) -> None:
        """One pipeline per master node, concurrently; writes a slot move redirected go once more."""
        client = self.client
        if not isinstance(client, RedisCluster):
            raise StorageUnavailable("store is not open")
        await client.initialize()
        if self._refresh_nodes:
            self._refresh_nodes = False
            await client.nodes_manager.initialize()
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in (1, 2):
            await self._node_pipelines(client, batch, todo, results, eval_source=False)
            noscript = [i for i in todo if isinstance(results[i], rx.NoScriptError)]
            if noscript:
                await self._node_pipelines(client, batch, noscript, results, eval_source=True)
            moved = [i for i in todo if isinstance(results[i], (rx.MovedError, rx.AskError, rx.TryAgainError))]
            if not moved or attempt == 2:
                break
            await client.nodes_manager.initialize()
            todo = moved
        self._deliver(batch, results)

    async def _node_pipelines(self, client: RedisCluster[str], batch: list[Write], indexes: list[int],
                              results: list[Any], *, eval_source: bool) -> None:
        by_node: dict[ClusterNode, list[int]] = {}
        for i in indexes:
            if batch[i].future.done():  # answered meanwhile (refused unsent past its deadline): not sent now
                continue
            node = client.get_node_from_key(batch[i].key)
            if node is None:
                results[i] = StorageUnavailable("the Redis Cluster has no node for a key's slot")
                continue
            by_node.setdefault(node, []).append(i)
        async def run(node: ClusterNode, part: list[int]) -> None:
            commands = [PipelineCommand(n, *flat(batch[i].eval_args() if eval_source else batch[i].args))
                        for n, i in enumerate(part)]
            acks = self.acks.command if any(batch[i].script is not None for i in part) else None
            if acks is not None:
                commands.append(PipelineCommand(len(part), *acks))
            for i in part:
                batch[i].sent = True
            try:
                await node.execute_pipeline(commands)
            except (rx.RedisError, OSError) as exc:
                self._refresh_nodes = isinstance(exc, (rx.ConnectionError, OSError))
                outcome: BaseException = exc
                if _unsent(exc):
                    for i in part:
                        batch[i].sent = False
                else:
                    outcome = StorageOutcomeUnknown(describe(exc))
                for i in part:
                    results[i] = outcome
                return
            replies = [command.result for command in commands]
            if acks is not None:
                replies = self.acks.apply(replies.pop(), replies)
            for i, reply in zip(part, replies):
                results[i] = reply
        await asyncio.gather(*(run(node, part) for node, part in by_node.items()))


async def _disconnect(conn: Connection) -> None:
    try:
        await conn.disconnect(nowait=True)
    except (rx.RedisError, OSError):
        pass


def _unsent(exc: BaseException) -> bool:
    """A Cluster pipeline that failed before anything left: the node could not be connected to."""
    return isinstance(exc, (rx.ConnectionError, OSError)) and ("connecting" in str(exc).lower()
                                                              or isinstance(exc, ConnectionRefusedError))

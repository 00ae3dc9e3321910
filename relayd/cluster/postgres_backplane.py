"""The cluster's ``Backplane`` on PostgreSQL: inboxes over LISTEN/NOTIFY, presence and budgets in (unlogged) tables.

Each instance LISTENs on a channel of its own, on a connection of its own
outside the pool, whose ``application_name`` names the inbox: a publish
counts the listeners it reached by looking that name up in
``pg_stat_activity`` in the same round trip (an instance that is gone or
resubscribing took nothing, at once, as on Redis).

Publishes leave in order on one publishing connection, also outside the
pool: everything queued while a round trip is under way goes together in the
next one (one ``pg_notify`` per notice, in order, in one statement). A
publish leaves only once the writes this instance began before it have
ended, as it would queue behind them on Redis's ordered link: a peer told of
something finds it written.
PostgreSQL delivers one transaction's notifications in order, and drops a
repeated (channel, payload) within one transaction, so each payload starts
with a counter. A payload may hold at most 8000 bytes: a longer envelope is
sent as consecutive chunks, which the listener joins per sending backend.

Budget spends, routed enqueues, restores and this instance's presence writes
of one address run one after the other, in the order they were made (Redis
applies an instance's writes, and answers them, in order; a pool would not):
a sender's messages are stored in send order and get their seqs in it, which
is the order a peer reading the queue delivers them in; and the entry written
when a session signs in is never undone by the removal its address's last
session asked for when it left earlier (during a hang, both wait for the
server, and on two pooled connections the removal could land last, leaving
the address without its entry: nothing would be offered or hinted here).

Presence, watches, heartbeats and budgets are the SQL functions of schema
versions 3 and 4 (``relayd.storage.postgres.schema``): one round trip each,
the clock PostgreSQL's, and every write of an address's presence ordered
against routed enqueues of it by a per-address advisory lock.

With encryption at rest (``relayd.storage.sealed``) nothing that crosses to
PostgreSQL names an address, a messageId or a content: presence, watches and
budgets are keyed by the sealing layer's blind index (so a routed enqueue,
which the sealing layer writes under that index, finds the recipient's
presence), a presence entry carries its address sealed (the online list and
forgetting a dead instance read it back), and every notice is sealed before
``pg_notify``: PostgreSQL keeps its notification queue in ``pg_notify/`` in
its data directory, on disk once it outgrows its buffers. Instance ids stay
clear.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from ..storage.postgres.link import describe, server_cannot_serve
from ..storage.postgres.order import AddressOrder
from ..storage.postgres.queue import pairs
from ..storage.postgres.store import PostgresStore
from ..storage.sealing import SealError
from ..storage.store import EnqueueResult, QueuedMessage, QueueLimits, StorageUnavailable
from ..tasks import retrieved
from .backplane import AddressLabels, Beat, InboxEvents, PresenceEntries, RoutedQueues, Seals

log = logging.getLogger("relayd.cluster")
T = TypeVar("T")

CHUNK = 7900
"""Characters of an envelope per notification (ASCII JSON: bytes), leaving room for the header under 8000."""
CHECK_S = 1.0
"""How often a quiet inbox connection is checked for having closed, or hung (``PostgresBackplane._ping``)."""
PUBLISH = ("SELECT (SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS u(c, p)) AS sent, "
           "ARRAY(SELECT DISTINCT application_name FROM pg_stat_activity WHERE application_name = ANY($3::text[])) "
           "AS heard")
"""The notices of one batch in order, and which of the inboxes they went to listen (one round trip)."""


def _name(instance: str) -> str:
    return hashlib.sha256(instance.encode()).hexdigest()[:32]


def chunks(data: str, counter: itertools.count[int]) -> list[str]:
    """``data`` as notification payloads: ``<n><flag> <part>``; the flag is ``=`` (whole), ``<`` (first of
    several), ``+`` (more follow) or ``>`` (last)."""
    if len(data) <= CHUNK:
        return [f"{next(counter)}= {data}"]
    parts = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    flags = ["<"] + ["+"] * (len(parts) - 2) + [">"]
    return [f"{next(counter)}{flag} {part}" for flag, part in zip(flags, parts)]


class Joiner:
    """Joins the chunks of envelopes, per sending backend; calls ``deliver`` with each whole envelope."""

    def __init__(self, deliver: Callable[[str], None]) -> None:
        self.deliver = deliver
        self.partial: dict[int, list[str]] = {}

    def heard(self, pid: int, payload: str) -> None:
        head, _, part = payload.partition(" ")
        flag = head[-1:]
        if flag == "=":
            self.deliver(part)
        elif flag == "<":
            self.partial[pid] = [part]
        elif pid in self.partial:
            self.partial[pid].append(part)
            if flag == ">":
                self.deliver("".join(self.partial.pop(pid)))
        else:
            log.warning("ignoring a cluster notice whose first part was lost")


class PostgresBackplane:
    """``Backplane`` on the store's PostgreSQL database (see the module docstring). With encryption at rest,
    ``sealed`` is the sealing layer over ``store`` (messages are written through it), ``queue_key`` its blind
    index and ``seals`` its sealer (presence labels and notices)."""

    def __init__(self, store: PostgresStore, *, sealed: RoutedQueues | None = None,
                 queue_key: Callable[[str], str] = str, seals: Seals | None = None) -> None:
        self.store = store
        self.queues: RoutedQueues = sealed if sealed is not None else store
        self.queue_key = queue_key
        self.seals = seals
        self.labels = AddressLabels(seals)
        self.link = store.link
        self.deadline_s = self.link.connect_timeout_s + self.link.command_timeout_s
        self._counter = itertools.count(1)
        self._outbox: list[tuple[str, list[str], str, asyncio.Future[int], list[asyncio.Future[None]]]] = []
        self._wake: asyncio.Event | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._routed = AddressOrder()
        """Per recipient, routed writes and spends one after the other, in the order they were made."""

    @staticmethod
    def channel(instance: str) -> str:
        return f"relayd_inbox_{_name(instance)}"

    @staticmethod
    def application_name(instance: str) -> str:
        return f"relayd inbox {_name(instance)}"

    async def _run(self, sql: str, *args: Any) -> Any:
        return await self.link.run(lambda c: c.fetchrow(sql, *args), write=True)

    # Inboxes

    def publish(self, instance: str, data: str) -> asyncio.Future[int]:
        if self.link.health.failure is not None:  # not merely slow: a notice goes on a connection of its own
            raise StorageUnavailable(self.link.health.failure)
        sent: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        sent.add_done_callback(retrieved)  # a publish nobody awaits
        channel = self.channel(instance)
        if self.seals is not None:
            data = self.seals.seal([data], channel)
        self._outbox.append((channel, chunks(data, self._counter), self.application_name(instance), sent,
                             list(self.link.writing)))
        if self._publisher is None or self._publisher.done():
            self._wake = asyncio.Event()
            self._publisher = asyncio.get_running_loop().create_task(self._publish_loop(), name="relayd-pg-publish")
        assert self._wake is not None
        self._wake.set()
        return sent

    async def _publish_loop(self) -> None:
        """Send what is queued, in order, one round trip at a time, on a connection of its own."""
        assert self._wake is not None
        conn: Any = None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._outbox = self._outbox, []
                if not batch:
                    continue
                earlier = [w for *_, writes in batch for w in writes if not w.done()]
                if earlier:  # a notice leaves after the writes made before it, as on Redis's ordered link
                    await asyncio.wait(earlier, timeout=self.deadline_s)
                channels, payloads = [], []
                for channel, parts, *_ in batch:
                    channels += [channel] * len(parts)
                    payloads += parts
                try:
                    if conn is None or conn.is_closed():
                        conn = await self.link.connect_one("relayd")
                    row = await conn.fetchrow(PUBLISH, channels, payloads, sorted({b[2] for b in batch}))
                except Exception as exc:
                    if not server_cannot_serve(exc):
                        log.exception("publishing cluster notices failed")
                    if conn is not None:
                        conn.terminate()  # lost or hung: a graceful close would hold up the next batch
                    conn = None
                    failure = StorageUnavailable(describe(exc))
                    for _, _, _, sent, _ in batch:
                        if not sent.done():
                            sent.set_exception(failure)
                    continue
                heard = set(row["heard"] or ())
                for _, _, name, sent, _ in batch:
                    if not sent.done():
                        sent.set_result(1 if name in heard else 0)
        finally:
            await _close(conn)

    async def listen(self, instance: str, events: InboxEvents) -> None:
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        channel = self.channel(instance)
        joiner = Joiner(events.received if self.seals is None else self._opener(channel, events))
        try:
            conn = await self.link.connect_one(self.application_name(instance))
        except Exception as exc:
            if server_cannot_serve(exc):
                raise StorageUnavailable(describe(exc)) from None
            raise

        def terminated(_: Any) -> None:
            if not lost.done():
                lost.set_result(None)
        try:
            conn.add_termination_listener(terminated)
            async with asyncio.timeout(self.deadline_s):
                await conn.add_listener(channel, lambda _c, pid, _ch, payload: joiner.heard(pid, payload))
            events.confirmed()
            while not lost.done() and not conn.is_closed():
                try:
                    await asyncio.wait_for(asyncio.shield(lost), CHECK_S)
                except TimeoutError:
                    await self._ping(conn)
            raise StorageUnavailable("the cluster inbox's PostgreSQL connection closed")
        except Exception as exc:
            conn.terminate()  # lost or hung: a graceful close would wait on it too
            if isinstance(exc, (OSError, TimeoutError)) or (not isinstance(exc, StorageUnavailable)
                                                            and server_cannot_serve(exc)):
                raise StorageUnavailable(describe(exc)) from None
            raise
        finally:
            await _close(conn)

    async def _ping(self, conn: Any) -> None:
        """A round trip on the inbox's connection: a stalled link or a hung server never closes it, so silence
        is told from a quiet inbox by asking (within ``command_timeout_s``)."""
        try:
            await conn.fetchval("SELECT 1", timeout=self.link.command_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            raise StorageUnavailable(f"the cluster inbox's PostgreSQL connection did not answer within "
                                     f"{self.link.command_timeout_s:g} s") from None

    def _opener(self, channel: str, events: InboxEvents) -> Callable[[str], None]:
        seals = self.seals
        assert seals is not None

        def received(data: str) -> None:
            try:
                [envelope] = seals.open(data, channel)
            except (SealError, ValueError) as exc:  # another key (a cluster must share its key files) or damage
                log.warning("ignoring a cluster notice that does not open: %s", exc)
                return
            events.received(envelope)
        return received

    def on_recovery(self, callback: Callable[[], None]) -> None:
        before = self.link.health.on_recovery

        def both() -> None:
            if before is not None:
                before()
            callback()
        self.link.health.on_recovery = both

    async def close(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.cancel()
            try:
                await publisher
            except asyncio.CancelledError:
                pass

    # Presence

    def join(self, address: str, instance: str, kind: str,
             watch_ttl_ms: int) -> asyncio.Future[tuple[list[str], PresenceEntries]]:
        if self.link.health.failure is not None:
            raise StorageUnavailable(self.link.health.failure)
        return asyncio.ensure_future(self._in_order([address], lambda: self._join(address, instance, kind,
                                                                                  watch_ttl_ms)))

    async def _join(self, address: str, instance: str, kind: str,
                    watch_ttl_ms: int) -> tuple[list[str], PresenceEntries]:
        key = self.queue_key(address)
        label = self.labels.label(address, key) if kind and self.seals is not None else None
        row = await self._run("SELECT o_watchers, o_presence FROM relayd_join($1, $2, $3, $4, $5)", key, instance,
                              kind, watch_ttl_ms, label)
        return [str(w) for w in row["o_watchers"] or ()], pairs(row["o_presence"])

    async def lookup(self, address: str, instance: str, watch_ttl_ms: int) -> PresenceEntries:
        row = await self._run("SELECT relayd_presence($1, $2, $3) AS p", self.queue_key(address), instance,
                              watch_ttl_ms)
        return pairs(row["p"])

    async def presence_of(self, addresses: list[str]) -> list[PresenceEntries]:
        keys = [self.queue_key(a) for a in addresses]
        rows = await self.link.run(lambda c: c.fetch(
            "SELECT address, instance, kind FROM cluster_presence WHERE address = ANY($1::text[])", keys),
            write=False)
        found: dict[str, PresenceEntries] = {}
        for row in rows:
            found.setdefault(row["address"], {})[row["instance"]] = row["kind"]
        return [found.get(k, {}) for k in keys]

    async def registered(self) -> list[str]:
        rows = await self.link.run(lambda c: c.fetch("SELECT instance FROM cluster_instances ORDER BY beat_at"),
                                   write=False)
        return [str(r["instance"]) for r in rows]

    async def addresses_of(self, instances: list[str]) -> list[str]:
        rows = await self.link.run(lambda c: c.fetch(
            "SELECT address, label FROM cluster_presence WHERE instance = ANY($1::text[])", instances), write=False)
        found = {self.labels.read(str(r["address"]), r["label"]) for r in rows}
        return sorted(a for a in found if a is not None)

    async def heartbeat(self, instance: str, ttl_ms: int, forget_after_ms: int) -> Beat:
        row = await self._run("SELECT o_age, o_live, o_lapsed, o_dead FROM relayd_heartbeat($1, $2, $3)", instance,
                              ttl_ms, forget_after_ms)
        age = row["o_age"]
        return Beat(None if age is None else int(age), tuple(row["o_live"] or ()), tuple(row["o_lapsed"] or ()),
                    tuple(row["o_dead"] or ()))

    async def put_counts(self, instance: str, counts: str) -> None:
        await self.link.run(lambda c: c.execute("UPDATE cluster_instances SET counts = $2 WHERE instance = $1",
                                                instance, counts), write=True)

    async def counts(self) -> dict[str, str]:
        rows = await self.link.run(lambda c: c.fetch("SELECT instance, counts FROM cluster_instances"), write=False)
        return {str(r["instance"]): str(r["counts"]) for r in rows}

    async def leave(self, instance: str) -> None:
        await self.link.run(lambda c: c.execute("DELETE FROM cluster_instances WHERE instance = $1", instance),
                            write=True)

    async def forget(self, instance: str, chunk: int) -> AsyncIterator[tuple[list[str], list[str]]]:
        while True:
            row = await self._run("SELECT o_addresses, o_labels, o_watchers FROM relayd_forget($1, $2)", instance,
                                  chunk)
            keys = [str(a) for a in row["o_addresses"] or ()]
            if not keys:
                return
            addresses = [self.labels.read(k, label) for k, label in zip(keys, row["o_labels"] or ())]
            yield [a for a in addresses if a is not None], [str(w) for w in row["o_watchers"] or ()]

    # Storage routed by presence, and shared counters

    async def enqueue_routed(self, msg: QueuedMessage, limits: QueueLimits, *, watcher: str,
                             watch_ttl_ms: int) -> tuple[EnqueueResult, PresenceEntries]:
        return await self._in_order([msg.recipient], lambda: self.queues.enqueue_routed(
            msg, limits, watcher=watcher, watch_ttl_ms=watch_ttl_ms))

    async def restore_routed(self, messages: list[QueuedMessage]) -> dict[str, PresenceEntries]:
        _, found = await self._in_order(sorted({m.recipient for m in messages}),
                                        lambda: self.queues.restore_routed(messages))
        return found

    async def _in_order(self, recipients: list[str], write: Callable[[], Awaitable[T]]) -> T:
        """Run ``write`` once the routed writes of these recipients made before it have ended (either way), all
        within one deadline of the link's (a hang answers each in time, not one after the other's timeout)."""
        with self.link.bounded():
            return await self._routed.run(recipients, write)

    async def spend(self, key: str, recipient: str, budget: int, window_ms: int) -> bool:
        blind = self.queue_key  # no address (nor IP address) in clear in a budget either
        row = await self._in_order([recipient], lambda: self._run("SELECT relayd_spend($1, $2, $3, $4) AS ok",
                                                                  blind(key), blind(recipient), budget, window_ms))
        return bool(row["ok"])


async def _close(conn: Any) -> None:
    if conn is None:
        return
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:
        conn.terminate()

"""Per-instance inboxes, and requests whose replies are awaited for a bounded time.

Each instance subscribes to its own inbox on the backplane (``backplane``:
Redis Pub/Sub, or PostgreSQL LISTEN/NOTIFY), and the others publish to it in
order. When the subscription is lost it is made again within about a second
of the server answering, and ``on_subscribed`` is called after every
(re)subscription, since whatever was published meanwhile is gone.

Everything sent to one instance in one loop iteration travels as one publish
(an envelope: the sender instance and the messages, see ``envelope``), so a
busy pair of instances pays one round trip for many messages. A publish that reached no subscriber (the instance is gone
or resubscribing) counts as an instance that took nothing, at once; one that
reached it but got no reply within ``reply_timeout_s`` counts the same after
that time. Messages are JSON objects with a kind ``k``; requests carry ``rid``
and ``from``. A request's ``rid`` is a number (older instances: a string):
that says its sender reads replies batched, so the replies to it made in one
loop iteration travel as one ``res`` message (``rid, n, a`` triples) instead
of one ``re`` message each.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .. import tasks
from ..storage.store import StorageUnavailable
from . import envelope
from .backplane import Backplane

log = logging.getLogger("relayd.cluster")

MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 0.5
REPEAT_WARNING_S = 300.0
"""A subscription that keeps failing for the same reason is logged again at most this often (with a count)."""
SWEEPS = 10
"""Checks for unanswered requests per reply timeout."""
Message = envelope.Message
Unheard = Callable[[str], None]
"""Called with an instance a message was meant for when its publish failed or reached no subscriber."""
MAX_COMPACT_PEERS = 1024
"""Peers remembered as reading compact envelopes (instance names change at every start: forgotten past this,
then learned again from their next envelope)."""


class Taken:
    """What the instances asked did with a request: how many sessions took it (their replies' ``n`` summed),
    whether one of them acks (``a``), the instances that did not answer in time (they took nothing, as far as
    the asker knows), and whether one that answered had nobody for it (took nothing, no ack)."""

    __slots__ = ("count", "ack", "silent", "nobody")

    def __init__(self, count: int = 0, ack: bool = False, silent: tuple[str, ...] = (),
                 nobody: bool = False) -> None:
        self.count = count
        self.ack = ack
        self.silent = silent
        self.nobody = nobody

    def __repr__(self) -> str:
        return f"Taken(count={self.count}, ack={self.ack}, silent={self.silent}, nobody={self.nobody})"


Replies = Callable[[Taken], None]
"""Called with what the instances did once every one replied or the time is up."""


class _Pending:
    """One request: the instances asked and those still to answer, the answers summed so far, its deadline (loop
    time), and what to call when done; it leaves ``requests`` (the bus's, by rid) then. Replies are summed as
    they come: no reply object is kept per instance (a live offer's answer is two numbers)."""

    __slots__ = ("asked", "waiting", "count", "ack", "nobody", "lost", "then", "deadline", "finished", "rid",
                 "requests")

    def __init__(self, instances: tuple[str, ...], deadline: float, then: Replies, rid: int,
                 requests: dict[int, _Pending]) -> None:
        self.asked = instances
        self.waiting = set(instances)
        self.count = 0
        self.ack = False
        self.nobody = False
        self.lost: list[str] | None = None
        """Instances that count as silent before the time is up (the publish to them reached nobody)."""
        self.then = then
        self.deadline = deadline
        self.finished = False
        self.rid = rid
        self.requests = requests

    def answered(self, instance: str, n: int, a: bool) -> None:
        waiting = self.waiting
        if instance in waiting:
            waiting.discard(instance)
            self.count += n
            if a:
                self.ack = True
            elif not n:
                self.nobody = True
            if not waiting:
                self._finish()

    def unheard(self, instance: str) -> None:
        """The publish to ``instance`` failed or reached no subscriber: it counts as silent at once."""
        if instance in self.waiting:
            self.waiting.discard(instance)
            if self.lost is None:
                self.lost = []
            self.lost.append(instance)
            if not self.waiting:
                self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.requests.pop(self.rid, None)
        silent: tuple[str, ...] = ()
        if self.waiting or self.lost:
            lost, waiting = self.lost or (), self.waiting
            silent = tuple(i for i in self.asked if i in waiting or i in lost)
        self.then(Taken(self.count, self.ack, silent, self.nobody))


class Bus:
    """This instance's inbox, and messages and requests to the others' (see the module docstring)."""

    def __init__(self, backplane: Backplane, instance: str, reply_timeout_s: float) -> None:
        self.backplane = backplane
        self.instance = instance
        self.reply_timeout_s = reply_timeout_s
        self.handler: Callable[[Message], None] = lambda message: None
        """Called with every message that is not a reply (set by the cluster's routes)."""
        self.heard = 0.0
        """Loop time of the last message received (the heartbeat's own ping proves the inbox works)."""
        self.on_subscribed: Callable[[], None] = lambda: None
        """Called after every successful (re)subscribe: what was published meanwhile is lost, so the owner
        re-reads what it stored (e.g. queues) then."""
        self._pending: dict[int, _Pending] = {}
        """Requests waiting for replies, oldest first (so the sweep stops at the first one not yet due)."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._outbox: dict[str, list[Message]] = {}
        self._unheard: dict[str, list[Unheard]] = {}
        """Per instance, what to call if its outbox batch's publish is not heard."""
        self._replies: dict[str, list[Any]] = {}
        """Per instance, the ``res`` triples last in its outbox batch (replies after it join them, in order)."""
        self._ids = itertools.count(1)
        self._compact = {instance}
        """Instances known to read compact envelopes (the others get objects: ``envelope``)."""
        self._subscribed = asyncio.Event()
        self.problem: str | None = None
        """Why the inbox is not subscribed, while it is not (for readiness), e.g. refused credentials."""
        self.failures = 0
        """Subscription attempts that failed in a row."""
        self._warned_at = float("-inf")
        self._backoff = MIN_BACKOFF_S
        self._listener: asyncio.Task[None] | None = None

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    # Lifecycle

    async def start(self) -> None:
        """Subscribe in the background; waits (bounded) for the first subscription, never raises."""
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            async with asyncio.timeout(self.backplane.deadline_s):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("the cluster inbox is not subscribed yet; relayd keeps trying")

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        self._subscribed.clear()
        if listener is not None:
            await tasks.stop(listener, self.backplane.deadline_s)

    def resubscribe(self) -> None:
        """Drop the subscription and make a new one (the inbox went quiet: the connection may be stale). The old
        listener may take a while to end (its connection's close waits on a link that was stalled): from here on
        only the new one says whether the inbox is subscribed."""
        if self._listener is not None and not self._listener.done():
            self._listener.cancel()
            self._subscribed.clear()
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    # Sending

    def send(self, instance: str, body: Message, unheard: Unheard | None = None) -> None:
        """Queue ``body`` for an instance's inbox; it goes out at the end of this loop iteration, with whatever
        else is sent there meanwhile. ``unheard`` is called with the instance if the publish fails or reaches no
        subscriber."""
        batch = self._outbox.get(instance)
        if batch is None:
            if not self._outbox:
                asyncio.get_running_loop().call_soon(self._publish)
            batch = self._outbox[instance] = []
        batch.append(body)
        if unheard is not None:
            callbacks = self._unheard.get(instance)
            if callbacks is None:
                callbacks = self._unheard[instance] = []
            callbacks.append(unheard)
        if self._replies:
            self._replies.pop(instance, None)

    def _publish(self) -> None:
        outbox, self._outbox = self._outbox, {}
        unheard, self._unheard = self._unheard, {}
        self._replies.clear()
        for instance, batch in outbox.items():
            data = envelope.encode(self.instance, batch, compact=instance in self._compact)
            callbacks = unheard.get(instance)
            try:
                sent = self.backplane.publish(instance, data)
            except StorageUnavailable:
                for callback in callbacks or ():
                    callback(instance)
                continue
            if callbacks:
                sent.add_done_callback(functools.partial(_tell_unheard, instance=instance, callbacks=callbacks))

    def ask(self, instances: Iterable[str], body: Message, then: Replies) -> None:
        """Send ``body`` (the bus's from here on: it gets the ``rid``) to each instance; ``then`` gets what they
        did once all replied or ``reply_timeout_s`` passed (never later), from the event loop."""
        rid = next(self._ids)
        body["rid"] = rid
        asked = instances if type(instances) is tuple and len(instances) < 2 else tuple(dict.fromkeys(instances))
        loop = asyncio.get_running_loop()
        pending = _Pending(asked, loop.time() + self.reply_timeout_s, then, rid, self._pending)
        self._pending[rid] = pending
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.reply_timeout_s / SWEEPS, self._sweep)
        unheard = pending.unheard
        for instance in asked:
            self.send(instance, body, unheard)
        if not asked:
            pending._finish()

    def _sweep(self) -> None:
        """End the requests past their deadline (one timer for all: at most ``reply_timeout_s / SWEEPS`` late)."""
        now = asyncio.get_running_loop().time()
        due = []
        for pending in self._pending.values():
            if pending.deadline > now:
                break
            due.append(pending)
        for pending in due:
            pending._finish()
        self._sweeper = (asyncio.get_running_loop().call_later(self.reply_timeout_s / SWEEPS, self._sweep)
                         if self._pending else None)

    async def request(self, instances: Iterable[str], body: Message) -> Taken:
        """``ask``, awaited: what the instances did. Never raises for a missing one."""
        done: asyncio.Future[Taken] = asyncio.get_running_loop().create_future()
        def then(taken: Taken) -> None:
            if not done.done():
                done.set_result(taken)
        self.ask(instances, body, then)
        return await done

    def reply(self, request: Message, n: int = 0, a: bool = False) -> None:
        """Answer a request received through the inbox: ``n`` sessions took it, ``a`` one of them acks (all a
        reply says)."""
        rid, instance = request.get("rid"), request.get("from")
        if rid is None or instance is None:
            return
        if type(rid) is not int:  # an older instance's request: one reply message each
            self.send(instance, {"n": n, "a": 1, "k": "re", "rid": rid} if a else {"n": n, "k": "re", "rid": rid})
            return
        triples = self._replies.get(instance)
        if triples is None:
            triples = []
            self.send(instance, {"k": "res", "r": triples})
            self._replies[instance] = triples
        triples += (rid, n, 1 if a else 0)

    # Receiving

    def received(self, data: str) -> None:
        """``InboxEvents``: an envelope arrived."""
        self.heard = asyncio.get_running_loop().time()
        try:
            sender, messages, compact = envelope.decode(data)
        except envelope.Malformed:
            log.warning("ignoring a malformed cluster message")
            return
        if compact and sender not in self._compact:
            if len(self._compact) >= MAX_COMPACT_PEERS:
                self._compact = {self.instance}
            self._compact.add(sender)
        for message in messages:
            message["from"] = sender
            self._apply(message)

    def _apply(self, message: Message) -> None:
        kind = message.get("k")
        if kind == "res":
            self._answered(str(message.get("from")), message.get("r"))
            return
        if kind == "re":
            rid = message.get("rid")
            pending = self._pending.get(rid) if type(rid) is int else None
            if pending is not None:
                pending.answered(str(message.get("from")), _number(message.get("n", 0)), bool(message.get("a")))
            return
        try:
            self.handler(message)
        except Exception:
            log.exception("cluster message %r failed", message.get("k"))

    def _answered(self, instance: str, triples: Any) -> None:
        """A batched reply: ``rid, n, a`` for each request answered."""
        if not isinstance(triples, list):
            return
        pending_of = self._pending.get
        for i in range(0, len(triples) - 2, 3):
            pending = pending_of(triples[i])
            if pending is not None:
                n = triples[i + 1]
                pending.answered(instance, n if type(n) is int else _number(n), bool(triples[i + 2]))

    async def _listen(self) -> None:
        """Subscribe and read until the subscription ends or fails; then again after a short backoff (at most
        ``MAX_BACKOFF_S``, so a lost inbox is back within about a second of the server)."""
        self._backoff = MIN_BACKOFF_S
        while True:
            try:
                await self.backplane.listen(self.instance, self)
            except asyncio.CancelledError:
                raise
            except StorageUnavailable as exc:
                self._failed(str(exc))
            except Exception:
                log.exception("cluster inbox failed; subscribing again")
                self.problem = "the cluster inbox failed (see the log)"
            finally:
                if asyncio.current_task() is self._listener:  # not a listener replaced meanwhile
                    self._subscribed.clear()
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _failed(self, reason: str) -> None:
        """Log a failed subscription when its reason changes, else at most every ``REPEAT_WARNING_S``."""
        now = asyncio.get_running_loop().time()
        self.failures += 1
        if reason != self.problem or now - self._warned_at >= REPEAT_WARNING_S:
            repeated = f" ({self.failures} attempts so far)" if self.failures > 1 else ""
            log.warning("cluster inbox lost (%s); subscribing again%s; /health/ready says not ready until it "
                        "is back", reason, repeated)
            self._warned_at = now
        self.problem = reason

    def confirmed(self) -> None:
        """``InboxEvents``: the inbox is subscribed (unless a listener replaced by ``resubscribe`` says so)."""
        if asyncio.current_task() is not self._listener:
            return
        self._backoff = MIN_BACKOFF_S
        self.heard = asyncio.get_running_loop().time()
        if self.failures:
            log.info("cluster inbox subscribed again after %d failed attempt%s", self.failures,
                     "" if self.failures == 1 else "s")
        self.failures, self.problem, self._warned_at = 0, None, float("-inf")
        self._subscribed.set()
        try:
            self.on_subscribed()
        except Exception:
            log.exception("the cluster inbox's on_subscribed hook failed")


def _tell_unheard(sent: asyncio.Future[Any], *, instance: str, callbacks: list[Unheard]) -> None:
    if _unheard(sent):
        for callback in callbacks:
            callback(instance)


def _number(value: Any) -> int:
    """A reply's ``n`` as sent by any version (0 for anything that is not a count)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _unheard(sent: asyncio.Future[Any]) -> bool:
    """A publish that failed, or that no subscriber received."""
    if sent.cancelled() or sent.exception() is not None:
        return True
    try:
        return int(sent.result()) == 0
    except (TypeError, ValueError):
        return False

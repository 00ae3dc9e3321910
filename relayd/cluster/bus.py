"""Per-instance inboxes on Redis Pub/Sub, and requests whose replies are awaited for a bounded time.

Each instance subscribes to one channel, ``PREFIX{INSTANCE}:inbox``, and the
others publish to it. On Redis 7 and later these are shard channels
(``SSUBSCRIBE``/``SPUBLISH``): on a Cluster a message travels to the one shard
that owns the inbox's slot instead of being broadcast to every node; older
servers get plain ``SUBSCRIBE``/``PUBLISH``. Publishes go through the store's
ordered write queue (``RedisLink``), so one instance's messages to another
arrive in the order they were sent and share round trips with its writes.

A publish that reached no subscriber (the instance is gone or resubscribing)
counts as an instance that took nothing, at once; one that reached it but got
no reply within ``reply_timeout_s`` counts the same after that time. Messages
are JSON objects with a kind ``k``; requests carry ``rid`` and ``from``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis

from ..storage.redis.connection import RedisLink, describe
from ..storage.store import StorageUnavailable

log = logging.getLogger("relayd.cluster")

MAX_BACKOFF_S = 2.0
Message = dict[str, Any]


class _Pending:
    """One request: the instances still to answer, the answers, and a future done when all answered."""

    __slots__ = ("waiting", "replies", "done")

    def __init__(self, instances: Iterable[str]) -> None:
        self.waiting = set(instances)
        self.replies: dict[str, Message] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.waiting:
            self.done.set_result(None)

    def answered(self, instance: str, reply: Message | None) -> None:
        if instance in self.waiting:
            self.waiting.discard(instance)
            if reply is not None:
                self.replies[instance] = reply
            if not self.waiting and not self.done.done():
                self.done.set_result(None)


class Bus:
    """This instance's inbox, and messages and requests to the others' (see the module docstring)."""

    def __init__(self, link: RedisLink, prefix: str, instance: str, reply_timeout_s: float) -> None:
        self.link = link
        self.prefix = prefix
        self.instance = instance
        self.reply_timeout_s = reply_timeout_s
        self.channel = self.inbox(instance)
        self.sharded = True
        self.handler: Callable[[Message], None] = lambda message: None
        """Called with every message that is not a reply (set by the cluster's routes)."""
        self.heard = 0.0
        """Loop time of the last message received (the heartbeat's own ping proves the inbox works)."""
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def inbox(self, instance: str) -> str:
        return f"{self.prefix}{{{instance}}}:inbox"

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    # Lifecycle

    async def start(self, sharded: bool) -> None:
        """Subscribe in the background; waits (bounded) for the first subscription, never raises."""
        self.sharded = sharded
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            async with asyncio.timeout(self.link.deadline_s):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("the cluster inbox is not subscribed yet; relayd keeps trying")

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    def resubscribe(self) -> None:
        """Drop the subscription and make a new one (the inbox went quiet: the connection may be stale)."""
        if self._listener is not None and not self._listener.done():
            self._listener.cancel()
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    # Sending

    def send(self, instance: str, body: Message) -> asyncio.Future[Any]:
        """Publish ``body`` to an instance's inbox without waiting; the future holds how many subscribers got it
        (0: nobody listens there) or StorageUnavailable."""
        channel = self.inbox(instance)
        data = json.dumps(body, separators=(",", ":"))
        try:
            return self.link.post_command("SPUBLISH" if self.sharded else "PUBLISH", channel, data, key=channel)
        except StorageUnavailable as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            failed.exception()
            return failed

    async def request(self, instances: Iterable[str], body: Message) -> tuple[dict[str, Message], tuple[str, ...]]:
        """Send ``body`` to each instance and wait (at most ``reply_timeout_s``) for their replies.

        Returns (replies by instance, instances that did not reply). Never raises for a missing reply.
        """
        rid = f"{next(self._ids)}"
        asked = list(dict.fromkeys(instances))
        pending = _Pending(asked)
        self._pending[rid] = pending
        try:
            for instance in asked:
                sent = self.send(instance, {**body, "rid": rid, "from": self.instance})
                sent.add_done_callback(lambda f, i=instance: _unheard(f) and pending.answered(i, None))
            async with asyncio.timeout(self.reply_timeout_s):
                await asyncio.shield(pending.done)
        except TimeoutError:
            pass
        finally:
            self._pending.pop(rid, None)
        return pending.replies, tuple(i for i in asked if i not in pending.replies)

    def reply(self, request: Message, body: Message) -> None:
        """Answer a request received through the inbox."""
        if "rid" in request and "from" in request:
            self.send(request["from"], {**body, "k": "re", "rid": request["rid"], "from": self.instance})

    # Receiving

    def _dispatch(self, data: str) -> None:
        self.heard = asyncio.get_running_loop().time()
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("ignoring a malformed cluster message")
            return
        if not isinstance(message, dict):
            return
        if message.get("k") == "re":
            pending = self._pending.get(str(message.get("rid")))
            if pending is not None:
                pending.answered(str(message.get("from")), message)
            return
        try:
            self.handler(message)
        except Exception:
            log.exception("cluster message %r failed", message.get("k"))

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            client = pubsub = None
            try:
                client = await self._subscriber()
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(self.link.deadline_s):
                    await (pubsub.ssubscribe(self.channel) if self.sharded else pubsub.subscribe(self.channel))
                self.heard = asyncio.get_running_loop().time()
                self._subscribed.set()
                backoff = 0.05
                while pubsub.subscribed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") in ("message", "smessage"):
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except rx.ResponseError as exc:
                if self.sharded and "unknown command" in str(exc).lower():
                    log.warning("Redis has no sharded Pub/Sub (Redis 7): the cluster uses plain Pub/Sub")
                    self.sharded = False
                    continue
                log.warning("cluster inbox: %s", describe(exc))
            except (rx.RedisError, OSError, TimeoutError, StorageUnavailable) as exc:
                log.warning("cluster inbox lost (%s); subscribing again",
                            exc if isinstance(exc, StorageUnavailable) else describe(exc))
            except Exception:
                log.exception("cluster inbox failed; subscribing again")
            finally:
                self._subscribed.clear()
                await _close_quietly(pubsub, client, self.link.deadline_s)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _subscriber(self) -> Redis:
        """A client of its own for the subscription: the server, or the Cluster node that owns the inbox's slot."""
        url = self.link.url
        if self.link.cluster:
            await self.link.read(lambda c: c.initialize())
            node = self.link.client.get_node_from_key(self.channel)
            parts = urllib.parse.urlsplit(url)
            auth = parts.netloc.rpartition("@")[0]
            host = f"[{node.host}]" if ":" in node.host else node.host
            url = urllib.parse.urlunsplit(parts._replace(netloc=f"{auth + '@' if auth else ''}{host}:{node.port}"))
        return Redis.from_url(url, decode_responses=True, socket_connect_timeout=self.link.socket_timeout_s,
                              socket_timeout=self.link.socket_timeout_s)


def _unheard(sent: asyncio.Future[Any]) -> bool:
    """A publish that failed, or that no subscriber received."""
    if sent.cancelled() or sent.exception() is not None:
        return True
    try:
        return int(sent.result()) == 0
    except (TypeError, ValueError):
        return False


async def _close_quietly(pubsub: Any, client: Any, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()
    except (rx.RedisError, OSError, TimeoutError):
        pass

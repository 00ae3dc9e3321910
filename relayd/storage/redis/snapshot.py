"""A Redis relay's data for ``relayd migrate``: found with SCAN (never KEYS) under a key prefix, on one Redis or on
every primary of a Redis Cluster, and read address by address.

The key names are ``layout``'s, the values ``records``' and ``scripts``'. Each
primary is read with a plain connection of its own: every key of an address
shares one hash slot, so what SCAN finds on a node is read on that node. The
read is live, not one consistent instant (Redis has no read-only transaction
across keys): stop the source's relays for an exact copy, or re-run the
migration afterwards (nothing is copied twice).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rx
from redis.asyncio import Redis

from ...config.redact import redact_url
from ..store import (KeyRecord, PushSubscription, QueuedMessage, Receipt, StorageUnavailable,
                     StoreOpenError)
from .records import decode_key, decode_message
from .reasons import describe

T = TypeVar("T")
SCAN_COUNT = 1000
PAGE = 500
"""Records read in one round trip."""
_SLOT_TAG = re.compile(r"~\d+")
"""The tags of per-slot keys (``layout.slot_tag``), never an address."""
_WANTED = ("q", "rq", "key", "kf", "lock", "tok", "d", "h", "push")
"""The per-address keys that say an address has something to copy."""


def _connect(url: str) -> Redis[str]:
    client: Redis[str] = Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=10)
    return client


def _at(url: str, host: str, port: int) -> str:
    """``url`` (its credentials, TLS and options) pointed at another node."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{where}" if userinfo else where))


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


class RedisSnapshot:
    """The ``Snapshot`` (see ``storage.snapshot``) of the relayd data under ``prefix`` on a Redis or a Cluster."""

    def __init__(self, nodes: list[Redis[str]], prefix: str, found: list[dict[str, set[str]]]) -> None:
        self._nodes = nodes
        self._prefix = prefix
        self._found = found
        """Per node: key name suffix (``_WANTED``) -> the addresses that have that key."""

    @classmethod
    async def open(cls, url: str, prefix: str) -> RedisSnapshot:
        """Connect (to every primary of a Cluster) and list what is stored; raises StoreOpenError."""
        nodes: list[Redis[str]] = []
        try:
            seed = _connect(url)
            nodes.append(seed)
            info = await seed.info("cluster")
            if info.get("cluster_enabled"):
                primaries = await cls._primaries(seed)
                nodes = [seed if myself else _connect(_at(url, host, port)) for host, port, myself in primaries]
                if seed not in nodes:  # the URL names a replica: only primaries are read
                    await seed.aclose()  # type: ignore[attr-defined]  # redis-py >= 5 (stubs predate it)
            snapshot = cls(nodes, prefix, [])
            snapshot._found = [await snapshot._scan(node) for node in nodes]
        except (rx.RedisError, OSError) as exc:
            for node in nodes:
                await node.aclose()  # type: ignore[attr-defined]
            raise StoreOpenError(f"cannot read Redis {redact_url(url)}: {describe(exc)}") from None
        if not any(any(found.values()) for found in snapshot._found):
            await snapshot.close()
            raise StoreOpenError(f"{redact_url(url)} holds no relayd data under the key prefix {prefix!r} "
                                 "([redis] key_prefix): nothing to migrate")
        return snapshot

    @staticmethod
    async def _primaries(seed: Redis[str]) -> list[tuple[str, int, bool]]:
        """The Cluster's live primaries as (host, port, whether it is ``seed``), from CLUSTER NODES."""
        nodes: dict[str, dict[str, Any]] = await seed.execute_command(  # type: ignore[no-untyped-call]
            "CLUSTER NODES")  # parsed by redis-py: "host:port" -> fields
        primaries = []
        for address, node in nodes.items():
            flags = set(str(node.get("flags", "")).split(","))
            if "master" in flags and not {"fail", "fail?", "noaddr"} & flags:
                host, _, port = address.split("@")[0].rpartition(":")
                primaries.append((host, int(port), "myself" in flags))
        return primaries

    async def _scan(self, node: Redis[str]) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {name: set() for name in _WANTED}
        start = len(self._prefix) + 1
        async for name in node.scan_iter(match=f"{_glob_escape(self._prefix)}{{*}}:*", count=SCAN_COUNT):
            tag, sep, kind = name[start:].rpartition("}:")
            if sep and kind in found and not _SLOT_TAG.fullmatch(tag):
                found[kind].add(tag)
        return found

    def _own(self, address: str, name: str) -> str:
        return f"{self._prefix}{{{address}}}:{name}"

    async def _having(self, kind: str) -> AsyncIterator[tuple[Redis[str], str]]:
        for node, found in zip(self._nodes, self._found):
            for address in sorted(found[kind]):
                yield node, address

    def messages(self) -> AsyncIterator[QueuedMessage]:
        return _guarded(self._messages())

    def receipts(self) -> AsyncIterator[tuple[Receipt, int]]:
        return _guarded(self._receipts())

    def keys(self) -> AsyncIterator[KeyRecord]:
        return _guarded(self._keys())

    def locks(self) -> AsyncIterator[str]:
        return _guarded(self._locks())

    def floors(self) -> AsyncIterator[tuple[str, int]]:
        return _guarded(self._floors())

    def delivered(self) -> AsyncIterator[QueuedMessage]:
        return _guarded(self._delivered())

    def history(self) -> AsyncIterator[tuple[QueuedMessage, int]]:
        return _guarded(self._history())

    def push_subscriptions(self) -> AsyncIterator[PushSubscription]:
        return _guarded(self._push_subscriptions())

    def tokens(self, now_ms: int) -> AsyncIterator[tuple[str, str, int]]:
        return _guarded(self._tokens(now_ms))

    async def _messages(self) -> AsyncIterator[QueuedMessage]:
        async for node, address in self._having("q"):
            start = 0
            while True:
                seqs = await node.zrange(self._own(address, "q"), start, start + PAGE - 1)
                if not seqs:
                    break
                for seq, record in zip(seqs, await node.hmget(self._own(address, "m"), seqs)):
                    if record is not None:
                        msg = decode_message(address, seq, record)
                        msg.seq = 0
                        yield msg
                start += PAGE

    async def _receipts(self) -> AsyncIterator[tuple[Receipt, int]]:
        async for node, address in self._having("rq"):
            seqs = await node.zrange(self._own(address, "rq"), 0, -1)
            for part in range(0, len(seqs), PAGE):
                chunk = seqs[part:part + PAGE]
                for seq, record in zip(chunk, await node.hmget(self._own(address, "rm"), chunk)):
                    if record is not None:
                        reader, message_id, timestamp = json.loads(record)
                        yield Receipt(address, reader, message_id, int(timestamp)), int(seq)

    async def _keys(self) -> AsyncIterator[KeyRecord]:
        async for node, address in self._having("key"):
            record = await self._key_of(node, address)
            if record is not None:
                yield record

    async def key(self, address: str) -> KeyRecord | None:
        for node, found in zip(self._nodes, self._found):
            if address in found["key"]:
                try:
                    return await self._key_of(node, address)
                except (rx.RedisError, OSError) as exc:
                    raise _failed(exc) from None
        return None

    async def _key_of(self, node: Redis[str], address: str) -> KeyRecord | None:
        fields = await node.hgetall(self._own(address, "key"))
        return decode_key(address, fields) if fields else None

    async def _locks(self) -> AsyncIterator[str]:
        async for _, address in self._having("lock"):
            yield address

    async def _floors(self) -> AsyncIterator[tuple[str, int]]:
        async for node, address in self._having("kf"):
            value = await node.get(self._own(address, "kf"))
            if value is not None:
                yield address, int(value)

    async def _tokens(self, now_ms: int) -> AsyncIterator[tuple[str, str, int]]:
        found: list[tuple[str, str, int]] = []
        async for node, address in self._having("tok"):
            for token_hash, expires in await node.zrangebyscore(self._own(address, "tok"), f"({now_ms}", "+inf",
                                                                withscores=True):
                found.append((token_hash, address, int(expires)))
        for token in sorted(found, key=lambda t: t[2]):
            yield token

    async def _delivered(self) -> AsyncIterator[QueuedMessage]:
        async for node, address in self._having("d"):
            for member, queued_at in await node.zrange(self._own(address, "d"), 0, -1, withscores=True):
                sender, _, message_id = member.partition("\n")
                yield QueuedMessage(address, sender, message_id, "", 0, int(queued_at))

    async def _history(self) -> AsyncIterator[tuple[QueuedMessage, int]]:
        async for node, address in self._having("h"):
            kept: dict[str, str] = await node.hgetall(self._own(address, "h"))
            until = dict(await node.zrange(self._own(address, "hu"), 0, -1, withscores=True))
            for ident, value in kept.items():
                seq, _, record = value.partition(" ")
                yield decode_message(address, seq, record), int(until.get(ident, 0))

    async def _push_subscriptions(self) -> AsyncIterator[PushSubscription]:
        async for node, address in self._having("push"):
            records: dict[str, str] = await node.hgetall(self._own(address, "push"))
            created = dict(await node.zrange(self._own(address, "pushc"), 0, -1, withscores=True))
            expires = int(await node.get(self._own(address, "pushx")) or 0)
            for sub_id, raw in sorted(records.items(), key=lambda item: (created.get(item[0], 0), item[0])):
                provider, target, p256dh, auth = json.loads(raw)[:4]
                yield PushSubscription(sub_id, address, provider, target, p256dh, auth,
                                       int(created.get(sub_id, 0)), expires)

    async def close(self) -> None:
        for node in self._nodes:
            await node.aclose()  # type: ignore[attr-defined]  # redis-py >= 5 (stubs predate it)


async def _guarded(items: AsyncIterator[T]) -> AsyncIterator[T]:
    """``items``, with a failure of the source Redis as ``StorageUnavailable`` naming the source."""
    try:
        async for item in items:
            yield item
    except (rx.RedisError, OSError) as exc:
        raise _failed(exc) from None


def _failed(exc: BaseException) -> StorageUnavailable:
    return StorageUnavailable(f"reading the source Redis failed: {describe(exc)}")

"""The Redis store's lifecycle: open (check the server, say what ``queued`` means on it), close, and the probe
that keeps health current.

A part of ``RedisStore``. At open one log line says how durable a ``queued``
answer is on this Redis (memory only, AOF and its fsync policy, replicas
awaited), with a WARNING when it means memory only. On Redis >= 7.2 with the
AOF fsynced ``always`` or ``everysec``, every batch of the store's writes is
acknowledged with WAITAOF (the local fsync, and ``min_replicas`` replicas')
instead of WAIT, so ``queued`` means on disk.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster

from ... import tasks
from ..store import StorageUnavailable, StoreOpenError
from . import scripts
from .connection import Commands
from .core import StoreCore
from .reasons import describe
from .records import now_ms

log = logging.getLogger("relayd.storage")

MIN_VERSION = (5, 0)
PROBE_TTL_MS = 60_000


@dataclass(slots=True)
class Durability:
    """What the server said about persistence and replication (the weakest primary's, on a Cluster)."""

    appendonly: bool = False
    appendfsync: str | None = None
    """always, everysec, no, or None when CONFIG GET was refused."""
    replicas: int = 0
    """Replicas connected (to the primary with the fewest)."""
    waitaof: bool = False
    """The server has WAITAOF (Redis >= 7.2)."""
    versions: list[tuple[int, ...]] = field(default_factory=list)
    maxmemory: int | None = None
    """The smallest primary's ``maxmemory`` (0: none set; None: INFO memory did not say)."""

    def uses_waitaof(self) -> bool:
        return self.waitaof and self.appendonly and self.appendfsync in ("always", "everysec")

    def describe(self, min_replicas: int) -> tuple[int, str]:
        """(log level, the one line saying what ``queued`` means on this Redis)."""
        level = logging.INFO
        if not self.appendonly:
            level, where = logging.WARNING, "in memory only (appendonly no): a Redis restart loses queued messages"
        elif self.appendfsync == "always":
            where = "in the AOF, fsynced before Redis answers (appendfsync always)"
        elif self.appendfsync == "everysec" and self.uses_waitaof():
            where = "in the AOF, fsynced before relayd answers (appendfsync everysec, WAITAOF)"
        elif self.appendfsync == "everysec":
            where = "in the AOF, fsynced within about a second (appendfsync everysec: a crash may lose that second)"
        elif self.appendfsync == "no":
            level, where = logging.WARNING, ("in the AOF but in memory until the OS writes it (appendfsync no): a "
                                             "machine crash may lose queued messages")
        else:
            where = "in the AOF, with an unknown fsync policy (CONFIG GET appendfsync was refused)"
        how = "WAITAOF" if self.uses_waitaof() else "WAIT"
        if min_replicas:
            where += f", and acknowledged by {min_replicas} replica(s) ({how}; {self.replicas} connected)"
        elif self.replicas:
            where += f"; copied to {self.replicas} replica(s) without waiting ([redis] min_replicas = 0)"
        return level, f"Redis durability: queued = {where}"


class RedisLifecycle:
    def __init__(self, core: StoreCore, *, node_id: str, probe_interval_s: float,
                 refresh_interval_s: float) -> None:
        self.core = core
        self.link = core.link
        self.node_id = node_id
        self.probe_interval_s = probe_interval_s
        self.refresh_interval_s = refresh_interval_s
        self.server_version: tuple[int, ...] = ()
        """The oldest primary's version, (major, minor); () until the server was reached."""
        self.durability: Durability | None = None
        """What ``queued`` means on this Redis, read at open (None until the server was reached)."""
        self.prober: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and check the server. Wrong credentials or a too old server stop relayd
        (StoreOpenError); an unreachable Redis does not: relayd starts unhealthy and recovers."""
        if self.prober is not None:
            return
        self.link.connect()
        try:
            await self._check_server()
        except StoreOpenError:
            await self.link.close()
            raise
        except StorageUnavailable as exc:
            log.warning("Redis is not usable yet (%s); relayd starts and keeps trying", exc)
        self.prober = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        prober, self.prober = self.prober, None
        if prober is not None:
            await tasks.stop(prober, self.link.deadline_s)
        await self.link.close()

    async def _each_primary(self, *args: Any) -> list[Any]:
        """One command on the server, or on every primary of a Cluster; their replies."""
        client = self.link.client
        if isinstance(client, RedisCluster):
            await client.initialize()
            return [await node.execute_command(*args) for node in client.get_primaries()]
        if client is None:
            raise StorageUnavailable("store is not open")
        return [await client.execute_command(*args)]  # type: ignore[no-untyped-call]  # untyped in types-redis

    async def _read_server(self) -> Durability:
        found = Durability()
        persistence = await self._each_primary("INFO", "persistence")
        replication = await self._each_primary("INFO", "replication")
        server = await self._each_primary("INFO", "server")
        memory = [int(info["maxmemory"]) for info in await self._each_primary("INFO", "memory")
                  if str(info.get("maxmemory", "")).isdigit()]
        bounded = [m for m in memory if m]
        found.maxmemory = min(bounded) if bounded else (0 if memory else None)
        for info in server:
            version = str(info.get("redis_version", "0"))
            parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if parts < MIN_VERSION:
                raise StoreOpenError(f"Redis {version} is too old: relayd needs Redis 5.0 or newer")
            found.versions.append(parts)
        found.appendonly = all(int(info.get("aof_enabled", 0)) == 1 for info in persistence)
        found.replicas = min(int(info.get("connected_slaves", 0)) for info in replication)
        try:
            policies = {str(dict(reply).get("appendfsync", "")) for reply in
                        await self._each_primary("CONFIG", "GET", "appendfsync")}
            weakest = [p for p in ("no", "everysec", "always") if p in policies]
            found.appendfsync = weakest[0] if weakest else None
        except rx.ResponseError:  # CONFIG renamed or not allowed for this user
            found.appendfsync = None
        try:
            await self._each_primary("WAITAOF", 0, 0, 0)
            found.waitaof = True
        except rx.ResponseError:  # unknown command before Redis 7.2
            found.waitaof = False
        return found

    async def _check_server(self) -> None:
        try:
            async with asyncio.timeout(self.link.deadline_s):
                durability = await self._read_server()
        except StoreOpenError:
            raise
        except (rx.RedisError, OSError, TimeoutError) as exc:
            reason = describe(exc)
            if isinstance(exc, (rx.AuthenticationError, rx.NoPermissionError)) or "credentials" in reason \
                    or "password" in reason:
                raise StoreOpenError(f"cannot use Redis: {reason}") from None
            raise self.link.fail(reason) from None
        self.server_version = min(durability.versions)
        self.durability = durability
        if durability.uses_waitaof():
            self.link.use_waitaof(everysec=durability.appendfsync == "everysec")
        level, line = durability.describe(self.link.min_replicas)
        log.log(level, "%s", line)
        await self.probe()
        await self.refresh_total()

    async def _probe_loop(self) -> None:
        """Write a probe key now and then, so health follows Redis even without traffic."""
        next_refresh = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.probe()
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + self.refresh_interval_s
                    await self.refresh_total()
            except StorageUnavailable:
                pass
            except Exception:  # keep probing whatever happens
                log.exception("Redis health probe failed")

    async def probe(self) -> None:
        """One write round trip (and WAIT/WAITAOF); marks the store healthy or unhealthy. Raises
        StorageUnavailable."""
        if self.link.cluster:
            async def ping(client: Commands) -> bool:
                return await client.ping(target_nodes=RedisCluster.PRIMARIES)
            await self.link.read(ping)
        await self.link.write(scripts.PROBE, [self.core.layout.probe(self.node_id)], [now_ms(), PROBE_TTL_MS])

    async def refresh_total(self) -> None:
        """Read every slot's totals, so the sums include what other instances stored."""
        await self.core.stats()

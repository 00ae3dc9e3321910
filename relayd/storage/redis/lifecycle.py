"""The Redis store's lifecycle: open (check the server), close, and the probe that keeps health current.

A part of ``RedisStore``; needs its ``link``, ``layout``, ``node_id``,
``probe_interval_s``, ``refresh_interval_s`` and ``stats``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis import exceptions as rx

from ... import tasks
from ..store import StorageUnavailable, StoreOpenError
from . import scripts
from .connection import RedisLink
from .layout import Layout
from .reasons import describe
from .records import now_ms

log = logging.getLogger("relayd.storage")

MIN_VERSION = (5, 0)
PROBE_TTL_MS = 60_000


class RedisLifecycle:
    link: RedisLink
    layout: Layout
    node_id: str
    probe_interval_s: float
    refresh_interval_s: float
    server_version: tuple[int, ...]
    _prober: asyncio.Task[None] | None
    stats: Callable[[], Awaitable[dict[str, int]]]

    async def open(self) -> None:
        """Connect and check the server. Wrong credentials or a too old server stop relayd
        (StoreOpenError); an unreachable Redis does not: relayd starts unhealthy and recovers."""
        if self._prober is not None:
            return
        self.link.connect()
        try:
            await self._check_server()
        except StoreOpenError:
            await self.link.close()
            raise
        except StorageUnavailable as exc:
            log.warning("Redis is not usable yet (%s); relayd starts and keeps trying", exc)
        self._prober = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            await tasks.stop(prober, self.link.deadline_s)
        await self.link.close()

    async def _check_server(self) -> None:
        try:
            async with asyncio.timeout(self.link.deadline_s):
                if self.link.cluster:
                    await self.link.client.initialize()
                info = await self.link.client.info("server")
        except (rx.RedisError, OSError, TimeoutError) as exc:
            reason = describe(exc)
            if isinstance(exc, (rx.AuthenticationError, rx.NoPermissionError)) or "credentials" in reason \
                    or "password" in reason:
                raise StoreOpenError(f"cannot use Redis: {reason}") from None
            raise self.link.fail(reason) from None
        if self.link.cluster:  # one answer per node; all must qualify
            versions = [v.get("redis_version", "0") for v in info.values()] if isinstance(
                next(iter(info.values()), None), dict) else [info.get("redis_version", "0")]
        else:
            versions = [info.get("redis_version", "0")]
        parsed = []
        for version in versions:
            parts = tuple(int(p) for p in str(version).split(".")[:2] if p.isdigit())
            if parts < MIN_VERSION:
                raise StoreOpenError(f"Redis {version} is too old: relayd needs Redis 5.0 or newer")
            parsed.append(parts)
        self.server_version = min(parsed)
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
        """One write round trip (and WAIT); marks the store healthy or unhealthy. Raises StorageUnavailable."""
        if self.link.cluster:
            from redis.asyncio.cluster import RedisCluster
            await self.link.read(lambda c: c.ping(target_nodes=RedisCluster.PRIMARIES))
        await self.link.write(scripts.PROBE, [self.layout.probe(self.node_id)], [now_ms(), PROBE_TTL_MS])

    async def refresh_total(self) -> None:
        """Read every slot's totals, so the sums include what other instances stored."""
        await self.stats()

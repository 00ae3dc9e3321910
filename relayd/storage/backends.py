"""Which storage backend a configuration asks for, built but not yet opened."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..config import Config, ConfigError
from ..extras import install_hint
from .store import Store

class DiskUsage(Protocol):
    """What ``shutil.disk_usage`` says of a file system."""

    @property
    def total(self) -> int: ...

    @property
    def free(self) -> int: ...


MISSING_REDIS_EXTRA = f"the Redis backend needs the optional extra redis: {install_hint('redis')}"
MISSING_POSTGRES_EXTRA = f"the PostgreSQL backend needs the optional extra postgres: {install_hint('postgres')}"


def make_store(config: Config) -> Store:
    """The configured backend, sealed when ``[storage] encryption_key_file`` is set; raises ConfigError when an
    optional extra is missing or a key file cannot be used."""
    store = _backend(config)
    if not config.storage.encryption_key_file:
        return store
    from .sealed import SealedStore
    from .sealing import StorageKeyError, load_keys
    try:
        return SealedStore(store, load_keys(config.storage.encryption_key_file))
    except StorageKeyError as exc:
        raise ConfigError(str(exc)) from None


def _backend(config: Config) -> Store:
    if config.storage.backend == "memory":
        from .memory import MemoryStore
        return MemoryStore()
    if config.storage.backend == "redis":
        return make_redis_store(config)
    if config.storage.backend == "postgres":
        return make_postgres_store(config)
    from .sqlite.store import SQLiteStore
    return SQLiteStore(config.storage.path, synchronous=config.storage.synchronous,
                       commit_interval_ms=config.storage.commit_interval_ms)


def make_redis_store(config: Config) -> Store:
    try:
        from .redis import RedisStore
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "redis":
            raise
        raise ConfigError(f"[storage] backend = redis: {MISSING_REDIS_EXTRA}") from None
    r = config.redis
    return RedisStore(r.url, key_prefix=r.key_prefix, cluster=r.cluster,
                      node_id=config.cluster.resolved_node_id(config.server.port),
                      socket_timeout_s=r.socket_timeout_s, min_replicas=r.min_replicas,
                      wait_timeout_ms=r.wait_timeout_ms)


def make_postgres_store(config: Config) -> Store:
    """The PostgreSQL store; raises ConfigError when the optional extra (asyncpg) is missing."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        raise ConfigError(f"[storage] backend = postgres: {MISSING_POSTGRES_EXTRA}") from None
    from .postgres import PostgresStore
    p = config.postgres
    return PostgresStore(p.url, pool_min=p.pool_min, pool_size=p.pool_size, connect_timeout_s=p.connect_timeout_s,
                         command_timeout_s=p.command_timeout_s, exclusive=not p.cluster)


SIZE_SHARE = 2
"""SQLite: the queues, keys and receipts may take at most 1/SIZE_SHARE of the database's file system."""
RESERVE_SHARE = 20
"""SQLite: and never so much that less than 1/RESERVE_SHARE of the file system would stay free."""
REDIS_MAXMEMORY_SHARE = 2
"""Redis with ``maxmemory``: the stored bytes may take 1/REDIS_MAXMEMORY_SHARE of it (the rest is Redis's
overhead per record, and room for other data)."""
REDIS_DEFAULT_BUDGET = 1 << 30
"""Redis without ``maxmemory`` (or when it cannot be read): the stored bytes relayd allows itself."""


@dataclass(frozen=True, slots=True)
class Budget:
    """The storage budget ``[storage] max_bytes = -1`` stands for, and how it was found (for the start-up log)."""

    bytes: int
    how: str


def automatic_budget(config: Config, store: Store,
                     disk: Callable[[str], DiskUsage] = shutil.disk_usage) -> Budget:
    """The storage budget ``[storage] max_bytes = -1`` stands for, measured once the store is open.

    SQLite: half the size of the database's file system, but no more than
    what relayd holds now plus the free space minus a twentieth of the file
    system. Both terms stay put when relayd's own data grows (what it stores
    leaves the free space), so restarts never move the budget: only other
    programs filling the disk lower it. Redis: half of ``maxmemory``, or
    ``REDIS_DEFAULT_BUDGET`` when none is set. Memory: no budget.
    """
    if config.storage.backend == "redis":
        maxmemory = getattr(store, "maxmemory", None)
        if maxmemory:
            budget = maxmemory // REDIS_MAXMEMORY_SHARE
            return Budget(budget, f"1/{REDIS_MAXMEMORY_SHARE} of Redis maxmemory {size_text(maxmemory)}")
        why = "Redis has no maxmemory" if maxmemory == 0 else "Redis maxmemory could not be read"
        return Budget(REDIS_DEFAULT_BUDGET, f"the default for Redis: {why}")
    if config.storage.backend == "postgres":
        return Budget(0, "no automatic budget on PostgreSQL: set [storage] max_bytes to have one")
    if config.storage.backend != "sqlite":
        return Budget(0, "memory storage")
    folder = os.path.dirname(os.path.abspath(config.storage.path))
    usage = disk(folder)
    share = usage.total // SIZE_SHARE
    room = max(0, store.stored_bytes() + usage.free - usage.total // RESERVE_SHARE)
    if room < share:
        return Budget(room, f"what relayd holds plus the free space of its file system "
                            f"({size_text(usage.total)}), less 1/{RESERVE_SHARE} of it kept free")
    return Budget(share, f"1/{SIZE_SHARE} of its file system ({size_text(usage.total)})")


def size_text(n: int) -> str:
    """A file system's or a Redis's size for the start-up log."""
    return f"{n / (1 << 30):,.1f} GiB"

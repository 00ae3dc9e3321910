"""Which storage backend a configuration asks for, built but not yet opened."""

from __future__ import annotations

import os
import shutil

from ..config import Config, ConfigError
from .store import Store

MISSING_REDIS_EXTRA = "the Redis backend needs the optional extra: pip install 'relayd[redis]'"
MISSING_POSTGRES_EXTRA = "the PostgreSQL backend needs the optional extra: pip install 'relayd[postgres]'"


def make_store(config: Config) -> Store:
    """The configured backend; raises ConfigError when ``backend = redis`` lacks its optional extra."""
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
                         command_timeout_s=p.command_timeout_s)


def automatic_budget(config: Config, store: Store) -> int:
    """The storage budget ``[storage] max_bytes = -1`` stands for, measured once the store is open.

    SQLite: what the queues hold now plus half the free space of the
    database's file system, so the disk never fills up with messages. Other
    backends: no budget (Redis has its own ``maxmemory``).
    """
    if config.storage.backend != "sqlite":
        return 0
    folder = os.path.dirname(os.path.abspath(config.storage.path))
    return store.stored_bytes() + shutil.disk_usage(folder).free // 2

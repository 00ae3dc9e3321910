"""Which storage backend a configuration asks for, built but not yet opened."""

from __future__ import annotations

from ..config import Config, ConfigError
from .store import Store

MISSING_REDIS_EXTRA = "the Redis backend needs the optional extra: pip install 'relayd[redis]'"


def make_store(config: Config) -> Store:
    """The configured backend; raises ConfigError when ``backend = redis`` lacks its optional extra."""
    if config.storage.backend == "memory":
        from .memory import MemoryStore
        return MemoryStore()
    if config.storage.backend == "redis":
        return make_redis_store(config)
    from .sqlite import SQLiteStore
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

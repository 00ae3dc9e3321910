"""Which storage backend a configuration asks for, built but not yet opened."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..config import Config, ConfigError
from .store import Store



def _install_redis_extra() -> str:
    """The command that adds the extra to this very environment; relayd is on no package index, so it names the
    checkout (this one when relayd runs from a checkout)."""
    checkout = Path(__file__).resolve().parents[2]
    target = str(checkout) if (checkout / "pyproject.toml").is_file() else "CHECKOUT"
    where = "" if target != "CHECKOUT" else " (CHECKOUT: the directory of your relayd checkout)"
    return f"{sys.executable} -m pip install '{target}[redis]'{where}"


MISSING_REDIS_EXTRA = f"the Redis backend needs the optional extra redis: {_install_redis_extra()}"


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

"""Which storage backend a configuration asks for, built but not yet opened."""

from __future__ import annotations

from ..config import Config
from .store import Store


def make_store(config: Config) -> Store:
    if config.storage.backend == "memory":
        from .memory import MemoryStore
        return MemoryStore()
    from .sqlite import SQLiteStore
    return SQLiteStore(config.storage.path, synchronous=config.storage.synchronous,
                       commit_interval_ms=config.storage.commit_interval_ms)

"""The Redis storage backend (optional extra ``relayd[redis]``).

Importing this package imports redis-py; nothing else in relayd does, so relayd
without the extra runs on SQLite. Modules: ``layout`` (key names, hash slots),
``scripts`` (the Lua scripts), ``connection`` (client, health), ``write_queue``
(durable writes, batched in order), ``reasons`` (what a failure means),
``store`` (the Store contract) with its parts ``lifecycle``, ``keys``,
``receipts``, ``retention`` and ``records``, ``migrate`` (SQLite to Redis).
"""

from .store import RedisStore

__all__ = ["RedisStore"]

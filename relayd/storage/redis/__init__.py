"""The Redis storage backend (optional extra ``relayd[redis]``).

Importing this package imports redis-py; nothing else in relayd does, so relayd
without the extra runs on SQLite. Modules: ``layout`` (key names, hash slots),
``scripts`` (the Lua scripts), ``connection`` (client, health, durable writes),
``store`` (the Store contract), ``migrate`` (SQLite to Redis).
"""

from .store import RedisStore

__all__ = ["RedisStore"]

"""The Redis storage backend (the optional extra ``redis``: ``pip install '.[redis]'`` from a checkout).

Importing this package imports redis-py; nothing else in relayd does, so relayd
without the extra runs on SQLite. Modules: ``layout`` (key names, hash slots),
``scripts`` (the Lua scripts), ``connection`` (the client), ``health``,
``write_queue`` (writes batched in order, each answered in bounded time),
``reasons`` (what a failure means), ``store`` (the Store contract: a facade)
over its parts ``messages``, ``receipts``, ``keys``, ``push``, ``retention`` and
``lifecycle``, which share one ``core``; ``records`` (value formats, per-slot
totals), ``migrate`` (SQLite to Redis).
"""

from .store import RedisStore

__all__ = ["RedisStore"]

"""One relayd per PostgreSQL database unless ``[postgres] cluster``: a session advisory lock the server drops when its
holder dies.

Several instances on one database share the queues safely, but only the
cluster (``relayd.cluster`` on ``PostgresBackplane``: presence and notices
over ``LISTEN``/``NOTIFY``) shares their sessions: without it a message for a
recipient connected to the other instance would wait in its queue until that
recipient reconnects. So, without ``[postgres] cluster = true``, the store holds
``pg_advisory_lock`` on a connection of its own, outside the pool, and names
itself (host, PID, since when) in ``relayd_owner`` for the message a second
relay exits with. The server releases the lock with that connection, so a
``kill -9`` of relayd never leaves it stale. After an outage the lock is taken
again before anything is written; if another relay took it meanwhile, this
one stays unhealthy (it writes nothing) and says why.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..store import StoreOpenError

OWNER_LOCK = 0x524C5945  # "RLYE": the lock an instance holds while it serves from the database


class AnotherOwner(StoreOpenError):
    """Another relayd serves from this database."""


class PgOwner:
    """The advisory lock and its connection; ``held`` is False until ``acquire`` and after the connection drops."""

    def __init__(self) -> None:
        self._conn: Any = None

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def acquire(self, connect: Any) -> None:
        """Take the lock on a new connection from ``connect()``; raises AnotherOwner naming the holder."""
        await self.release()
        conn = await connect()
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", OWNER_LOCK):
                row = await conn.fetchrow("SELECT host, pid, since FROM relayd_owner WHERE id = 1")
                holder = "another relayd" if row is None else (
                    f"relayd PID {row['pid']} on {row['host']} (since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(row['since'] / 1000))} UTC)")
                raise AnotherOwner(f"this PostgreSQL database is in use by {holder}: without [postgres] cluster = "
                                   "true, relayd on PostgreSQL runs one instance per database")
            await conn.execute("INSERT INTO relayd_owner (id, host, pid, since) VALUES (1, $1, $2, $3) ON CONFLICT "
                               "(id) DO UPDATE SET host = excluded.host, pid = excluded.pid, since = excluded.since",
                               socket.gethostname(), os.getpid(), int(time.time() * 1000))
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.close(timeout=2)
        except Exception:
            conn.terminate()

"""The PostgreSQL backend (optional extra ``relayd[postgres]``, driver asyncpg): ``PostgresStore``."""

from .store import PostgresStore

__all__ = ["PostgresStore"]

"""The database file itself: is it relayd's, is it intact, what do its errors mean; offline copies and counts.

Everything here opens the file read-only, so it is safe beside a running
relayd and never changes a file that is not relayd's.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .schema import APPLICATION_ID, SCHEMA_VERSION
from ..store import StoreOpenError

SQLITE_MAGIC = b"SQLite format 3\x00"
FULL_CHECK_BYTES = 64 * 1024 * 1024


def is_storage_error(exc: BaseException) -> bool:
    """Errors of the disk or the file, as opposed to bugs in a statement."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def describe_error(exc: BaseException) -> str:
    """A human reason for an operator; never contains message data."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    low = text.lower()
    if name.startswith("SQLITE_FULL") or "disk is full" in low:
        reason = "disk full"
    elif name.startswith("SQLITE_READONLY") or "readonly" in low or "read-only" in low:
        reason = "database is read-only"
    elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in low:
        reason = "database is locked"
    elif name.startswith("SQLITE_IOERR") or "i/o error" in low:
        reason = "disk I/O error"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in low:
        reason = "database is corrupt"
    else:
        return f"storage error: {type(exc).__name__}: {text}"
    return reason if low == reason.lower() else f"{reason} ({text})"


def read_only_uri(path: Path) -> str:
    """A read-only URI for ``path`` that leaves nothing behind.

    A database in use in WAL mode has ``-wal``/``-shm`` beside it, which SQLite
    needs to read it consistently, so it is read the usual read-only way. A
    file nobody has open (a backup, a stopped relay's database) is opened
    ``immutable``: SQLite then takes no locks and creates no ``-wal``/``-shm``.
    """
    uri = path.resolve().as_uri() + "?mode=ro"
    if not any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm")):
        uri += "&immutable=1"
    return uri


CONTAINER_UID = 10001
"""The uid (and gid) of the ``relayd`` user in the container image (Dockerfile)."""


def permission_hint(directory: Path) -> str:
    """Who needs write access, said so that a bind-mounted volume of the container can be fixed at once."""
    uid, gid = os.getuid(), os.getgid()
    hint = f"relayd runs as uid {uid}, gid {gid}"
    if uid == CONTAINER_UID:
        hint += (f" (the container image's relayd user): give it the directory on the host with "
                 f"`chown -R {CONTAINER_UID}:{CONTAINER_UID} DIR`, or use a named volume")
    else:
        hint += f": `chown -R {uid}:{gid} {directory}` gives it the directory"
    return hint


def inspect(path: Path) -> int | None:
    """Check that ``path`` is absent, empty or relayd's, without writing to it.

    Returns the stored schema version (0 for an empty database), or None when
    there is nothing to inspect yet. Raises StoreOpenError otherwise.
    """
    if path.is_dir():
        raise StoreOpenError(f"database path {path} is a directory")
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return None
    except OSError as exc:
        hint = f"; {permission_hint(path.parent)}" if isinstance(exc, PermissionError) else ""
        raise StoreOpenError(f"cannot read database {path}: {exc.strerror or exc}{hint}") from exc
    if not header:
        return None
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise StoreOpenError(f"{path} is not a SQLite database; refusing to touch it")
    try:
        ro = sqlite3.connect(read_only_uri(path), uri=True)
    except sqlite3.Error as exc:
        raise StoreOpenError(f"cannot open database {path}: {exc}") from exc
    try:
        app_id = ro.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and app_id == 0:
            return 0
        if app_id != APPLICATION_ID or "schema_version" not in tables:
            raise StoreOpenError(
                f"{path} is a SQLite database of another application "
                f"(application_id {app_id:#x}); refusing to touch it")
        version = int(ro.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
        _check_integrity(ro, path)
    except sqlite3.DatabaseError as exc:
        raise StoreOpenError(f"database {path} is unreadable or corrupt: {exc}") from exc
    finally:
        ro.close()
    if version > SCHEMA_VERSION:
        raise StoreOpenError(
            f"database {path} has schema version {version}, newer than this relayd "
            f"understands ({SCHEMA_VERSION}); upgrade relayd")
    return version


def _check_integrity(ro: sqlite3.Connection, path: Path) -> None:
    """Refuse a corrupt file at start-up rather than on the first client.

    A full ``quick_check`` reads every page, which is cheap for small
    databases but would delay a start with a million queued messages, so
    large files get a probe of both ends of every table and index instead.
    """
    if path.stat().st_size <= FULL_CHECK_BYTES:
        result = ro.execute("PRAGMA quick_check(1)").fetchone()[0]
        if result != "ok":
            raise StoreOpenError(f"database {path} is corrupt: {result}")
        return
    for name, sql in ro.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall():
        if "WITHOUT ROWID" in (sql or "").upper():
            ro.execute(f'SELECT * FROM "{name}" LIMIT 1').fetchall()
            continue
        for order in ("ASC", "DESC"):
            ro.execute(f'SELECT * FROM "{name}" ORDER BY rowid {order} LIMIT 1').fetchall()


def count_stats(conn: sqlite3.Connection) -> dict[str, int]:
    recipients, messages, nbytes = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) FROM queues WHERE count > 0").fetchone()
    receipts = conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    keys = conn.execute("SELECT COUNT(*) FROM keys").fetchone()[0]
    return {"recipients": recipients, "messages": messages, "bytes": nbytes,
            "receipts": receipts, "keys": keys}


def read_stats(path: str) -> dict[str, int]:
    """Stats of a database file, opened read-only (for an offline admin command)."""
    p = Path(path)
    version = inspect(p)
    if version is None:
        raise StoreOpenError(f"no database at {path}")
    if version == 0:
        return {"recipients": 0, "messages": 0, "bytes": 0, "receipts": 0, "keys": 0,
                "schema_version": 0}
    try:
        conn = sqlite3.connect(read_only_uri(p), uri=True)
        try:
            return {**count_stats(conn), "schema_version": version}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreOpenError(f"cannot read database {path}: {exc}") from exc


def backup_database(path: str, dest_path: str) -> None:
    """Copy a consistent snapshot of a live database without joining its writer.

    Uses a read-only connection, so it is safe while relayd runs and never
    stalls relayd's writes for longer than SQLite's own page copying.
    """
    if not Path(path).is_file():
        raise StoreOpenError(f"no database at {path}")
    src = sqlite3.connect(read_only_uri(Path(path)), uri=True)
    try:
        dest = sqlite3.connect(dest_path)
        try:
            src.backup(dest)
        finally:
            dest.close()
    finally:
        src.close()

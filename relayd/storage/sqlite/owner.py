"""One relayd per database file: an advisory lock the kernel drops when its holder dies.

Two relays writing one file (two containers on one volume is enough) would
each keep their own seq counter and totals and silently lose answered
messages. So the writer holds ``flock`` on ``<database>.lock`` while the
database is open; the file names the holder (PID, host) for the message a
second relay exits with. The kernel releases the lock with the holder's last
descriptor, so ``kill -9`` never leaves a stale lock (only, maybe, the file,
which the next owner reuses). A clean close deletes the file while still
holding the lock; a relay that locked a file just deleted sees so and starts
over on the new one. Read-only tools (``relayd stats``, ``relayd backup``) do
not take the lock.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..store import StoreOpenError

log = logging.getLogger("relayd.storage")

_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
"""flock errors of file systems without locks: relayd starts anyway, with a warning."""


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


class OwnerLock:
    """``flock`` on the lock file beside a database, held from ``acquire`` to ``release``."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = lock_path(database)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (again holding it is fine); raises ``StoreOpenError`` naming the holder when taken."""
        while self._fd is None:
            fd = self._open_locked()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder deleted it on close after we opened it: lock the file there now
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()} since {int(time.time())}\n".encode(), 0)
            except OSError:
                pass  # the lock holds without its note; a second relay is refused all the same
            self._fd = fd

    def _open_locked(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreOpenError(f"cannot create the lock file {self.path}: {exc.strerror or exc} (relayd needs "
                                 "to write beside its database)") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                log.warning("cannot lock %s (%s): this file system has no locks, so nothing keeps a second relayd "
                            "off this database; make sure only one uses it", self.path, exc.strerror or exc)
                return fd
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreOpenError(
                    f"database {self.database} is in use by another relayd ({holder}); one database takes one "
                    f"relayd: stop that one, or give this one another [storage] path") from None
            raise StoreOpenError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
        return fd

    def release(self) -> None:
        """Delete the lock file, then drop the lock (closing its descriptor)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # already gone, or the directory became read-only: the next owner reuses the file
        os.close(fd)


def _read_holder(fd: int) -> str:
    """What the holder wrote about itself: "PID 123 on host h, since <time>" (or that it is unknown)."""
    try:
        words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        words = []
    note = dict(zip(words[::2], words[1::2]))
    if "pid" not in note:
        return "its PID is unknown"
    held = f"PID {note['pid']}"
    if "host" in note:
        held += f" on host {note['host']}"
    if note.get("since", "").isdigit():
        held += f", since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(int(note['since'])))}"
    return held

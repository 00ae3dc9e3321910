"""Checkpoints of the write-ahead log on a thread of their own, so the writer never waits for them.

SQLite copies the log back into the database file (and at ``synchronous = normal`` syncs both files) in the
connection whose commit takes the log past ``wal_autocheckpoint`` pages: on the writer thread, where every group
commit queued behind it waits for the disk. Here a second connection runs PASSIVE checkpoints when the writer says
the log grew; a PASSIVE checkpoint neither blocks the writer nor waits for it, and copies only what is committed.
The writer keeps its own automatic checkpoint at a higher threshold (``BACKSTOP_PAGES``), should this one fall
behind or fail. What survives a crash or a power loss does not change: commits are written to the log as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("relayd.storage")

BACKSTOP_PAGES = 20_000
"""The writer's own ``wal_autocheckpoint`` while this thread runs."""
DEFAULT_AUTOCHECKPOINT = 1000
"""SQLite's, kept when there is no thread."""
GROWTH_ROWS = 4000
"""Rows changed by the writer since the last request that make it ask for a checkpoint: about 2,000 messages,
4,000 pages of the log when each goes to another recipient (a quiet relay syncs a little less often than at
SQLite's 1,000 pages), fewer when they share recipients."""
MIN_GAP_S = 0.2
"""Shortest time between two checkpoints: under load each copies more pages at once (a page changed twice is
copied once). Asked for every 256 rows, at most every 50 ms, they cost about a tenth more CPU per message at the
store; every 4,000 rows and 250 ms, a few percent less than SQLite's own (bench/store_microbench.py's batches,
main's code alternated with these)."""


class Checkpointer:
    """The checkpoint thread of one database file; ``grew`` is called by the writer after each commit."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._due = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._marked = 0
        self.checkpoints = 0
        """Checkpoints run (tests look at it)."""

    def start(self, path: Path, synchronous: str) -> bool:
        """Open a connection to ``path`` (already opened, in WAL mode, by the writer) and start the thread;
        False when that connection cannot be opened (the writer then checkpoints on its own, as SQLite does)."""
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous = {synchronous}")
        except sqlite3.Error as exc:
            log.warning("no checkpoint thread for %s (%s); the writer checkpoints on its own", self._label, exc)
            return False
        self._due.clear()
        self._stopping.clear()
        self._marked = 0  # total_changes counts from the writer connection's opening
        self._thread = threading.Thread(target=self._run, args=(conn,), name="relayd-sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()
        return True

    def grew(self, conn: sqlite3.Connection) -> None:
        """On the writer thread, after a commit: ask for a checkpoint once enough rows changed."""
        if self._thread is not None and conn.total_changes - self._marked >= GROWTH_ROWS:
            self._marked = conn.total_changes
            self._due.set()

    def stop(self) -> None:
        """Stop the thread (it finishes a checkpoint under way) and close its connection."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._due.set()
        thread.join()

    def _run(self, conn: sqlite3.Connection) -> None:
        failed = False
        try:
            while True:
                self._due.wait()
                if self._stopping.is_set():
                    return
                self._due.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                    failed = False
                except sqlite3.Error as exc:  # the disk; the writer's backstop and its own errors tell the rest
                    if not failed:
                        log.warning("checkpoint of %s failed: %s", self._label, exc)
                    failed = True
                if self._stopping.wait(MIN_GAP_S):
                    return
        finally:
            conn.close()

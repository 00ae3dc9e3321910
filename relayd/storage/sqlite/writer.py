"""One thread that owns the SQLite connection and runs every job, grouping writes into one commit.

The event loop never touches the disk: it submits a job (a function of the
connection) and awaits a future. The thread takes every job waiting, lingers
up to ``interval_s`` for more writes, runs them in one transaction (if one
raises, the others run again in a new one, each in a savepoint, so one
failing job does not undo the others) and resolves the futures only after
COMMIT: an awaited write is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .checkpoint import Checkpointer
from .file import describe_error, is_storage_error
from ..store import StorageUnavailable, StoreOpenError

log = logging.getLogger("relayd.storage")

MAX_BATCH = 500

T = TypeVar("T")
Delta = tuple[int, int]
"""(messages, content bytes) added to (or, negative, removed from) the store-wide totals."""
NONE: Delta = (0, 0)

JobFn = Callable[[sqlite3.Connection], tuple[T, Delta]]
"""A job returns (value for the caller, change to the (messages, content bytes) totals). It may run a second time
after its transaction was rolled back (when another job of its batch raised)."""

Connect = Callable[[], tuple[sqlite3.Connection, int, int]]
"""Opens the database on the writer thread: (connection, messages, content bytes); raises StoreOpenError."""

Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: JobFn[T] | None  # None: stop the thread
    write: bool
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    health: bool = True
    """Whether this write's outcome says whether storage works (a best-effort record's does not)."""


_JobOutcome = tuple[_Job[Any], Any, BaseException | None]


@dataclass(slots=True)
class _Raised:
    """The write job of a batch that raised on the batch's first run, and what it raised."""

    index: int
    exc: Exception


def _resolve(outcomes: list[Outcome], observe: Callable[[float], None] | None = None, took: float = 0.0) -> None:
    """Resolve the futures of a batch's jobs; ``observe``: also tell it how long the batch's commit took."""
    if observe is not None:
        observe(took)
    for future, value, exc in outcomes:
        if future.done():
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed; nobody is waiting any more
        pass


class SQLiteWriter:
    """The writer thread and its job queue; ``healthy``/``problem`` say whether the last write worked."""

    def __init__(self, connect: Connect, interval_s: float, label: str,
                 checkpoints: Checkpointer | None = None) -> None:
        self._connect = connect
        self._checkpoints = checkpoints
        """Told of each commit, stopped before the connection closes (``connect`` starts it)."""
        self._interval = interval_s
        self._label = label
        self._jobs: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.running = False
        self.total = 0
        """Queued messages, kept from the committed jobs' deltas, so reading it never waits on the disk."""
        self.bytes = 0
        """Their content bytes, kept the same way (the storage budget reads it)."""
        self.healthy = True
        self.problem: str | None = None
        self.commits = 0
        """Committed write transactions; lets tests and metrics see group commit work."""
        self.commit_observer: Callable[[float], None] | None = None
        """Called on the event loop with each write transaction's duration (for metrics)."""

    async def start(self) -> None:
        """Open the database on a new thread; raises ``StoreOpenError`` when it cannot be opened."""
        if self.running:
            return
        if self._thread is not None:  # a cancelled start(); its thread is on its way out
            await asyncio.to_thread(self._thread.join)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._jobs = jobs = queue.SimpleQueue[_Job[Any]]()
        self._thread = thread = threading.Thread(target=self._run, args=(loop, ready, jobs),
                                                 name="relayd-sqlite", daemon=True)
        thread.start()
        try:
            await ready
        except StoreOpenError:
            thread.join()
            self._thread = None
            raise
        except BaseException:  # cancelled: the thread stops as soon as it has opened
            jobs.put(_Job(None, False, loop.create_future(), loop))
            raise
        self.running = True

    async def stop(self) -> None:
        """Finish every job already submitted, then stop the thread and close the file."""
        if not self.running:
            return
        self.running = False
        await self._put(None, write=False)
        assert self._thread is not None
        self._thread.join()
        self._thread = None

    async def submit(self, fn: JobFn[T], *, write: bool, health: bool = True) -> T:
        """Run ``fn(connection)`` on the writer thread; returns its value after COMMIT.

        Raises ``StorageUnavailable`` when the store is closed or the disk
        refused the transaction, or whatever ``fn`` itself raised. ``health``
        False: a small best-effort write, whose success on a nearly full
        disk must not report storage as recovered (nor its failure alone as
        lost).
        """
        if not self.running:
            raise StorageUnavailable("store is not open")
        return await self._put(fn, write=write, health=health)

    async def _put(self, fn: JobFn[T] | None, *, write: bool, health: bool = True) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, write, future, loop, health))
        return await future

    # On the writer thread

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None],
             jobs: queue.SimpleQueue[_Job[Any]]) -> None:
        try:
            self._conn, self.total, self.bytes = self._connect()
        except BaseException as exc:
            if not isinstance(exc, StoreOpenError):
                exc = StoreOpenError(f"cannot open database {self._label}: {exc}")
            _call_soon(loop, _resolve, [(ready, None, exc)])
            return
        _call_soon(loop, _resolve, [(ready, None, None)])
        carry: _Job[Any] | None = None
        while True:
            batch, carry = self._collect(jobs, carry)
            if batch[0].fn is None:
                break
            try:
                outcomes, took = self._execute(batch)
            except Exception as exc:  # keep the thread alive whatever happens
                outcomes, took = self._fail(batch, exc), None
            self._post(outcomes, took)
        self._close()
        self._post([(batch[0], None, None)])

    def _collect(self, jobs: queue.SimpleQueue[_Job[Any]],
                 carry: _Job[Any] | None) -> tuple[list[_Job[Any]], _Job[Any] | None]:
        """Take every waiting job; while only writes are waiting, linger for more.

        The stop job ends the batch and is handed back to run next, alone.
        """
        first = carry or jobs.get()
        if first.fn is None:
            return [first], None
        batch = [first]
        linger = first.write and self._interval > 0
        deadline = time.monotonic() + self._interval
        while len(batch) < MAX_BATCH:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if not linger or remaining <= 0:
                    break
                try:
                    job = jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if job.fn is None:
                return batch, job
            batch.append(job)
            linger = linger and job.write
        return batch, None

    def _execute(self, batch: list[_Job[Any]]) -> tuple[list[_JobOutcome], float | None]:
        """Run the batch in one transaction: the outcomes, and how long its commit took (None: nothing committed).

        Within a savepoint SQLite first copies every page a job changes (a sixth of an enqueue's CPU), and jobs
        seldom raise, so only if a write job raises is the transaction rolled back and run again with each write
        in a savepoint, that job failing with what it raised (it does not run twice: its first run may have moved
        state kept outside the database, such as the seq counter)."""
        conn = self._conn
        assert conn is not None
        writes = any(job.write for job in batch)
        started = time.perf_counter()
        took = None
        try:
            if writes:
                conn.execute("BEGIN IMMEDIATE")
            ran = self._run_jobs(conn, batch, None)
            if isinstance(ran, _Raised):
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                ran = self._run_jobs(conn, batch, ran)
                assert not isinstance(ran, _Raised)
            outcomes, messages, nbytes = ran
            if writes:
                conn.execute("COMMIT")
                self.commits += 1
                took = time.perf_counter() - started
                if self._checkpoints is not None:
                    self._checkpoints.grew(conn)
        except Exception as exc:
            return self._fail(batch, exc), None
        self.total += messages
        self.bytes += nbytes
        if not self.healthy and any(job.write and job.health for job in batch):
            log.warning("storage recovered (was: %s)", self.problem)
            self.healthy, self.problem = True, None
        return outcomes, took

    @staticmethod
    def _run_jobs(conn: sqlite3.Connection, batch: list[_Job[Any]],
                  raised: _Raised | None) -> tuple[list[_JobOutcome], int, int] | _Raised:
        """Run every job: (outcomes, messages added, bytes added). The first time (``raised`` None), a write
        job that raises stops the run (its half-done writes are in the transaction): which one, and what it
        raised. Run again with that, each write runs in a savepoint, undone if it raises, and that job is
        not run but fails as it did. A storage error raises, failing the batch."""
        outcomes: list[_JobOutcome] = []
        messages = nbytes = 0
        for index, job in enumerate(batch):
            assert job.fn is not None
            if raised is not None and index == raised.index:
                outcomes.append((job, None, raised.exc))
                continue
            savepoint = raised is not None and job.write
            if savepoint:
                conn.execute("SAVEPOINT job")
            try:
                value, change = job.fn(conn)
            except Exception as exc:
                if is_storage_error(exc):
                    raise
                if job.write and raised is None:
                    return _Raised(index, exc)
                if savepoint:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                outcomes.append((job, None, exc))
                continue
            if savepoint:
                conn.execute("RELEASE job")
            outcomes.append((job, value, None))
            messages += change[0]
            nbytes += change[1]
        return outcomes, messages, nbytes

    def _fail(self, batch: list[_Job[Any]], exc: BaseException) -> list[_JobOutcome]:
        """Roll back and fail every job of the batch with StorageUnavailable."""
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        reason = describe_error(exc) if isinstance(exc, sqlite3.Error) else \
            f"storage error: {type(exc).__name__}: {exc}"
        if any(job.health for job in batch):
            if reason != self.problem:
                log.error("storage unavailable: %s", reason)
            self.healthy, self.problem = False, reason
        return [(job, None, StorageUnavailable(reason)) for job in batch]

    def _post(self, outcomes: list[_JobOutcome], took: float | None = None) -> None:
        """Hand the outcomes to their loops, one call per loop; the first job's loop also gets the commit's
        duration ``took`` for ``commit_observer`` (a write batch that committed)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
        for job, value, exc in outcomes:
            by_loop.setdefault(job.loop, []).append((job.future, value, exc))
        observe = self.commit_observer if took is not None and outcomes else None
        first = outcomes[0][0].loop if observe is not None else None
        for loop, items in by_loop.items():
            if loop is first:
                _call_soon(loop, _resolve, items, observe, took)
            else:
                _call_soon(loop, _resolve, items)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._checkpoints is not None:
            self._checkpoints.stop()
        try:
            conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            pass
        conn.close()

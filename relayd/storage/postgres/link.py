"""The link to PostgreSQL: a bounded asyncpg pool, each failure turned into the contract's errors, and health.

Every operation of the store is a job run on one pooled connection. What
went wrong decides the error: nothing could be sent (no connection, the pool
exhausted past ``connect_timeout_s``, the server refusing or shutting down,
a transaction rolled back) is ``StorageUnavailable``; a write whose commit or
single statement was sent but never answered (a timeout, the connection lost
mid-reply) is ``StorageOutcomeUnknown``. A failure makes the link unhealthy
with a reason until an operation succeeds; a probe runs every
``probe_interval_s`` so health (and ``/health/ready``) follows the server
within about a second either way, without a restart.

A hung server (a stalled link, a stopped postmaster, a table locked by someone
else) refuses nothing, so every operation is answered by a deadline of
``connect_timeout_s + command_timeout_s`` from when it was submitted, however
many statements, waits for earlier writes (``bounded``) and pool hand-overs it
takes: past it the connection is dropped (``terminate``, no round trip) and
the server rolls back what was not committed. A connection in an unknown
state is never handed back for reuse. An operation in flight longer than
``OVERDUE_S`` makes the link unhealthy at once, so ``/health/ready`` turns 503
about a second into a hang, before any timeout fires. The server enforces the
same bounds on its side (``statement_timeout``, and
``idle_in_transaction_session_timeout`` for a transaction whose client went
silent, which would otherwise hold its row locks until TCP gives up).

The URL goes to asyncpg as it is, so libpq's ``PG*`` variables and
``~/.pgpass`` (or ``PGPASSFILE``) fill in what it leaves out. The URL is never
logged or put in an error: ``redact_url`` drops its password.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from ...config.redact import redact_url
from ...extras import install_hint
from ...reads import read_from_heap
from ..health import Health
from ..store import StorageUnavailable, StoreOpenError
from .owner import AnotherOwner, PgOwner
from .schema import migrate

log = logging.getLogger("relayd.storage")
# While the server is away, asyncpg's pool logs a warning with a traceback each time it fails to reopen its
# minimum of connections; the link logs the reason once (and the recovery), so only its errors are kept.
logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)

T = TypeVar("T")
Job = Callable[[Any], Awaitable[T]]

# SQLSTATE classes that mean the server cannot serve right now, not that the request was wrong
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58", "40")
_UNAVAILABLE_STATES = ("25006",)
_RETRYABLE = ("40P01", "40001")  # deadlock victim, serialization failure: rolled back, safe to run again
_DEADLOCK_RETRIES = 3
OVERDUE_S = 1.0
"""An operation unanswered for this long (or ``command_timeout_s`` when shorter) makes the link unhealthy."""

_DEADLINE: ContextVar[tuple[asyncio.Task[Any] | None, float] | None] = ContextVar("relayd_pg_deadline", default=None)
"""The task whose operations share a deadline (``PgLink.bounded``), and that deadline (the loop's clock)."""


class _Attempt:
    """How far an operation got: whether a write may have reached the server (``sent``), and whether its
    connection is in a known state (``clean``: it may be reused)."""

    def __init__(self) -> None:
        self.sent = False
        self.clean = True


class _Retry(Exception):
    """The transaction was rolled back by the server for a reason that a second run may not meet."""  # read-only transaction (a standby, or default_transaction_read_only)


def describe(exc: BaseException) -> str:
    """A human reason for an operator; never the URL's password, never message data."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "PostgreSQL did not answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "PostgreSQL refuses connections (is it running?)"
    if isinstance(exc, OSError) and not sqlstate:
        return f"cannot reach PostgreSQL: {exc.strerror or exc}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"PostgreSQL: {text}" + (f" ({sqlstate})" if sqlstate else "")


def server_cannot_serve(exc: BaseException) -> bool:
    """Whether ``exc`` says the server or the link failed (as opposed to a bug in a statement)."""
    import asyncpg
    if isinstance(exc, (OSError, asyncio.TimeoutError, TimeoutError, asyncpg.InterfaceError,
                        asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.InternalClientError)):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and (sqlstate[:2] in _UNAVAILABLE_CLASSES
                                                         or sqlstate in _UNAVAILABLE_STATES)


class PgLink:
    """A pool of at most ``pool_size`` connections, its health, and the probe that keeps health current."""

    def __init__(self, url: str, *, pool_min: int = 1, pool_size: int = 10, connect_timeout_s: float = 5.0,
                 command_timeout_s: float = 5.0, probe_interval_s: float = 1.0, exclusive: bool = True) -> None:
        self.url = url
        self.exclusive = exclusive
        """Hold the one-instance lock (``owner``); False when several instances share the database as a cluster."""
        self.pool_min = max(0, min(pool_min, pool_size))
        self.pool_size = max(1, pool_size)
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.probe_interval_s = probe_interval_s
        self._pool: Any = None
        self.deadline_s = connect_timeout_s + command_timeout_s
        """The longest an operation waits, from its submission to its answer."""
        self.health = Health(min(OVERDUE_S, command_timeout_s), server="PostgreSQL", waiting="operation")
        """Failures and recoveries; its ``on_recovery`` is called when an operation succeeds after a failure
        (the store reads its totals again)."""
        self._in_flight: dict[object, float] = {}
        """When each operation under way was submitted (monotonic): the oldest tells a hang (``Health``)."""
        self.health.oldest_write = self._oldest
        self._probe: asyncio.Task[None] | None = None
        self._owner = PgOwner()
        self.writing: set[asyncio.Future[None]] = set()
        """One future per write under way, done when it ends either way: the cluster's notices wait for the
        writes made before them (``relayd.cluster.postgres_backplane``), as they queue behind them on Redis."""

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    def _oldest(self) -> float | None:
        return min(self._in_flight.values(), default=None)

    @contextmanager
    def bounded(self) -> Iterator[float]:
        """This task's operations from here on (waits for earlier writes included) end by one deadline,
        ``deadline_s`` from now unless an outer ``bounded`` set an earlier one; yields it (the loop's clock). An
        operation started past it fails at once without being sent."""
        task = asyncio.current_task()
        outer = _DEADLINE.get()
        if outer is not None and outer[0] is task:
            yield outer[1]
            return
        deadline = asyncio.get_running_loop().time() + self.deadline_s
        token = _DEADLINE.set((task, deadline))
        try:
            yield deadline
        finally:
            _DEADLINE.reset(token)

    def _deadline(self) -> float:
        bound = _DEADLINE.get()
        if bound is not None and bound[0] is asyncio.current_task():
            return bound[1]
        return asyncio.get_running_loop().time() + self.deadline_s

    @property
    def _server_timeouts(self) -> str:
        """The server gives up on what relayd has stopped waiting for. Set by ``SET`` (not as startup parameters,
        which PgBouncer refuses), again after each reset of a pooled connection (``RESET ALL`` drops them)."""
        return (f"SET statement_timeout = {max(1, int(self.command_timeout_s * 1000))}; "
                f"SET idle_in_transaction_session_timeout = {max(1, int(self.deadline_s * 1000))}")

    @property
    def problem(self) -> str | None:
        return self.health.problem

    async def open(self) -> None:
        """Connect, migrate the schema and start the probe; raises StoreOpenError naming what is wrong.

        A server that cannot be reached yet is not an error: the store starts unhealthy and the probe connects
        (and migrates) as soon as it answers, as relayd on Redis does.
        """
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            raise StoreOpenError("the PostgreSQL backend needs the optional extra postgres: "
                                 f"{install_hint('postgres')}") from None
        try:
            await self._connect()
        except StoreOpenError:
            raise
        except Exception as exc:
            if not server_cannot_serve(exc):
                raise StoreOpenError(f"cannot open PostgreSQL database {redact_url(self.url)}: "
                                     f"{describe(exc)}") from None
            self._fail(exc, unknown=False)
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop(), name="relayd-pg-probe")

    async def _connect(self) -> None:
        """Create the pool and bring the schema up to date; the pool is kept only when both worked."""
        import asyncpg
        pool = await asyncpg.create_pool(
            self.url or None, min_size=self.pool_min, max_size=self.pool_size,
            timeout=self.connect_timeout_s, command_timeout=self.command_timeout_s,
            server_settings={"application_name": "relayd"}, init=self._set_timeouts,
            connection_class=_keeping(self._server_timeouts))
        try:
            async with pool.acquire(timeout=self.connect_timeout_s) as conn:
                await migrate(conn)
            if self.exclusive:
                await self._owner.acquire(self.connect_one)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def connect_one(self, application_name: str = "relayd") -> Any:
        """A connection outside the pool (the owner lock's, the cluster inbox's)."""
        import asyncpg
        conn = await asyncpg.connect(self.url or None, timeout=self.connect_timeout_s,
                                     command_timeout=self.command_timeout_s,
                                     server_settings={"application_name": application_name})
        try:
            await self._set_timeouts(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _set_timeouts(self, conn: Any) -> None:
        """Prepare a new connection: the server's timeouts, and reads from the heap (``relayd.reads``; asyncpg
        keeps its transport as ``_transport``, checked by a test)."""
        read_from_heap(conn._transport)
        await conn.execute(self._server_timeouts)

    async def close(self) -> None:
        await self._owner.release()
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            try:
                await probe
            except asyncio.CancelledError:
                pass
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self.connect_timeout_s)
        except Exception:
            pool.terminate()

    async def run(self, job: Job[T], *, write: bool, transaction: bool = False) -> T:
        """Run ``job(connection)``; in one transaction when ``transaction``, else each statement commits alone.

        Raises StorageUnavailable when nothing was applied, StorageOutcomeUnknown when a write may have been.
        """
        if not write:
            return await self._run(job, write=False, transaction=transaction)
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writing.add(ended)
        try:
            return await self._run(job, write=True, transaction=transaction)
        finally:
            self.writing.discard(ended)
            ended.set_result(None)

    async def _run(self, job: Job[T], *, write: bool, transaction: bool) -> T:
        if self._pool is None:
            raise StorageUnavailable(self.health.problem or "the PostgreSQL store is closed")
        if self.exclusive and not self._owner.held:
            raise StorageUnavailable(self.health.problem or "the connection holding this relay's database lock was lost; "
                                     "taking it again")
        loop = asyncio.get_running_loop()
        deadline = self._deadline()
        key = object()
        self._in_flight[key] = time.monotonic()
        try:
            return await self._on_a_connection(job, write, transaction, deadline, loop)
        finally:
            del self._in_flight[key]

    async def _on_a_connection(self, job: Job[T], write: bool, transaction: bool, deadline: float,
                               loop: asyncio.AbstractEventLoop) -> T:
        left = deadline - loop.time()
        if left <= 0:  # the earlier writes it had to wait for took its time: nothing is sent
            raise self._fail_reason(self._late(), unknown=False)
        try:
            conn = await self._pool.acquire(timeout=min(self.connect_timeout_s, left))
        except (asyncio.TimeoutError, TimeoutError):
            raise self._fail_reason(f"no PostgreSQL connection within {self.connect_timeout_s:g} s (pool_size "
                                    f"{self.pool_size} busy, or the server does not answer)", unknown=False) from None
        except Exception as exc:
            if not server_cannot_serve(exc):
                raise
            raise self._fail(exc, unknown=False) from None
        import asyncpg
        attempt = _Attempt()
        try:
            async with asyncio.timeout_at(deadline):
                result = await self._attempts(conn, job, write, transaction, attempt)
        except TimeoutError:  # the deadline (asyncpg's own timeouts have become StorageUnavailable below)
            attempt.clean = False
            raise self._fail_reason(self._late(), unknown=write and attempt.sent) from None
        except BaseException as exc:
            attempt.clean = isinstance(exc, asyncpg.PostgresError) and not server_cannot_serve(exc)
            raise
        finally:
            await self._give_back(conn, attempt.clean, deadline, loop)
        self._succeeded()
        return result

    def _late(self) -> str:
        return f"PostgreSQL did not answer within {self.deadline_s:g} s (connect_timeout_s + command_timeout_s)"

    async def _attempts(self, conn: Any, job: Job[T], write: bool, transaction: bool, attempt: _Attempt) -> T:
        for n in range(_DEADLOCK_RETRIES):
            try:
                return await (self._in_transaction(conn, job, write, attempt) if transaction else
                              self._alone(conn, job, write, attempt))
            except _Retry:
                log.warning("a PostgreSQL transaction was rolled back as a deadlock victim; retrying (%d)", n + 1)
        raise self._fail_reason("PostgreSQL kept rolling back a transaction as a deadlock victim", unknown=False)

    async def _give_back(self, conn: Any, clean: bool, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        """Return ``conn`` to the pool; one whose state is unknown (a statement cut short, a hang) is closed
        first, without a round trip, so the pool opens a new one when needed."""
        left = deadline - loop.time()
        if not clean or left <= 0:
            _drop(conn)
            left = self.connect_timeout_s  # releasing a closed connection does no I/O
        try:
            await self._pool.release(conn, timeout=left)
        except Exception:
            pass  # could not be reset in time: the pool closed it, and opens a new one when needed

    async def _alone(self, conn: Any, job: Job[T], write: bool, attempt: _Attempt) -> T:
        attempt.sent = True
        try:
            return await job(conn)
        except Exception as exc:
            if not server_cannot_serve(exc):
                raise
            raise self._fail(exc, unknown=write and _was_sent(exc)) from None

    async def _in_transaction(self, conn: Any, job: Job[T], write: bool, attempt: _Attempt) -> T:
        import asyncpg
        tr = conn.transaction()
        try:
            await tr.start()
            result = await job(conn)
        except BaseException as exc:
            if isinstance(exc, asyncpg.PostgresError):  # the server answered: the connection is in a known state
                await _rollback(tr)
            else:  # cut short (a timeout, the deadline, a lost link): the server rolls back when it closes
                _drop(conn)
            if getattr(exc, "sqlstate", None) in _RETRYABLE:
                raise _Retry() from exc
            if isinstance(exc, Exception) and server_cannot_serve(exc):
                raise self._fail(exc, unknown=False) from None
            raise
        attempt.sent = True
        try:
            await tr.commit()
        except Exception as exc:
            if not server_cannot_serve(exc):
                raise
            raise self._fail(exc, unknown=write and _was_sent(exc)) from None
        return result

    def _fail(self, exc: BaseException, *, unknown: bool) -> StorageUnavailable:
        return self._fail_reason(describe(exc), unknown=unknown)

    def _fail_reason(self, reason: str, *, unknown: bool) -> StorageUnavailable:
        return self.health.fail(reason, unknown=unknown)

    def _succeeded(self) -> None:
        self.health.succeeded()

    async def _probe_loop(self) -> None:
        """One trivial query a tick: a server that went away (or came back) shows in health within a tick."""
        while True:
            started = time.monotonic()
            try:
                if self._pool is None:
                    await self._connect_later()
                elif self.exclusive and not self._owner.held:
                    await self._take_lock_again()
                else:
                    await self.run(_select_one, write=False)
            except StorageUnavailable:
                pass
            except Exception:
                log.exception("PostgreSQL health probe failed")
            await asyncio.sleep(max(0.05, self.probe_interval_s - (time.monotonic() - started)))


    async def _take_lock_again(self) -> None:
        """The owner lock's connection dropped (an outage): take the lock again before anything is written."""
        try:
            await self._owner.acquire(self.connect_one)
        except AnotherOwner as exc:
            self.health.fail(f"{exc}; this relay writes nothing to it until restarted")
            return
        except Exception as exc:
            if not server_cannot_serve(exc):
                raise
            self._fail(exc, unknown=False)
            return
        self._succeeded()

    async def _connect_later(self) -> None:
        """The server could not be reached at start-up: try again (a success counts as a recovery)."""
        try:
            await self._connect()
        except StoreOpenError as exc:
            self.health.fail(f"the PostgreSQL store cannot open: {exc}")
            return
        except Exception as exc:
            if not server_cannot_serve(exc):
                self.health.fail(f"cannot open PostgreSQL database {redact_url(self.url)}: {describe(exc)}")
                return
            self._fail(exc, unknown=False)
            return
        self._succeeded()


async def _select_one(conn: Any) -> None:
    await conn.fetchval("SELECT 1")


def _keeping(settings: str) -> Any:
    """asyncpg's connection class, whose reset before going back to the pool applies ``settings`` again (asyncpg's
    documented way: ``get_reset_query``)."""
    import asyncpg

    class Connection(asyncpg.Connection):  # type: ignore[misc]
        def get_reset_query(self) -> str:
            reset = super().get_reset_query()
            return f"{reset}; {settings}" if reset else settings
    return Connection


def _drop(conn: Any) -> None:
    """Close a pooled connection at once, without a round trip (the pool replaces it when needed)."""
    import asyncpg
    try:
        conn.terminate()
    except asyncpg.InterfaceError:
        pass  # it closed already, and the pool took it back


async def _rollback(tr: Any) -> None:
    try:
        await tr.rollback()
    except Exception:
        pass  # the connection is gone: the server rolled back for us


def _was_sent(exc: BaseException) -> bool:
    """False only for errors raised before anything reached the server (a connection already closed)."""
    import asyncpg
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc) and "middle" not in str(exc):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return False  # the server answered with an error: the statement or transaction was not applied
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return False  # the connection broke (the server's shutdown notice) before the statement could be sent
    return True

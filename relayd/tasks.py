"""Background tasks: a set that can be waited for, and stopping one, bounded even when a library loses a
cancellation.

redis-py's ``BlockingConnectionPool.get_connection`` (8.1) can swallow a
cancellation that lands while it opens a connection: the task goes on as if
nothing happened, and a loop that was told to stop runs forever (seen as a
store's ``close()`` that never returned). ``stop`` cancels again until the
task ends, and gives up after a deadline with a warning rather than hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("relayd.server")

RECANCEL_S = 0.05
"""How long to wait for a cancelled task before cancelling it again."""


async def stop(task: asyncio.Task[Any] | None, timeout: float) -> bool:
    """Cancel ``task`` and wait until it ends, at most ``timeout`` seconds; returns whether it ended.

    Never raises for the task's own outcome (a cancellation or an error it ended with). Raises
    CancelledError only when the caller itself is cancelled.
    """
    if task is None:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning("background task %s did not stop within %.1f s; left running", task.get_name(), timeout)
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(RECANCEL_S, left))
    if not task.cancelled():
        task.exception()  # retrieved: an error it ended with was logged where it happened
    return True


def retrieved(future: asyncio.Future[Any]) -> None:
    """A done callback for a future nobody may await: its error counts as seen, so asyncio does not log
    "exception was never retrieved" (whoever cares about it was told elsewhere)."""
    if not future.cancelled():
        future.exception()


class TaskSet:
    """Tasks started for work that must finish before shutdown (writes, notices): kept until done, and
    awaitable as a whole (``settle``) so a stop waits for them instead of dropping them."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def track(self, task: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        return self.track(asyncio.get_running_loop().create_task(coro))

    def __len__(self) -> int:
        return len(self._tasks)

    async def settle(self) -> None:
        """Return once every task, including those started meanwhile, has ended (their errors are theirs)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
